"""Slowloris against `lookalike serve`: N connections dripping request headers for D seconds, /healthz timed meanwhile.

    python benchmarks/slowloris.py --index INDEX_DIR [--connections 500] [--seconds 60]

Starts the service on a free loopback port, opens --connections sockets that each send a request
line and then one header byte every --drip seconds (reconnecting whenever the server closes them),
and times GET /healthz once every 0.5 s on a fresh connection. Prints a table: /healthz latency
(median, 95th percentile, max), failed health checks, and how long the server let an attacking
connection live.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time

import httpx

from serve_load import free_port, start_server


async def attacker(port: int, stop: float, drip: float, lifetimes: list[float]) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        opened = time.monotonic()
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() < stop:
                writer.write(b"X")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1), drip) == b"":
                        break
                except asyncio.TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            lifetimes.append(time.monotonic() - opened)
            writer.close()


async def prober(port: int, stop: float, latencies: list[float], failures: list[str]) -> None:
    async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                r = await client.get(f"http://127.0.0.1:{port}/healthz")
                if r.status_code != 200:
                    failures.append(str(r.status_code))
            except httpx.HTTPError as e:
                failures.append(type(e).__name__)
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.5)


async def attack(port: int, connections: int, seconds: float, drip: float) -> tuple[list[float], list[str], list[float]]:
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    failures: list[str] = []
    lifetimes: list[float] = []
    tasks = [asyncio.create_task(attacker(port, stop, drip, lifetimes)) for _ in range(connections)]
    await prober(port, stop, latencies, failures)
    await asyncio.gather(*tasks)
    return latencies, failures, lifetimes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="An index built by `lookalike index build`.")
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--drip", type=float, default=2.0, help="Seconds between header bytes of each attacking connection.")
    args = parser.parse_args()

    port = free_port()
    server = start_server(args.index, port, subprocess.DEVNULL)
    try:
        latencies, failures, lifetimes = asyncio.run(attack(port, args.connections, args.seconds, args.drip))
    finally:
        server.terminate()
        server.wait(30)
    ms = sorted(x * 1000 for x in latencies)
    print(f"slowloris: {args.connections} connections, one header byte every {args.drip:g} s, for {args.seconds:g} s (cpu count {os.cpu_count()})")
    print(f"{'healthz checks':<28}{len(ms):>10}")
    print(f"{'healthz failures':<28}{len(failures):>10}")
    print(f"{'healthz median (ms)':<28}{statistics.median(ms):>10.1f}")
    print(f"{'healthz p95 (ms)':<28}{ms[int(0.95 * (len(ms) - 1))]:>10.1f}")
    print(f"{'healthz max (ms)':<28}{ms[-1]:>10.1f}")
    print(f"{'attack connections opened':<28}{len(lifetimes):>10}")
    print(f"{'longest held (s)':<28}{max(lifetimes, default=0):>10.1f}")


if __name__ == "__main__":
    main()
