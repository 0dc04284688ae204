# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates or updates the local virtualenv in .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/datasets/fashionTexture
DEMO_OUT ?= runs/demo
SPLITS ?= 5

.PHONY: install demo test clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
