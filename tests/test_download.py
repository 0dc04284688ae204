"""`lookalike download` against a local HTTP server on 127.0.0.1 that misbehaves in every way the web does."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from lookalike.cli.datatools import register
from lookalike.datatools.download import REPORT_JSON, REPORT_TSV, download, read_url_list, url_stem
from lookalike.errors import LookalikeError
from lookalike.images import open_image

SLOW_SECONDS = 2.0
TIMEOUT = 0.8
TRICKLE_INTERVAL = 1.0  # one header byte (or one 16-byte body chunk) per second


def _image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


JPEG = {i: _image_bytes(i) for i in range(12)}
PNG = _image_bytes(100, "PNG")
GIF = _image_bytes(101, "GIF")
HTML = b"<!doctype html><html><body><h1>Hotlinking not allowed</h1></body></html>"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # a full listen queue drops connections, which would look like timeouts

    def handle_error(self, request, client_address):
        pass  # the client hanging up on a slow answer is part of the test


class _Server:
    """Routes by path; counts requests per path; tracks the most requests in flight at once."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.flaky_failures = 1
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                with server.lock:
                    server.hits[path] += 1
                    hits = server.hits[path]
                self.route(path, hits)

            def send(self, status, body=b"", content_type="image/jpeg", headers=()):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def route(self, path, hits):
                if path.startswith("/good/"):
                    self.send(200, JPEG[int(path.split("/")[2].split(".")[0])])
                elif path == "/picture.png":
                    self.send(200, PNG, "image/png")
                elif path == "/anim.gif":
                    self.send(200, GIF, "image/gif")
                elif path == "/missing.jpg":
                    self.send(404, b"not found", "text/plain")
                elif path == "/slow.jpg":
                    time.sleep(SLOW_SECONDS)
                    self.send(200, JPEG[0])
                elif path == "/truncated.jpg":
                    body = JPEG[1]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                elif path == "/html-as-image.jpg":
                    self.send(200, HTML, "image/jpeg")
                elif path == "/page.jpg":
                    self.send(200, HTML, "text/html; charset=utf-8")
                elif path == "/redirect.jpg":
                    self.send(302, b"", "text/plain", [("Location", "/good/7.jpg")])
                elif path == "/flaky.jpg":
                    if hits <= server.flaky_failures:
                        self.send(503, b"busy", "text/plain", [("Retry-After", "0")])
                    else:
                        self.send(200, JPEG[8])
                elif path == "/forbidden.jpg":
                    self.send(403, b"no", "text/plain")
                elif path == "/trickle-headers.jpg":
                    # slowloris against the client: each byte arrives well inside a per-read timeout
                    head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(JPEG[2])}\r\n\r\n".encode()
                    for i in range(len(head)):
                        self.wfile.write(head[i : i + 1])
                        time.sleep(TRICKLE_INTERVAL)
                    self.wfile.write(JPEG[2])
                elif path == "/trickle-body.jpg":
                    body = JPEG[3]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for i in range(0, len(body), 16):
                        self.wfile.write(body[i : i + 16])
                        time.sleep(TRICKLE_INTERVAL)
                elif path.startswith("/busy/"):
                    # counted as in flight until just before the answer goes out, so the client
                    # (which waits for the whole answer) can never see the next one start earlier
                    with server.lock:
                        server.in_flight += 1
                        server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    time.sleep(0.15)
                    with server.lock:
                        server.in_flight -= 1
                    self.send(200, JPEG[int(path.split("/")[2].split(".")[0])])
                else:
                    self.send(404, b"", "text/plain")

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return self.base + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _write_list(path, rows):
    path.write_text("".join(f"{a}\t{u}\n" for a, u in rows), encoding="utf-8")
    return path


