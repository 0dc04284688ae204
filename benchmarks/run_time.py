"""Wall time of `lookalike run` (what `make demo` runs) from an empty feature cache, one row per --jobs value.

Each row gets a fresh cache and run folder, so it pays for every view, export and model, as a first run does.
CPU time is the run's and its worker processes' (user + system); CPU / wall is how many cores were kept busy.
The last column is the run's weighted-L2 rank top-1, to show the rows computed the same thing.

    .venv/bin/python benchmarks/run_time.py
    .venv/bin/python benchmarks/run_time.py --data ../shared/datasets/fashionTexture --splits 5 --jobs 1 0 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed_run(data: Path, splits: int, jobs: int, work: Path) -> dict:
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(work / "cache")}
    cmd = [sys.executable, "-m", "lookalike", "--no-progress", "run", "--data", str(data), "--out", str(work / "run"), "--splits", str(splits), "--jobs", str(jobs)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"lookalike run --jobs {jobs} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    return {"jobs": jobs, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cores_busy": round(cpu / wall, 2), "top1": metrics["distances"]["weighted_l2"]["top1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "fashionTexture")
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 0], help="--jobs values to time (0 = one process per core)")
    ap.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    args = ap.parse_args()
    rows = []
    for jobs in args.jobs:
        with tempfile.TemporaryDirectory(prefix="lookalike-run-time-") as tmp:
            rows.append(timed_run(args.data.resolve(), args.splits, jobs, Path(tmp)))
    if args.json:
        print(json.dumps(rows))
        return
    print(f"lookalike run --splits {args.splits} on {args.data.name}, empty feature cache, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end")
    print(f"{'--jobs':>6} {'wall s':>8} {'CPU s':>8} {'cores busy':>11} {'weighted-L2 top-1':>18}")
    for r in rows:
        print(f"{r['jobs']:>6} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['cores_busy']:>11.2f} {r['top1']:>17.1%}")


if __name__ == "__main__":
    main()
