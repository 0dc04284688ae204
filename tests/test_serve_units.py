"""Service pieces that need no model: request limits, upload sniffing, micro-batching, the /similar answer cache and lane, settings and CLI option parsing."""

from __future__ import annotations

import asyncio
import io
import select
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image

from lookalike.errors import LookalikeError
from lookalike.cli.serve import parse_rankers, settings_from_options
from lookalike.serve.batching import MicroBatcher
from lookalike.serve.connections import header_deadline_protocol
from lookalike.serve.errors import ApiError
from lookalike.serve.middleware import RequestGuard
from lookalike.serve.settings import ServeSettings
from lookalike.serve.similar import AnswerCache, SimilarLane, plain_query
from lookalike.serve.uploads import sniff_format


def guarded_echo(max_body: int, stall_s: float) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    app.add_middleware(RequestGuard, max_body=max_body, stall_s=stall_s)
    return app


def post(app, content, headers=None) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/echo", content=content, headers=headers)

    return asyncio.run(go())


def test_body_cap_applies_to_declared_and_streamed_bodies():
    app = guarded_echo(max_body=1000, stall_s=5)
    assert post(app, b"x" * 1000).json() == {"bytes": 1000}
    declared = post(app, b"x" * 1001)
    assert declared.status_code == 413 and declared.json()["error"] == "content_too_large"

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"y" * 300

    streamed = post(app, chunks())
    assert streamed.status_code == 413 and "upload limit" in streamed.json()["detail"]
    assert streamed.headers["x-content-type-options"] == "nosniff"
    bad = post(app, b"abc", headers={"content-length": "lots"})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request"


def test_a_stalled_upload_is_cut_off_with_408():
    async def slow():
        yield b"a" * 10
        await asyncio.sleep(1.0)
        yield b"b" * 10

    r = post(guarded_echo(max_body=1000, stall_s=0.2), slow())
    assert r.status_code == 408 and r.json() == {"error": "request_timeout", "detail": "the upload stalled for more than 0.2 s; send the request again"}


class Recorder:
    """A batch function that notes each call's items and start time, takes `seconds`, and doubles the items (or fails on `fail_on`)."""

    def __init__(self, seconds: float = 0.0, fail_on=None):
        self.seconds = seconds
        self.fail_on = fail_on
        self.calls: list[tuple[float, list]] = []

    async def __call__(self, items: list) -> list:
        self.calls.append((time.monotonic(), items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"cannot process {self.fail_on}")
        return [2 * x for x in items]

    @property
    def batches(self) -> list[list]:
        return [items for _, items in self.calls]


def test_items_submitted_together_share_one_call_up_to_the_batch_size():
    run = Recorder()

    async def go():
        batcher = MicroBatcher(run, max_batch=3, max_wait_s=0.5)
        start = time.monotonic()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(7)))
        return results, [t - start for t, _ in run.calls]

    results, started = asyncio.run(go())
    assert results == [0, 2, 4, 6, 8, 10, 12]
    assert run.batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert started[1] < 0.25, "full batches go at once, without waiting for the window"
    assert started[2] >= 0.5 - 1e-3, "the last, lone item waits for company"


def test_a_lone_item_waits_at_most_the_window():
    run = Recorder()

    async def go():
        batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.2)
        start = time.monotonic()
        assert await batcher.submit(21) == 42
        return run.calls[0][0] - start

    waited = asyncio.run(go())
    assert 0.2 - 1e-3 <= waited < 0.35, waited


def test_items_queued_behind_a_running_batch_do_not_wait_a_window_more():
    run = Recorder(seconds=0.3)

    async def go():
        batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.2)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.25)  # the first batch (started at 0.2 s) is running
        second = asyncio.create_task(batcher.submit(2))
        return await first, await second

    assert asyncio.run(go()) == (2, 4)
    (started_first, _), (started_second, _) = run.calls
    first_done = started_first + 0.3
    assert started_second - first_done < 0.1, "the second item had already waited its window while the first batch ran"


def test_a_failed_batch_fails_only_its_own_items_and_cancelled_items_are_left_out():
    run = Recorder(fail_on=13)

    async def go():
        batcher = MicroBatcher(run, max_batch=2, max_wait_s=0.05)
        failed = await asyncio.gather(batcher.submit(13), batcher.submit(1), return_exceptions=True)
        gone = asyncio.create_task(batcher.submit(99))
        await asyncio.sleep(0)
        gone.cancel()
        later = await asyncio.gather(batcher.submit(2), batcher.submit(3))
        return failed, later

    failed, later = asyncio.run(asyncio.wait_for(go(), 5))
    assert all(isinstance(e, ValueError) and "cannot process 13" in str(e) for e in failed)
    assert later == [4, 6]
    assert run.batches == [[13, 1], [2, 3]]