def _run(url_list, out, **kw):
    options = dict(workers=6, per_host=6, timeout=TIMEOUT, retries=1, backoff=0.01, progress=False)
    options.update(kw)
    return download(url_list, out, **options)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_mixed_list_keeps_good_images_and_reports_every_failure(tmp_path, server):
    good = [("dotted", server.url(f"/good/{i}.jpg")) for i in range(3)] + [("striped", server.url(f"/good/{i}.jpg")) for i in range(3, 5)]
    bad = {
        "/missing.jpg": "HTTP 404",
        "/slow.jpg": "timed out",
        "/truncated.jpg": "truncated",
        "/html-as-image.jpg": "not a usable image",
        "/page.jpg": "text/html",
        "/forbidden.jpg": "HTTP 403",
    }
    rows = good + [
        ("leopard", server.url("/picture.png")),
        ("leopard", server.url("/anim.gif")),
        ("leopard", server.url("/redirect.jpg")),
        ("dotted", server.url("/good/0.jpg")),  # the same URL again
    ] + [("striped", server.url(p)) for p in bad]
    url_list = _write_list(tmp_path / "urls.tsv", rows)
    out = tmp_path / "data"

    report = _run(url_list, out)

    # good images: byte-for-byte, at the deterministic name, under their attribute
    for attribute, url in good:
        i = int(url.rsplit("/", 1)[1].split(".")[0])
        assert (out / attribute / f"{url_stem(url)}.jpg").read_bytes() == JPEG[i]
    assert (out / "leopard" / f"{url_stem(server.url('/picture.png'))}.png").read_bytes() == PNG
    gif_as_png = out / "leopard" / f"{url_stem(server.url('/anim.gif'))}.png"
    assert Image.open(gif_as_png).format == "PNG"
    assert (out / "leopard" / f"{url_stem(server.url('/redirect.jpg'))}.jpg").read_bytes() == JPEG[7]

    # the repeated URL was fetched once and reported as repeated
    assert server.hits["/good/0.jpg"] == 1
    assert len(report.url_list.repeated) == 1

    # every failure listed once, with its reason; 404/403/not-an-image not retried, timeouts and truncation retried
    failed = {r.url.replace(server.base, ""): r for r in report.failed}
    assert set(failed) == set(bad)
    for path, reason in bad.items():
        assert reason in failed[path].reason, (path, failed[path].reason)
    assert failed["/missing.jpg"].attempts == 1 and server.hits["/missing.jpg"] == 1
    assert failed["/forbidden.jpg"].attempts == 1
    assert failed["/html-as-image.jpg"].attempts == 1
    assert failed["/slow.jpg"].attempts == 2
    assert failed["/truncated.jpg"].attempts == 2 and server.hits["/truncated.jpg"] == 2
    assert failed["/missing.jpg"].http_status == 404

    # nothing but valid images (and the reports) in the output: no partial or temporary files
    files = _files(out)
    assert sorted(files) == sorted([REPORT_JSON, REPORT_TSV] + [r.path for r in report.results if r.status == "downloaded"])
    for r in report.results:
        if r.status == "downloaded":
            open_image(out / r.path)
    assert report.summary() == {
        "urls": 14, "downloaded": 8, "existing": 0, "failed": 6, "invalid_lines": 0, "repeated_urls": 1, "conflicting_urls": 0,
    }

    saved = json.loads((out / REPORT_JSON).read_text())
    assert {f["url"] for f in saved["failed"]} == {server.url(p) for p in bad}
    assert all(f["reason"] for f in saved["failed"])
    assert next(f for f in saved["files"] if f["url"].endswith("anim.gif"))["converted_from"] == "GIF"

    # the TSV report is itself a URL list of exactly the failures
    again = read_url_list(out / REPORT_TSV)
    assert {e.url for e in again.entries} == {server.url(p) for p in bad}
    assert not again.invalid_lines


def _timed_run(url_list, out, limit, **kw):
    """`_run` in a thread, given up after `limit` seconds (a download that ignores its deadline would take a minute)."""
    box = {}

    def target():
        box["report"] = _run(url_list, out, **kw)

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    elapsed = time.monotonic() - start
    assert not thread.is_alive(), f"download still running after {elapsed:.1f} s"
    return box["report"], elapsed


