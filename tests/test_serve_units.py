"""Service pieces that need no model: request limits, upload sniffing, settings and CLI option parsing."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from PIL import Image

from lookalike.errors import LookalikeError
from lookalike.cli.serve import parse_rankers, settings_from_options
from lookalike.serve.errors import ApiError
from lookalike.serve.middleware import RequestGuard
from lookalike.serve.settings import ServeSettings
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


def encoded(fmt: str, size=(30, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
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


def test_ranker_options():
    assert parse_rankers(["sleeve=runs/sleeve", " neck = runs/neck "]) == {"sleeve": Path("runs/sleeve"), "neck": Path("runs/neck")}
    for bad in (["sleeve"], ["=runs/x"], ["a=x", "a=y"], ["a=x", " a =y"]):
        with pytest.raises(LookalikeError, match="--ranker"):
            parse_rankers(bad)