def test_batcher_refuses_a_batch_size_below_one():
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Recorder(), max_batch=0, max_wait_s=0.01)


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer (headers and the Content-Length body), or what came before the server closed."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(data.lower().split(b"content-length: ")[1].split(b"\r\n")[0]):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def seconds_held(sock: socket.socket, drip: bytes) -> float:
    """Send `drip` a byte every 0.1 s until the server closes the connection; how long that took."""
    start = time.monotonic()
    for byte in drip:
        try:
            sock.sendall(bytes([byte]))
            ready, _, _ = select.select([sock], [], [], 0.1)
            if ready and not sock.recv(1):
                break
        except OSError:
            break
    return time.monotonic() - start


def test_header_deadline_closes_slow_headers_and_spares_kept_alive_connections():
    app = FastAPI()

    @app.get("/ping")
    async def ping(wait: float = 0) -> dict:
        await asyncio.sleep(wait)
        return {"ok": True}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http=header_deadline_protocol(0.5)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as kept:
            # each request's headers come within 0.5 s of the previous answer, and one takes 0.8 s to answer: all served
            for target in (b"/ping", b"/ping?wait=0.8", b"/ping"):
                kept.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_answer(kept).endswith(b'{"ok":true}'), target
                time.sleep(0.35)
            kept.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\nGET /ping?wait=0.8 HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined
            both = b""
            while both.count(b'{"ok":true}') < 2 and (chunk := kept.recv(65536)):
                both += chunk
            assert both.count(b'{"ok":true}') == 2, "the pipelined request was cut off while it was being answered"
            kept.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
            held = seconds_held(kept, drip=b"X-Slow: " + b"a" * 50)
        assert held < 2.0, f"headers dripped for {held:.1f} s past the 0.5 s deadline, and the connection stayed open"
    finally:
        server.should_exit = True
        thread.join(10)


def encoded(fmt: str, size=(30, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "HEIF"])
def test_sniffing_reads_format_and_size_from_content(fmt):
    assert sniff_format(encoded(fmt), "upload") == (fmt, (30, 20))


@pytest.mark.parametrize(
    "data, status",
    [
        (b"", 422),
        (b"plain text", 415),
        (encoded("GIF", mode="P"), 415),  # a real image, but not a format the service accepts
        (encoded("ICO", size=(16, 16)), 415),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, 415),
    ],
)
def test_sniffing_refuses_empty_foreign_and_broken_headers(data, status):
    with pytest.raises(ApiError) as e:
        sniff_format(data, "upload 'x.jpg'")
    assert e.value.status == status and "upload 'x.jpg'" in e.value.detail


def test_settings_are_safe_by_default_and_validated(tmp_path):
    s = ServeSettings(index_dir=tmp_path / "idx")
    assert s.host == "127.0.0.1" and not s.writes_enabled and s.max_upload_bytes == 20 * 1024 * 1024
    assert s.resolved_upload_dir() == (tmp_path / "idx-uploads").resolve()
    assert not ServeSettings(index_dir=tmp_path, allow_writes=True).writes_enabled
    with pytest.raises(LookalikeError, match="--allow-writes needs an API key"):
        settings_from_options(index_dir=tmp_path, allow_writes=True, api_key="")
    with pytest.raises(LookalikeError, match="--api-key: .*at least 16 characters"):
        settings_from_options(index_dir=tmp_path, api_key="short")
    with pytest.raises(LookalikeError, match="--max-concurrency"):
        settings_from_options(index_dir=tmp_path, max_concurrency=0)
    assert s.similar_cache_mb == 32 and settings_from_options(index_dir=tmp_path, similar_cache_mb=0).similar_cache_mb == 0
    with pytest.raises(LookalikeError, match="--similar-cache-mb"):
        settings_from_options(index_dir=tmp_path, similar_cache_mb=-1)


def test_ranker_options():
    assert parse_rankers(["sleeve=runs/sleeve", " neck = runs/neck "]) == {"sleeve": Path("runs/sleeve"), "neck": Path("runs/neck")}
    for bad in (["sleeve"], ["=runs/x"], ["a=x", "a=y"], ["a=x", " a =y"]):
        with pytest.raises(LookalikeError, match="--ranker"):
            parse_rankers(bad)


# ---- GET /images/{id}/similar: the answer cache and the lane ----------------------------------