def test_headers_trickled_past_the_timeout_fail_within_the_timeout(tmp_path, server):
    timeout = 2.0
    rows = [("dotted", server.url("/trickle-headers.jpg")), ("dotted", server.url("/good/4.jpg"))]
    out = tmp_path / "data"

    report, elapsed = _timed_run(_write_list(tmp_path / "urls.tsv", rows), out, 3 * timeout, timeout=timeout, retries=0)

    assert elapsed < 3 * timeout
    [failed] = report.failed
    assert failed.url == server.url("/trickle-headers.jpg")
    assert failed.reason == f"timed out after {timeout:g} s" and failed.attempts == 1
    assert (out / "dotted" / f"{url_stem(server.url('/good/4.jpg'))}.jpg").read_bytes() == JPEG[4]
    saved = json.loads((out / REPORT_JSON).read_text())
    assert [f["reason"] for f in saved["failed"]] == [f"timed out after {timeout:g} s"]


def test_body_trickled_past_the_timeout_fails_and_leaves_no_partial_file(tmp_path, server):
    timeout = 2.0
    rows = [("dotted", server.url("/trickle-body.jpg")), ("dotted", server.url("/good/5.jpg"))]
    out = tmp_path / "data"

    # one retry: each attempt gets a deadline of its own, so two attempts take about twice the timeout
    report, elapsed = _timed_run(_write_list(tmp_path / "urls.tsv", rows), out, 4 * timeout, timeout=timeout, retries=1)

    assert 2 * timeout <= elapsed < 3 * timeout
    [failed] = report.failed
    assert failed.url == server.url("/trickle-body.jpg")
    assert failed.reason.startswith(f"timed out after {timeout:g} s") and failed.attempts == 2
    assert server.hits["/trickle-body.jpg"] == 2
    # only the good file: nothing of the trickled one, not even a hidden temporary
    assert sorted(p.name for p in (out / "dotted").iterdir()) == [f"{url_stem(server.url('/good/5.jpg'))}.jpg"]


def test_rerun_skips_valid_files_and_replaces_broken_ones(tmp_path, server):
    rows = [("dotted", server.url(f"/good/{i}.jpg")) for i in range(4)] + [("dotted", server.url("/missing.jpg"))]
    url_list = _write_list(tmp_path / "urls.tsv", rows)
    out = tmp_path / "data"
    first = _run(url_list, out)
    assert first.count("downloaded") == 4

    # damage one file, and leave a temporary file behind as a killed run would
    broken = out / "dotted" / f"{url_stem(rows[1][1])}.jpg"
    broken.write_bytes(JPEG[1][:100])
    stale = out / "dotted" / f".{url_stem(rows[2][1])}.jpg.abc123.tmp"
    stale.write_bytes(b"partial")

    second = _run(url_list, out)
    assert [r.status for r in second.results] == ["existing", "downloaded", "existing", "existing", "failed"]
    assert broken.read_bytes() == JPEG[1]
    assert not stale.exists()
    assert server.hits["/good/0.jpg"] == 1 and server.hits["/good/1.jpg"] == 2
    assert server.hits["/missing.jpg"] == 2  # failures are tried again on a rerun


def test_broken_file_stays_until_a_good_one_arrives(tmp_path, server):
    """A failed download never removes or overwrites what is there; the bad file is retried next time."""
    url = server.url("/truncated.jpg")
    out = tmp_path / "data"
    existing = out / "striped" / f"{url_stem(url)}.jpg"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"old partial bytes")
    report = _run(_write_list(tmp_path / "urls.tsv", [("striped", url)]), out, retries=0)
    assert report.results[0].status == "failed"
    assert existing.read_bytes() == b"old partial bytes"
    assert _files(out / "striped") == [existing.name]


def test_server_errors_are_retried_with_backoff(tmp_path, server):
    server.flaky_failures = 2
    waits = []
    report = _run(_write_list(tmp_path / "urls.tsv", [("dotted", server.url("/flaky.jpg"))]), tmp_path / "data", retries=3, backoff=0.05, sleep=waits.append)
    assert report.results[0].status == "downloaded" and report.results[0].attempts == 3
    assert len(waits) == 2 and waits[1] > waits[0] * 0.5  # exponential: base*2**k with jitter in [0.5, 1]
    assert all(w <= 0.1 for w in waits)


