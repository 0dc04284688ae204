"""A run's splits and unseen-attribute test side by side in worker processes (parallel.py, run_pipeline's jobs)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_dataset
from lookalike import parallel, pipeline
from lookalike.config import LookalikeConfig
from lookalike.errors import BadImageError, LookalikeError
from lookalike.features.engines import cpu_threads
from lookalike.parallel import run_tasks, workers_for

#: small enough for seconds, refined in cached mode so the workers read views the parent cached (prefill)
CONFIG = {
    "data": {"train_ratio": 0.6, "validation_ratio": 0.25, "train_queries_per_attribute": 4, "test_queries_per_attribute": 3},
    "features": {"resolution": 64, "batch_size": 16},
    "refine": {"epochs": 3, "lr_schedule": [[3, 0.003]], "batch_size": 8, "cached_views": 1, "visual_part": "learned", "mode": "cached"},
    "evaluate": {"query_pictures": 1},
}


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "textures", per_attribute=10)


def test_workers_are_one_per_core_at_most_one_per_task_and_one_on_a_gpu():
    assert workers_for(0, 100, gpu=False) == cpu_threads()
    assert workers_for(0, 1, gpu=False) == 1
    assert workers_for(3, 2, gpu=False) == 2
    assert workers_for(4, 6, gpu=True) == 1


def test_splits_side_by_side_give_what_they_give_one_after_another(textures, tmp_path, monkeypatch):
    cfg = LookalikeConfig.model_validate(CONFIG)
    runs = {}
    for jobs in (1, 2):
        monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / f"cache-{jobs}"))  # each run makes its own views
        runs[jobs] = tmp_path / f"jobs-{jobs}"
        pipeline.run_pipeline(textures, runs[jobs], cfg, splits=2, progress=False, jobs=jobs)
    for k in (0, 1):
        one, two = (json.loads((runs[j] / f"split-{k}" / "evaluation.json").read_text()) for j in (1, 2))
        assert one["ranks"] == two["ranks"]
        for name, summary in one["distances"].items():
            assert two["distances"][name] == pytest.approx(summary, abs=1e-6)
        for name, summary in one["copies"].items():
            assert two["copies"][name] == pytest.approx(summary, abs=1e-6)
    one, two = (json.loads((runs[j] / "unseen" / "unseen.json").read_text()) for j in (1, 2))
    assert two["learned"] == pytest.approx(one["learned"], abs=1e-6) and two["pretrained"] == pytest.approx(one["pretrained"], abs=1e-6)
    log = (runs[2] / "log.txt").read_text()
    threads = max(1, cpu_threads() // 2)
    assert f"3 tasks (2 split(s) and the unseen-attribute test) in 2 processes of {threads} thread(s) each" in log
    assert f"CPU ({threads} thread{'' if threads == 1 else 's'}," in log  # each worker trains on its share of the cores
    # the parent made every view the splits read, with all cores; the workers made none
    assert re.search(r"splits 0, 1: [1-9]\d* new view\(s\) of the frozen blocks cached", log)
    assert re.findall(r"split \d: (\d+) new view\(s\)", log) == ["0", "0"]
    assert "in 2 processes" not in (runs[1] / "log.txt").read_text()


def test_a_failing_split_stops_the_run_with_its_message_and_leaves_no_worker(textures, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "cache"))
    evaluate = pipeline.evaluate

    def failing(run_dir, split=0, force=False):
        if split == 1:  # an error class whose constructor differs from LookalikeError's still arrives as its message
            raise BadImageError("dots/003.png", "truncated (planted)")
        return evaluate(run_dir, split=split, force=force)

    monkeypatch.setattr(pipeline, "evaluate", failing)  # the forked workers inherit the patch
    with pytest.raises(LookalikeError, match=r"dots/003.png: truncated \(planted\)"):
        pipeline.run_pipeline(textures, tmp_path / "run", LookalikeConfig.model_validate(CONFIG), splits=2, progress=False, jobs=2)
    assert not multiprocessing.active_children()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_worker_that_dies_ends_the_run_with_a_message_instead_of_a_wait(tmp_path):
    def task(item: int) -> None:
        if item == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel does to a process that runs out of memory
        (tmp_path / f"done-{item}").touch()

    start = time.monotonic()
    with pytest.raises(LookalikeError, match="ended without finishing its task"):
        run_tasks(task, [0, 1, 2, 3], workers=2, desc="tasks", progress=False)
    assert time.monotonic() - start < 60 and not multiprocessing.active_children()
    run_tasks(task, [0, 2], workers=2, desc="tasks", progress=False)  # the next run is unaffected
    assert (tmp_path / "done-0").exists() and (tmp_path / "done-2").exists()


def test_where_worker_processes_cannot_start_the_tasks_run_one_after_another(monkeypatch):
    def no_semaphores(*args, **kwargs):
        raise OSError("sem_open is not implemented on this platform")

    warnings = []
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", no_semaphores)
    # the "lookalike" logger may not propagate to pytest's handler once the CLI has been set up in this process
    monkeypatch.setattr(parallel.log, "warning", lambda message, *args: warnings.append(message % args))
    order = []
    run_tasks(order.append, [2, 0, 1], workers=2, desc="tasks", progress=False)
    assert order == [2, 0, 1]  # in this process, in order
    assert warnings == ["cannot start worker processes (sem_open is not implemented on this platform); running the tasks one after another"]


def test_ctrl_c_ends_the_workers_with_a_message_not_a_traceback(textures, tmp_path):
    config = tmp_path / "slow.toml"
    config.write_text("[data]\ntrain_ratio = 0.6\nvalidation_ratio = 0.25\n[features]\nresolution = 64\n[refine]\nepochs = 400\nlr_schedule = [[400, 0.003]]\nbatch_size = 8\nvisual_part = \"learned\"\nmode = \"cached\"\n")
    run = tmp_path / "run"
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "lookalike", "run", "--data", str(textures), "--out", str(run), "--splits", "2", "--config", str(config), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    log, deadline = run / "log.txt", time.monotonic() + 120
    while not (log.exists() and "in 2 processes" in log.read_text()):  # the workers are training
        assert proc.poll() is None and time.monotonic() < deadline, "the run should still be training"
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # no worker outlived the run
