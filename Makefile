# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates or updates the local virtualenv in .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/datasets/fashionTexture
DEMO_OUT ?= runs/demo
SPLITS ?= 5

.PHONY: install demo test mutation clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray,milvus]'
	touch $@

demo: install
	$(VENV)/bin/lookalike run --data $(DATA) --out $(DEMO_OUT) --splits $(SPLITS)

test: install
	$(PY) -m pytest -n 2 --dist loadfile

# Mutation testing (not part of `test`): mutants of the ranking-quality modules set in pyproject.toml [tool.mutmut],
# each checked by the unit tests that reach it (one thread each, so CPU-time limits mean the same on any machine);
# ends with one line per module, `MODULE killed/total (PCT%)`.
# MUTANTS narrows the run, e.g. make mutation MUTANTS='lookalike.metric*'; see docs/testing.md.
MUTATION_JOBS ?= 2
MUTANTS ?=
mutation: install
	rm -rf mutants
	OMP_NUM_THREADS=1 PYTHONPATH=src $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(PY) tests/mutation_scores.py

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