def test_retries_exhausted_say_so(tmp_path, server):
    server.flaky_failures = 10
    report = _run(_write_list(tmp_path / "urls.tsv", [("dotted", server.url("/flaky.jpg"))]), tmp_path / "data", retries=2, sleep=lambda s: None)
    r = report.results[0]
    assert r.status == "failed" and r.attempts == 3 and r.http_status == 503
    assert "HTTP 503" in r.reason and "gave up after 3 attempts" in r.reason


def test_per_host_limit_is_respected(tmp_path, server):
    rows = [("dotted", server.url(f"/busy/{i}.jpg")) for i in range(8)]
    report = _run(_write_list(tmp_path / "urls.tsv", rows), tmp_path / "data", workers=8, per_host=2)
    assert report.count("downloaded") == 8
    assert server.max_in_flight == 2


def test_url_list_formats_and_problems(tmp_path):
    text = (
        "# my list\n"
        "attribute\turl\n"
        "dotted\thttp://a.test/1.jpg\n"
        "\n"
        "striped,http://a.test/2.jpg\n"
        "leopard\thttp://a.test/3.jpg#frag\textra column\n"
        "dotted\thttp://a.test/1.jpg\n"  # repeated, same attribute
        "striped\thttp://a.test/4.jpg\n"
        "dotted\thttp://a.test/4.jpg\n"  # conflicting attribute
        "only-one-column\n"
        "../evil\thttp://a.test/5.jpg\n"
        "dotted\tftp://a.test/6.jpg\n"
    )
    p = tmp_path / "urls.txt"
    p.write_text(text, encoding="utf-8")
    lst = read_url_list(p)
    assert [(e.attribute, e.url, e.line) for e in lst.entries] == [
        ("dotted", "http://a.test/1.jpg", 3),
        ("striped", "http://a.test/2.jpg", 5),
        ("leopard", "http://a.test/3.jpg", 6),
    ]
    assert [r["line"] for r in lst.repeated] == [7]
    assert lst.conflicts == [{"line": 9, "url": "http://a.test/4.jpg", "attribute": "dotted", "first_line": 8, "first_attribute": "striped"}]
    assert [r["line"] for r in lst.invalid_lines] == [10, 11, 12]
    assert "two columns" in lst.invalid_lines[0]["reason"]
    assert "folder name" in lst.invalid_lines[1]["reason"]
    assert "http" in lst.invalid_lines[2]["reason"]


def test_missing_list_is_a_clear_error(tmp_path):
    with pytest.raises(LookalikeError, match="does not exist"):
        read_url_list(tmp_path / "nope.tsv")


def test_cli_download(tmp_path, server):
    app = typer.Typer()
    register(app)
    url_list = _write_list(tmp_path / "urls.tsv", [("dotted", server.url("/good/1.jpg")), ("dotted", server.url("/missing.jpg"))])
    out = tmp_path / "data"
    result = CliRunner().invoke(app, ["download", str(url_list), "--out", str(out), "--no-progress", "--timeout", "2", "--retries", "0"])
    assert result.exit_code == 3, result.output  # a partial success: one URL failed, and the report says why
    assert "1 downloaded, 0 already there, 1 failed" in result.output
    assert "HTTP 404" in result.output
    assert (out / REPORT_JSON).exists()

    nothing = _write_list(tmp_path / "bad.tsv", [("dotted", server.url("/missing.jpg"))])
    result = CliRunner().invoke(app, ["download", str(nothing), "--out", str(tmp_path / "other"), "--no-progress", "--retries", "0"])
    assert isinstance(result.exception, LookalikeError)  # lookalike.cli.main prints it as a one-line error
    assert "no image could be downloaded" in str(result.exception)


def test_file_names_are_sha1_of_the_url():
    url = "https://example.com/a.jpg"
    assert url_stem(url) == hashlib.sha1(url.encode()).hexdigest()[:16]