def test_answer_cache_holds_one_index_version_within_its_byte_bound():
    cache = AnswerCache(max_bytes=1000)
    for i in range(10):
        cache.put(("v1",), (i,), bytes(300))
        cache.get(("v1",), (0,))  # the first answer is read again and again: it stays
        assert cache.held_bytes <= 1000
    assert cache.held_bytes == 900
    assert cache.get(("v1",), (0,)) == bytes(300) and cache.get(("v1",), (9,)) == bytes(300)
    assert cache.get(("v1",), (1,)) is None, "the least recently used answers were dropped"
    assert cache.get(("v2",), (0,)) is None, "an answer of another index version is never given"
    cache.put(("v2",), (5,), b"new")
    assert cache.held_bytes == 3 and cache.get(("v1",), (0,)) is None and cache.get(("v2",), (5,)) == b"new"
    cache.put(("v2",), (6,), bytes(1001))
    assert cache.get(("v2",), (6,)) is None and cache.get(("v2",), (5,)) == b"new", "an answer larger than the bound is not kept"
    cache.put(None, (7,), b"x")
    assert cache.get(None, (7,)) is None, "without a known version nothing is cached"
    off = AnswerCache(max_bytes=0)
    off.put(("v1",), (0,), b"x")
    assert off.get(("v1",), (0,)) is None and off.held_bytes == 0


@pytest.mark.parametrize(
    "query, params",
    [
        (b"", (15, None, None)),
        (b"top=20", (20, None, None)),
        (b"top=100&attribute=dotted+silk&min_probability=0.25", (100, "dotted silk", 0.25)),
        (b"attribute=le%6Fpard&min_probability=1", (15, "leopard", 1.0)),
        (b"min_probability=0.0", (15, None, 0.0)),
        (b"attribute=" + b"a" * 200, (15, "a" * 200, None)),
        (b"top=5&", (5, None, None)),  # an empty field is no field, for Starlette too
    ],
)
def test_plainly_written_similar_queries_are_read_by_the_lane(query, params):
    assert plain_query(query, max_top=100) == params


@pytest.mark.parametrize(
    "query",
    [b"top=0", b"top=101", b"top=015", b"top=+5", b"top=5.0", b"top=%205", b"top=5&top=6", b"top=", b"top", b"attribute=", b"attribute=" + b"a" * 201,
     b"min_probability=1.5", b"min_probability=.5", b"min_probability=nan", b"min_probability=1e-1", b"min_probability=-0", b"x=1"],
)
def test_other_similar_queries_are_left_to_the_route(query):
    assert plain_query(query, max_top=100) is None


def test_the_lane_answers_plain_requests_and_passes_on_the_rest():
    asked, passed = [], []

    class Answers:
        async def body(self, image_id, top, attribute, min_probability):
            asked.append((image_id, top, attribute, min_probability))
            if image_id == 404:
                raise ApiError(404, "not_found", "no such image")
            if image_id == 400:
                raise LookalikeError("the index has gone away")
            return b'{"answer":1}'

    async def route(scope, receive, send):
        passed.append(scope["path"] + "?" + scope["query_string"].decode())
        await send({"type": "http.response.start", "status": 422, "headers": []})
        await send({"type": "http.response.body", "body": b"route"})

    template = SimpleNamespace(path="/images/{image_id}/similar")
    lane = SimilarLane(route, Answers(), template, max_top=100)
    seen_routes = []

    async def app(scope, receive, send):
        await lane(scope, receive, send)
        seen_routes.append(scope.get("route"))

    async def get(*urls):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.get(u) for u in urls]

    ok, missing, gone, odd, big, head_like = asyncio.run(
        get("/images/7/similar?top=3&attribute=dotted", "/images/404/similar", "/images/400/similar", "/images/07/similar", "/images/9007199254740993/similar", "/images/7/similar/")
    )
    assert ok.status_code == 200 and ok.content == b'{"answer":1}' and ok.headers["content-type"] == "application/json"
    assert missing.status_code == 404 and missing.json() == {"error": "not_found", "detail": "no such image"}
    assert gone.status_code == 400 and gone.json() == {"error": "bad_request", "detail": "the index has gone away"}
    assert asked == [(7, 3, "dotted", None), (404, 15, None, None), (400, 15, None, None)]
    assert [r.status_code for r in (odd, big, head_like)] == [422, 422, 422]
    assert passed == ["/images/07/similar?", "/images/9007199254740993/similar?", "/images/7/similar/?"]
    assert seen_routes[:3] == [template] * 3, "the lane's requests are counted under the route's template"


def test_a_match_distance_is_never_negative_not_even_minus_zero():
    import math

    from lookalike.results import MatchOut

    for raw in (-0.0, -1e-9, 0.0):
        d = MatchOut.fields({"id": 1, "path": "/p/a.jpg", "attribute": "x", "distance": raw, "probability": 0.5})["distance"]
        assert d == 0.0 and math.copysign(1.0, d) == 1.0, raw
    assert MatchOut.fields({"id": 1, "path": "/p/a.jpg", "attribute": "x", "distance": 0.25, "probability": 0.5})["distance"] == 0.25
