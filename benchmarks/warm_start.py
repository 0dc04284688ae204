"""How long one command takes when everything it needs is already cached: `retrieve` of one image, and `serve` until /healthz answers.

A user who runs one query waits for Python, torch and the model to load; a warm feature cache and a
cached ONNX export should spare everything else. Each command is run once to warm the caches, then
--repeat times, and the median wall time is printed (with the best and worst).

    .venv/bin/python benchmarks/warm_start.py --run runs/demo --index runs/demo.index
    .venv/bin/python benchmarks/warm_start.py --run runs/demo --index runs/demo.index --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, start_server  # noqa: E402  (one way to start the service for every benchmark)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def retrieve_once(run: Path, image: Path) -> None:
    subprocess.run([sys.executable, "-m", "lookalike", "retrieve", str(image), "--run", str(run), "--top", "5", "--json"], check=True, capture_output=True)


def serve_once(index: Path) -> None:
    with open("/dev/null", "w") as log:
        proc = start_server(index, free_port(), log)
    proc.terminate()
    proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="A trained run folder (lookalike run).")
    parser.add_argument("--index", type=Path, required=True, help="An index built from that run (lookalike index build).")
    parser.add_argument("--image", type=Path, help="The query (default: the run's first test image).")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")
    args = parser.parse_args()
    if args.image is None:
        from lookalike.rundir import RunDir

        run = RunDir(args.run)
        args.image = run.dataset().absolute_path(run.split(0).parts["test"][0])
    rows = {}
    for name, fn in (("retrieve (1 image)", lambda: retrieve_once(args.run, args.image)), ("serve until /healthz", lambda: serve_once(args.index))):
        fn()  # warm the caches
        times = [timed(fn) for _ in range(args.repeat)]
        rows[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'command':<24} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, r in rows.items():
        print(f"{name:<24} {r['median_s']:>9.2f} {r['min_s']:>7.2f} {r['max_s']:>7.2f}")


if __name__ == "__main__":
    main()
