"""The hostile-input corpus (tests/hostile.py) against every entry point that reads images.

`run`, `index add`, `dedup` and `featurize-dir` must list every hostile file as skipped with a clear
reason and exit 0; the REST endpoints must answer every hostile upload with a 4xx JSON error; the
Ray decoding step must report each as failed. All within a time limit, without a memory blow-up and
without leaving a temporary or half-written file behind. Also here: the service-side regressions of
issue 14 (an index rebuilt under a running service, a catalog file swapped after indexing).
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import make_dataset
from hostile import EXPECTED, upload_cases, write_corpus
from lookalike.index import ImageIndex
from lookalike.index.build import build_index
from lookalike.serve.app import create_app
from lookalike.serve.service import Service
from lookalike.serve.settings import ServeSettings

KEY = "hostile-key-0123456789"
#: Cases the directory walkers never read: a folder named *.jpg is walked into, not opened.
WALKED = {"folder"}
LIMIT_S = 240


def lookalike(*args, env: dict, code: int = 0) -> subprocess.CompletedProcess:
    """Run the CLI; `code` 3 is a partial success (some inputs skipped, each with its reason)."""
    proc = subprocess.run([sys.executable, "-m", "lookalike", *map(str, args)], capture_output=True, text=True, env=env, timeout=LIMIT_S)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def assert_every_case_skipped(skipped: list[dict], allowed_missing=WALKED) -> None:
    reasons = {Path(s["path"]).name.split(".")[0]: s["reason"] for s in skipped}  # a link may be reported by its target, <name>.missing.jpg
    for name, fragment in EXPECTED.items():
        if name in allowed_missing:
            continue
        assert name in reasons, f"{name} was not reported as skipped (skipped: {sorted(reasons)})"
        assert fragment.lower() in reasons[name].lower(), f"{name}: {reasons[name]!r} does not say {fragment!r}"


def no_temporary_files(*folders: Path) -> None:
    for folder in folders:
        left = [p for p in Path(folder).rglob("*") if ".tmp" in p.name]
        assert not left, f"temporary files left behind: {left}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return os.environ | {"LOOKALIKE_CACHE_DIR": str(tmp_path_factory.mktemp("hostile-cache")), "COLUMNS": "400"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env):
    """`lookalike run` on small textures with the whole corpus mixed into one attribute folder (the run entry point's test)."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_dataset(root / "data", per_attribute=10)
    write_corpus(data / "stripes")
    clean = make_dataset(root / "clean", per_attribute=4)
    (root / "small.toml").write_text(
        "[data]\ntrain_queries_per_attribute = 6\ntest_queries_per_attribute = 3\nvalidation_ratio = 0\n[evaluate]\nquery_pictures = 1\n[refine]\nepochs = 0\n"
    )
    proc = lookalike("run", "--data", data, "--out", root / "run", "--splits", "1", "--config", root / "small.toml", env=env)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE_DIR", env["LOOKALIKE_CACHE_DIR"])
        build_index(root / "run", clean, root / "index", progress=False)
    corpus = root / "corpus"
    write_corpus(corpus)
    return SimpleNamespace(root=root, data=data, run=root / "run", index=root / "index", corpus=corpus, log=proc.stdout + proc.stderr)


def test_run_skips_every_hostile_file(trained):
    dataset = json.loads((trained.run / "dataset.json").read_text())
    assert_every_case_skipped(dataset["skipped"])
    assert all(Path(im["path"]).stem not in EXPECTED for im in dataset["images"])
    assert "skipped stripes/giant_strip.png: image is 80000000x1, an aspect ratio over 50:1" in trained.log
    no_temporary_files(trained.run)


def test_index_add_skips_every_hostile_file(trained, env, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(trained.index, index)
    before = ImageIndex.open(index).size
    report = json.loads(lookalike("index", "add", index, trained.corpus, "--json", env=env, code=3).stdout)
    assert report["added"] == 0
    assert_every_case_skipped(report["skipped"])
    with ImageIndex.open(index, writable=True) as ix:  # the writer lock is free again
        assert ix.size == before
    no_temporary_files(index)


def test_dedup_skips_every_hostile_file(trained, env, tmp_path):
    out = lookalike("dedup", trained.corpus, "--dry-run", "--report", tmp_path / "report.json", "--no-progress", env=env, code=3).stdout  # a partial success
    assert "0 duplicate group(s)" in out
    skipped = json.loads((tmp_path / "report.json").read_text())["unreadable"]
    assert_every_case_skipped(skipped)


def test_featurize_dir_skips_every_hostile_file(trained, env, tmp_path):
    out = tmp_path / "feats.npy"
    proc = lookalike("featurize-dir", trained.corpus, "--out", out, "--run", trained.run, env=env, code=3)
    assert f"skipped {len(EXPECTED) - len(WALKED)}" in proc.stdout
    reasons = [line.removeprefix("skipped ").split(": ", 1) for line in proc.stderr.splitlines() if line.startswith("skipped ")]
    assert_every_case_skipped([{"path": p, "reason": r} for p, r in reasons])
    assert np.load(out).shape[0] == 0
    no_temporary_files(tmp_path)


def test_ray_decoding_reports_every_hostile_file(trained):
    """The step each Ray task runs on a block of files (test_ray.py runs the whole Ray path on good photos)."""
    from lookalike.distributed.pipeline import decode_block
    from lookalike.model import SimilarityModel

    config = SimilarityModel.load(trained.run).backbone_.config
    paths = sorted(str(p) for p in trained.corpus.iterdir())
    row = {"block": 0, "shard": 0, "paths": paths, "attributes": [None] * len(paths), "sizes": [0] * len(paths), "mtimes": [0.0] * len(paths)}
    out = decode_block(row, config.__dict__)
    assert out["paths"] == [] and out["pixels"].shape[0] == 0
    assert_every_case_skipped(json.loads(out["failed"]), allowed_missing=set())


# ---- the service -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(trained, tmp_path_factory, env):
    index = tmp_path_factory.mktemp("served") / "index"
    shutil.copytree(trained.index, index)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE_DIR", env["LOOKALIKE_CACHE_DIR"])
        engine = Service(ServeSettings(index_dir=index, allow_writes=True, api_key=KEY, max_upload_mb=2))
    with TestClient(create_app(engine)) as client:
        yield SimpleNamespace(client=client, engine=engine, index=index, uploads=engine.settings.resolved_upload_dir())
    engine.close()


def good_png() -> bytes:
    path = make_dataset(Path(os.environ["LOOKALIKE_CACHE_DIR"]) / "good", per_attribute=1, kinds=("dots",)) / "dots" / "000.png"
    return path.read_bytes()


@pytest.mark.parametrize("case", upload_cases(), ids=lambda c: c.name)
def test_rest_answers_every_hostile_upload_with_a_4xx(service, case):
    client = service.client
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    files = {"image": (f"{case.name}{case.suffix}", case.data, "image/png")}
    answers = {
        "/search": client.post("/search", files=files),
        "/compare": client.post("/compare", files={"first": files["image"], "second": ("good.png", good_png(), "image/png")}),
        "/catalog": client.post("/catalog", files={"images": files["image"]}, headers={"X-API-Key": KEY}),
    }
    for route, r in answers.items():
        assert 400 <= r.status_code < 500, f"{route}: {r.status_code} {r.text}"
        body = r.json()
        assert set(body) == {"error", "detail"} and "Traceback" not in body["detail"]
    assert "aspect ratio" in answers["/search"].json()["detail"] or case.reason != "aspect ratio"
    assert not service.uploads.exists() or not any(service.uploads.iterdir()), "a refused upload was stored"
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024 < 300, "peak memory grew by over 300 MB"


def test_service_refuses_to_search_an_index_rebuilt_with_another_model(trained, env, tmp_path):
    """Issue 14 item 2: `index build --overwrite` with another run while serving."""
    index = tmp_path / "index"
    shutil.copytree(trained.index, index)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE_DIR", env["LOOKALIKE_CACHE_DIR"])
        engine = Service(ServeSettings(index_dir=index))
    try:
        with TestClient(create_app(engine)) as client:
            assert client.get("/healthz").status_code == 200
            with ImageIndex.open(index) as old:
                dim, metric = old.dim, old.metric
            with ImageIndex.create(index, dim, metric, backbone_fingerprint="another-run", run_dir="/elsewhere", overwrite=True) as rebuilt:
                rebuilt.add([], np.zeros((0, dim), np.float32))
                rebuilt.finish_build()
            for r in (client.get("/healthz"), client.post("/search", files={"image": ("q.png", good_png(), "image/png")})):
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "model_mismatch" and "restart" in r.json()["detail"]
    finally:
        engine.close()


def test_catalog_file_swapped_after_indexing_is_not_served(service):
    """Issue 14 item 4: a symlink to /etc/passwd, or other content, put in place of an indexed file."""
    client = service.client
    with ImageIndex.open(service.index) as ix:
        entries = list(ix.entries_by_path().values())[:3]
    first, second, third = entries
    assert client.get(f"/images/{first.id}").content == Path(first.path).read_bytes()
    os.replace(first.path, first.path + ".orig")
    os.symlink("/etc/passwd", first.path)
    Path(second.path).write_bytes(b"not an image any more")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(third.path)
    try:
        for entry in (first, second, third):
            for url in (f"/images/{entry.id}", f"/images/{entry.id}/thumbnail"):
                r = client.get(url)
                assert r.status_code == 404, (url, r.status_code)
                assert r.json()["error"] == "image_changed" and "root:" not in r.text and entry.path not in r.text
    finally:
        os.unlink(first.path)
        os.replace(first.path + ".orig", first.path)


# ---- slow clients against the real server (issue 14 item 3) -------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(trained, env):
    port = free_port()
    cmd = [sys.executable, "-m", "lookalike", "serve", "--index", trained.index, "--port", port, "--timeout", "2", "--header-timeout", "2", "--upload-deadline", "4"]
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("lookalike serve did not start")
        yield port
    finally:
        proc.terminate()
        proc.wait(30)


def drip(sock: socket.socket, data: bytes, every_s: float, for_s: float) -> float:
    """Send `data` one byte every `every_s` until the server closes the connection; seconds it stayed open."""
    start = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        ready, _, _ = select.select([sock], [], [], every_s)
        if ready:
            try:
                if not sock.recv(65536):
                    break
            except OSError:
                break
            return time.monotonic() - start
        if time.monotonic() - start > for_s:
            break
    return time.monotonic() - start


def test_headers_dripped_byte_by_byte_are_cut_off(live_server):
    with socket.create_connection(("127.0.0.1", live_server)) as sock:
        held = drip(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200, every_s=0.25, for_s=15)
    assert held < 5, f"a connection sending headers at 4 bytes/s was held {held:.1f} s (header timeout 2 s)"


def test_a_body_trickled_under_the_stall_limit_meets_the_deadline(live_server):
    with socket.create_connection(("127.0.0.1", live_server)) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n")
        sock.sendall(b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n')
        start = time.monotonic()
        answer = b""
        for _ in range(40):  # one byte every 0.5 s: under the 2 s stall limit, over the 4 s deadline
            sock.sendall(b"x")
            ready, _, _ = select.select([sock], [], [], 0.5)
            if ready:
                break
        held = time.monotonic() - start
        # the answer may arrive in several segments: read until the server closes the connection
        sock.settimeout(5)
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"longer than 4 s in all" in answer and held < 7
