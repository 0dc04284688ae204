"""Independent pieces of a run (its splits, the unseen-attribute test) side by side, one process per share of the cores.

Training a small head in PyTorch, fitting the SVM and drawing the plots keep about 1.4 of 2 cores busy; two
processes of one thread each keep both busy. Workers are forked, so they start with everything the parent has
imported, and each is held to its share of the cores (PyTorch, ONNX Runtime, the BLAS and OpenMP pools), so
they never oversubscribe the machine. Only task numbers and error messages pass between the processes: every
result is a file the task writes, as in a run of one process.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Sequence

from .errors import LookalikeError
from .features.engines import cpu_threads, limit_threads
from .progress import enable as enable_progress
from .progress import tqdm

log = logging.getLogger(__name__)
_task: Callable[[int], object] | None = None


def workers_for(jobs: int, tasks: int, gpu: bool) -> int:
    """Processes for `tasks` tasks: `jobs`, or one per core when 0, at most one per task.

    One where processes cannot be forked (not Linux) or a CUDA GPU does the training (the processes would queue
    on it, and CUDA does not survive a fork).
    """
    if gpu or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(jobs or cpu_threads(), tasks))


def threads_per_worker(workers: int) -> int:
    """Each worker's share of this process's cores."""
    return max(1, cpu_threads() // workers)


def run_tasks(task: Callable[[int], object], items: Sequence[int], workers: int, desc: str, progress: bool = True) -> None:
    """Call `task(item)` for every item, in `workers` processes (or in this one, in order, for 1).

    The first task to fail with a LookalikeError stops the others (what they finished is kept) and its message
    is raised here; so is a worker's sudden death (killed for memory, say), instead of a wait for its result.
    """
    pool = None
    if workers > 1:
        try:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker, initargs=(threads_per_worker(workers),))
        except (ImportError, OSError) as e:  # e.g. a container without working POSIX semaphores
            log.warning("cannot start worker processes (%s); running the tasks one after another", e)
    if pool is None:
        for item in items:
            task(item)
        return
    global _task
    _task = task  # the workers inherit it through the fork: no function or argument is pickled
    bar = tqdm(total=len(items), desc=desc, unit="task", disable=not progress)
    others = set(multiprocessing.active_children())
    try:
        for done in as_completed([pool.submit(_run_one, item) for item in items]):
            try:
                failure = done.result()
            except BrokenProcessPool:
                raise LookalikeError(
                    f"a worker process ended without finishing its task (killed, perhaps for lack of memory); run fewer at once (jobs = {max(1, workers // 2)})"
                ) from None
            if failure is not None:
                raise LookalikeError(*failure)
            bar.update()
    except BaseException:
        # a failure or Ctrl-C: the tasks still running are ended, not waited for; what they finished is kept
        for process in set(multiprocessing.active_children()) - others:
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        _task = None


def _start_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the workers
    enable_progress(False)  # one bar, the parent's; the workers' log lines say what each does
    limit_threads(threads)


def _run_one(item: int) -> tuple[str, str | None] | None:
    try:
        _task(item)
    except LookalikeError as e:
        return str(e), e.param
    return None
