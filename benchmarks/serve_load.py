"""Load benchmark of `lookalike serve`: N concurrent clients on loopback, POST /search with real photos, then GET /images/{id}/similar.

The service runs as its own process (`python -m lookalike serve`, as users start it). Each client
keeps one connection and sends one request at a time, cycling through real photos of the example
dataset (or through the catalog's ids); each phase stops after --duration seconds or --max-requests
requests, whichever comes first. /similar is measured twice with the same requests: on the service
as it starts by default, whose answer cache holds every id after its first request (a catalog page
asking for the same ids again and again: `similar`), and on a second service started with
--similar-cache-mb 0, which searches the index for every request (`similar_uncached`). The clients encode each request with h11 and send it on a raw
socket: httpx costs about as much CPU per request as the service's /similar answer, and on a small
machine the load generator would measure itself.

The featurizer's own images/s (`embed_paths` with the index's model on the same photos, no cache:
decoding and embedding, as `lookalike featurize` does) is measured in the same run, before and
after the load, so that /search can be compared with it on the same machine at the same time.

Without --index, a run and an index are built first in a temporary folder from --per-attribute
photos per attribute of --data (the default lookalike embedding; a few minutes on 2 cores; not
part of the measurement).

    .venv/bin/python benchmarks/serve_load.py --json                  # 8 clients, 20 s + 10 s + 10 s
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

import h11
import httpx
import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashionTexture"
SMALL_CONFIG = "[data]\ntrain_queries_per_attribute = 10\ntest_queries_per_attribute = 4\n[evaluate]\nquery_pictures = 3\n"
#: (method, target, headers, body) of one HTTP request
Request = tuple[str, str, list[tuple[bytes, bytes]], bytes]


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


def http_request(method: str, target: str, **content) -> Request:
    """A request encoded once (multipart included) by httpx, to be sent many times."""
    request = httpx.Request(method, f"http://127.0.0.1{target}", **content)
    return method, target, list(request.headers.raw), request.read()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: h11.Connection, request: Request) -> int:
    """Send one request on a kept-alive connection; the response's status once its body has arrived."""
    method, target, headers, body = request
    writer.write(conn.send(h11.Request(method=method, target=target, headers=headers)))
    if body:
        writer.write(conn.send(h11.Data(data=body)))
    writer.write(conn.send(h11.EndOfMessage()))
    status = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(1 << 16))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            return status
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("the service closed the connection")


async def load(port: int, requests: list[Request], clients: int, duration: float, max_requests: int) -> dict:
    """`clients` connections sending `requests` in turn, one at a time each; latency percentiles and statuses."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    issued = 0
    stop_at = time.perf_counter() + duration

    async def client(k: int) -> None:
        nonlocal issued
        i = k
        reader = writer = None
        while time.perf_counter() < stop_at and issued < max_requests:
            issued += 1
            start = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    conn = h11.Connection(h11.CLIENT)
                key = str(await exchange(reader, writer, conn, requests[i % len(requests)]))
                conn.start_next_cycle()
            except (OSError, h11.ProtocolError) as e:  # a refused or closed connection is counted, and a new one opened
                key = type(e).__name__
                if writer is not None:
                    writer.close()
                writer = None
            latencies.append(time.perf_counter() - start)
            statuses[key] = statuses.get(key, 0) + 1
            i += clients
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "req_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p90_ms": round(float(np.percentile(lat, 90)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
        "errors": sum(n for k, n in statuses.items() if k != "200"),
        "statuses": statuses,
    }


def featurizer_rate(model, paths: list[Path]) -> float:
    """Images/s of the featurizer alone on `paths` (decoding and embedding, no cache)."""
    from lookalike.features import embed_paths

    start = time.perf_counter()
    n = len(embed_paths(model.engine(), paths, progress=False).paths)
    return n / (time.perf_counter() - start)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(server: subprocess.Popen, phase) -> dict:
    """Run a load phase; add the service's CPU milliseconds per request (steadier than req/s on a shared machine)."""
    cpu = cpu_seconds(server.pid)
    result = phase()
    result["server_cpu_ms_per_req"] = round((cpu_seconds(server.pid) - cpu) * 1000 / max(result["requests"], 1), 2)
    return result


def catalog_ids(index: Path) -> list[int]:
    from lookalike.index.store import ImageIndex

    with ImageIndex.open(index) as ix:
        return sorted(entry.id for entry in ix.entries_by_path().values())


def similar_phase(index: Path, log, options: list[str], requests: list[Request], args) -> dict:
    """GET /images/{id}/similar on a service of its own started with `options` (after a short warm-up, not measured)."""
    port = free_port()
    server = start_server(index, port, log, *options)
    try:
        asyncio.run(load(port, requests, args.clients, 60, 2 * args.clients))
        return measured(server, lambda: asyncio.run(load(port, requests, args.clients, args.similar_duration, args.max_requests)))
    finally:
        server.terminate()
        server.wait(timeout=30)


