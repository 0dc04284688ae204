"""Load benchmark of `lookalike serve`: N concurrent clients POST real photos to /search on loopback.

The service runs as its own process (`python -m lookalike serve`, as users start it), so the load
generator does not share its interpreter. Each client sends one request at a time, cycling through
real photos of the example dataset; the run stops after --duration seconds or --max-requests
requests, whichever comes first. Prints throughput, latency percentiles and every non-200 status.

Without --index, a run and an index are built first in a temporary folder from --per-attribute
photos per attribute of --data (about a minute on 2 cores; not part of the measurement).

    .venv/bin/python benchmarks/serve_load.py                         # 8 clients, 30 s
    .venv/bin/python benchmarks/serve_load.py --index runs/demo-index --clients 16 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashionTexture"
SMALL_CONFIG = "[data]\ntrain_queries_per_attribute = 10\ntest_queries_per_attribute = 4\n[evaluate]\nquery_pictures = 3\n"


def build_fixture(data: Path, per_attribute: int, work: Path) -> Path:
    """A run trained on a subset of `data` and an index of that subset; returns the index folder."""
    from lookalike.index.build import build_index

    subset = work / "photos"
    for attribute in sorted(p.name for p in data.iterdir() if p.is_dir()):
        (subset / attribute).mkdir(parents=True)
        for src in sorted((data / attribute).glob("*.jpg"))[:per_attribute]:
            os.symlink(src, subset / attribute / src.name)
    (work / "small.toml").write_text(SMALL_CONFIG)
    cmd = [sys.executable, "-m", "lookalike", "run", "--data", subset, "--out", work / "run", "--splits", "1", "--config", work / "small.toml"]
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True)
    build_index(work / "run", subset, work / "index", progress=False)
    return work / "index"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, log, *options: str) -> subprocess.Popen:
    """`lookalike serve` on 127.0.0.1:port with extra `options`, once /healthz answers (also used by slowloris.py)."""
    cmd = [sys.executable, "-m", "lookalike", "serve", "--index", str(index), "--port", str(port), *options]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}; see its log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit("the service did not come up within 120 s")
        time.sleep(0.3)


async def load(base: str, photos: list[bytes], clients: int, duration: float, max_requests: int, top: int) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    stop_at = time.perf_counter() + duration

    async def client(k: int) -> None:
        nonlocal issued
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            i = k
            while time.perf_counter() < stop_at and issued < max_requests:
                issued += 1
                start = time.perf_counter()
                try:
                    r = await http.post("/search", files={"image": ("q.jpg", photos[i % len(photos)], "image/jpeg")}, data={"top": str(top)})
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    key = type(e).__name__
                latencies.append(time.perf_counter() - start)
                statuses[key] = statuses.get(key, 0) + 1
                i += clients

    # one warm-up request so model and page cache are hot before the clock starts
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        await http.post("/search", files={"image": ("q.jpg", photos[0], "image/jpeg")}, data={"top": str(top)})
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p90_ms": round(float(np.percentile(lat, 90)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
        "errors": sum(n for k, n in statuses.items() if k != "200"),
        "statuses": statuses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, help="An index folder; default: build a small one from --data")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--per-attribute", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=5000)
    ap.add_argument("--max-concurrency", type=int, default=2, help="the service's --max-concurrency")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    photos = [p.read_bytes() for p in sorted(args.data.rglob("*.jpg"))[:64]]
    with tempfile.TemporaryDirectory(prefix="lookalike-serve-load-") as tmp:
        work = Path(tmp)
        index = args.index or build_fixture(args.data, args.per_attribute, work)
        port = free_port()
        with open(work / "server.log", "wb") as log:
            server = start_server(index, port, log, "--max-concurrency", str(args.max_concurrency))
            try:
                result = asyncio.run(load(f"http://127.0.0.1:{port}", photos, args.clients, args.duration, args.max_requests, args.top))
            finally:
                server.terminate()
                server.wait(timeout=30)
    result |= {"max_concurrency": args.max_concurrency, "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"POST /search, {result['clients']} clients, service --max-concurrency {args.max_concurrency}, {result['cpus']} CPUs, loopback")
    print(f"{'requests':>9} {'seconds':>8} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}")
    print(
        f"{result['requests']:>9} {result['seconds']:>8} {result['throughput_rps']:>7} {result['p50_ms']:>8} "
        f"{result['p90_ms']:>8} {result['p99_ms']:>8} {result['max_ms']:>8} {result['errors']:>7}"
    )
    print("statuses:", result["statuses"])


if __name__ == "__main__":
    main()