def run_benchmark(args, index: Path, log) -> dict:
    from lookalike.model import SimilarityModel
    from lookalike.serve.service import resolve_run_dir

    photos = sorted(args.data.rglob("*.jpg"))[:64]
    manifest = json.loads((index / "manifest.json").read_text())
    model = SimilarityModel.load(resolve_run_dir(index, manifest.get("run_dir"), args.run))
    featurizer_rate(model, photos[:8])  # the ONNX session and the page cache warm
    searches = [http_request("POST", "/search", files={"image": (p.name, p.read_bytes(), "image/jpeg")}, data={"top": str(args.top)}) for p in photos]
    similar = [http_request("GET", f"/images/{i}/similar?top={args.top}") for i in catalog_ids(index)]
    port = free_port()
    options = list(map(str, ["--max-concurrency", args.max_concurrency, "--max-batch", args.max_batch, "--batch-wait-ms", args.batch_wait_ms]))
    server = start_server(index, port, log, *options)
    try:
        asyncio.run(load(port, searches, args.clients, 60, 2 * args.clients))  # warm-up, not measured
        load_before = os.getloadavg()[0]
        before = featurizer_rate(model, photos)
        search = measured(server, lambda: asyncio.run(load(port, searches, args.clients, args.duration, args.max_requests)))
        after = featurizer_rate(model, photos)
        by_id = measured(server, lambda: asyncio.run(load(port, similar, args.clients, args.similar_duration, args.max_requests))) if args.similar_duration > 0 else None
    finally:
        server.terminate()
        server.wait(timeout=30)
    uncached = similar_phase(index, log, [*options, "--similar-cache-mb", "0"], similar, args) if args.similar_duration > 0 else None
    load_after = os.getloadavg()[0]
    featurize = (before + after) / 2
    return {
        "route": "POST /search",
        **search,
        "featurize_img_s": round(featurize, 1),
        "featurize_img_s_before_after": [round(before, 1), round(after, 1)],
        "search_vs_featurizer": round(search["req_s"] / featurize, 2),
        "similar": by_id and {"route": "GET /images/{id}/similar", **by_id},
        "similar_uncached": uncached and {"route": "GET /images/{id}/similar, no cache", **uncached},
        "similar_req_s": by_id and by_id["req_s"],
        "similar_uncached_req_s": uncached and uncached["req_s"],
        "images": manifest["rows"],
        "dim": manifest["dim"],
        "max_concurrency": args.max_concurrency,
        "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms,
        "cpus": os.cpu_count(),
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, help="An index folder; default: build one from --data")
    ap.add_argument("--run", type=Path, help="The run whose model embeds queries; default: the one the index records")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--per-attribute", type=int, default=40, help="photos per attribute in the index built without --index")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load on POST /search")
    ap.add_argument("--similar-duration", type=float, default=10.0, help="seconds of load on GET /images/{id}/similar, with the answer cache and without (0: skip)")
    ap.add_argument("--max-requests", type=int, default=20000, help="most requests per phase")
    ap.add_argument("--max-concurrency", type=int, default=2, help="the service's --max-concurrency")
    ap.add_argument("--max-batch", type=int, default=16, help="the service's --max-batch")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0, help="the service's --batch-wait-ms")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="lookalike-serve-load-") as tmp:
        work = Path(tmp)
        index = args.index or build_fixture(args.data, args.per_attribute, work)
        with open(work / "server.log", "wb") as log:
            result = run_benchmark(args, index, log)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['images']} images ({result['dim']}-d), {result['clients']} clients, service --max-concurrency {args.max_concurrency} "
          f"--max-batch {args.max_batch} --batch-wait-ms {args.batch_wait_ms:g}, {result['cpus']} CPUs, loopback, load average {result['load_average_before_after']}")
    print(f"{'route':<36} {'requests':>9} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7} {'server CPU ms/req':>18}")
    for row in filter(None, (result, result["similar"], result["similar_uncached"])):
        print(
            f"{row['route']:<36} {row['requests']:>9} {row['req_s']:>7} {row['p50_ms']:>8} {row['p90_ms']:>8} {row['p99_ms']:>8} "
            f"{row['max_ms']:>8} {row['errors']:>7} {row['server_cpu_ms_per_req']:>18}"
        )
    print(f"featurizer alone: {result['featurize_img_s']} images/s (before, after: {result['featurize_img_s_before_after']}); "
          f"POST /search = {result['search_vs_featurizer']}x of it")


if __name__ == "__main__":
    main()
