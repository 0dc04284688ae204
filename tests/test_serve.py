"""The web service on a real trained run and index of real photos: REST API, bad input, writes, schema fuzzing, browser."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import schemathesis
from schemathesis import GenerationMode
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from conftest import launch_chromium, lookalike_cli, require_playwright
from lookalike.serve.app import create_app
from lookalike.index import ImageIndex
from lookalike.index.catalog import ImageEntry
from lookalike.serve.service import Service
from lookalike.index.build import build_index
from lookalike.results import SearchOut
from lookalike.serve.settings import ServeSettings

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ATTRIBUTES = ("dotted", "leopard", "striped")
PER_ATTRIBUTE = 14
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="session")
def served(small_run):
    """The suite's small run and an index of the same photos (built once)."""
    root = small_run.root
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE_DIR", str(root / "cache"))
        assert build_index(small_run.run, small_run.data, root / "index", progress=False)[1]["images"] == PER_ATTRIBUTE * len(ATTRIBUTES)
    return SimpleNamespace(root=root, data=small_run.data, run=small_run.run, index=root / "index")


@pytest.fixture(scope="session")
def engine(served):
    eng = Service(ServeSettings(index_dir=served.index))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def client(engine):
    with TestClient(create_app(engine), raise_server_exceptions=True) as c:
        yield c


def writable_app(served, name: str, extra_rankers=None):
    """A copy of the index served with writes on and a key (each copy is changed by one group of tests only)."""
    index = served.root / name
    shutil.copytree(served.index, index)
    eng = Service(ServeSettings(index_dir=index, allow_writes=True, api_key=KEY, upload_dir=served.root / f"{name}-uploads"), extra_rankers)
    return eng, index


def stricter_run(served) -> Path:
    """The served run with its Platt offset lowered by 2: the same distances, genuinely lower probabilities."""
    run = served.root / "run-strict"
    if not run.exists():
        shutil.copytree(served.run, run)
        metric = run / "split-0" / "metric.json"
        model = json.loads(metric.read_text())
        model["platt_b"] -= 2.0
        metric.write_text(json.dumps(model))
    return run


@pytest.fixture(scope="session")
def writable(served):
    """Writes on, and a second ranker for /compare that disagrees with the first."""
    eng, index = writable_app(served, "index-writable", {"strict": stricter_run(served)})
    with TestClient(create_app(eng)) as c:
        yield SimpleNamespace(client=c, engine=eng, index=index, uploads=served.root / "index-writable-uploads")
    eng.close()


def photo(served, attribute: str, i: int = 0) -> Path:
    return sorted((served.data / attribute).iterdir())[i]


def upload(path_or_bytes, name: str = "query.jpg", content_type: str = "image/jpeg"):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return (name, data, content_type)


def assert_error(response, status: int, error: str | None = None, mentions: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    assert "Traceback" not in response.text and "File \"" not in response.text
    if error:
        assert body["error"] == error, body
    if mentions:
        assert mentions in body["detail"], body
    return body


# ---- search -----------------------------------------------------------------------------------


def test_search_returns_the_photo_itself_first_then_nearest_first(served, client):
    query = photo(served, "striped", 3)
    r = client.post("/search", files={"image": upload(query)}, data={"top": "7"})
    assert r.status_code == 200, r.text
    body = r.json()
    with Image.open(query) as img:
        assert (body["query"]["width"], body["query"]["height"]) == img.size and body["query"]["format"] == "JPEG"
    results = body["results"]
    assert len(results) == 7
    assert results[0]["name"] == query.name and results[0]["attribute"] == "striped"
    distances = [m["distance"] for m in results]
    assert distances == sorted(distances)
    assert all(0 <= m["probability"] <= 1 for m in results)
    assert [m["probability"] for m in results] == sorted((m["probability"] for m in results), reverse=True)
    assert all(m["image_url"] == f"/images/{m['id']}" and m["thumbnail_url"] == f"/images/{m['id']}/thumbnail" for m in results)
    assert all("/" not in m["name"] for m in results), "server paths are never exposed"


def test_warm_service_and_retrieve_never_load_torch(served, client, monkeypatch):
    """With the model's ONNX export cached, starting the service, a search and a `retrieve` run without PyTorch
    (importing it alone takes seconds), and answer exactly as the session's service and an in-process retrieve do."""
    from lookalike.retrieval import retrieve

    query = photo(served, "leopard", 2)
    code = f"""
import json, sys
from fastapi.testclient import TestClient
from lookalike.retrieval import retrieve
from lookalike.serve.app import create_app
from lookalike.serve.service import Service
from lookalike.serve.settings import ServeSettings
service = Service(ServeSettings(index_dir={str(served.index)!r}))
with TestClient(create_app(service)) as c:
    r = c.post("/search", files={{"image": ("q.jpg", open({str(query)!r}, "rb").read(), "image/jpeg")}}, data={{"top": "5"}})
    assert r.status_code == 200, r.text
service.close()
matches = [[m.path, m.distance] for m in retrieve({str(served.run)!r}, {str(query)!r}, top=5)]
print(json.dumps([[[m["id"], m["distance"]] for m in r.json()["results"]], matches, sorted(m for m in ("torch", "matplotlib") if m in sys.modules)]))
"""
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(served.root / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    searched, retrieved, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == []
    expected = client.post("/search", files={"image": upload(query)}, data={"top": "5"}).json()["results"]
    assert [m[0] for m in searched] == [m["id"] for m in expected]
    np.testing.assert_allclose([m[1] for m in searched], [m["distance"] for m in expected], atol=1e-6)
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(served.root / "cache"))
    in_process = retrieve(served.run, query, top=5)
    assert [m[0] for m in retrieved] == [m.path for m in in_process]
    np.testing.assert_allclose([m[1] for m in retrieved], [m.distance for m in in_process], atol=1e-6)


def test_format_is_sniffed_from_content_not_from_name_or_header(served, client):
    buf = io.BytesIO()
    with Image.open(photo(served, "leopard")) as img:
        img.save(buf, "PNG")
    r = client.post("/search", files={"image": upload(buf.getvalue(), "holiday.jpg", "image/jpeg")}, data={"top": "3"})
    assert r.status_code == 200 and r.json()["query"]["format"] == "PNG"
    assert r.json()["results"][0]["name"] == photo(served, "leopard").name
    text = b"GIF89a? no: just text pretending to be an image"
    assert_error(client.post("/search", files={"image": upload(text, "cat.png", "image/png")}), 415, "unsupported_media_type", "content is checked")


def test_attribute_filter_keeps_only_that_attribute(served, client):
    r = client.post("/search", files={"image": upload(photo(served, "dotted"))}, data={"top": "20", "attribute": "leopard"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == PER_ATTRIBUTE and {m["attribute"] for m in results} == {"leopard"}
    assert r.json()["attribute"] == "leopard"
    assert_error(
        client.post("/search", files={"image": upload(photo(served, "dotted"))}, data={"attribute": "paisley"}),
        422,
        "unknown_attribute",
        "dotted, leopard, striped",
    )
    # an empty attribute means all of them, in the form and in the query string alike
    everything = client.get("/images/3/similar?top=20").json()["results"]
    assert client.get("/images/3/similar?top=20&attribute=").json()["results"] == everything
    assert client.post("/search", files={"image": upload(photo(served, "dotted"))}, data={"top": "20", "attribute": ""}).json()["attribute"] is None


def test_attribute_filter_widens_its_shortlist_until_it_has_enough(served, client):
    query = photo(served, "dotted", 4)
    everything = client.post("/search", files={"image": upload(query)}, data={"top": "42"}).json()["results"]
    leopards = [m["id"] for m in everything if m["attribute"] == "leopard"]
    # the first shortlist (4 x top = 8 nearest) holds fewer than 2 leopards: the filter has to search wider
    assert sum(m["attribute"] == "leopard" for m in everything[:8]) < 2
    r = client.post("/search", files={"image": upload(query)}, data={"top": "2", "attribute": "leopard"})
    assert [m["id"] for m in r.json()["results"]] == leopards[:2]


def test_similar_by_id_matches_upload_search_without_the_image_itself(served, client):
    query = photo(served, "dotted", 2)
    by_upload = client.post("/search", files={"image": upload(query)}, data={"top": "6"}).json()["results"]
    own_id = by_upload[0]["id"]
    r = client.get(f"/images/{own_id}/similar", params={"top": 5})
    assert r.status_code == 200
    by_id = r.json()
    assert by_id["query"]["id"] == own_id
    assert [m["id"] for m in by_id["results"]] == [m["id"] for m in by_upload[1:]]
    np.testing.assert_allclose([m["distance"] for m in by_id["results"]], [m["distance"] for m in by_upload[1:]], rtol=1e-4, atol=1e-5)
    assert_error(client.get("/images/100000/similar"), 404, "not_found")


def similar_answer(response) -> dict:
    """A /similar answer without its took_ms, the one field that differs between two answers to one question; of SearchOut's shape."""
    assert response.status_code == 200, response.text
    body = response.json()
    assert SearchOut.model_validate(body).model_dump(mode="json") == body, "the same keys and values as the documented model"
    assert body.pop("took_ms") >= 0
    return body


def cache_lookups(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {result: float(re.search(rf'lookalike_similar_cache_lookups_total{{result="{result}"}} (\S+)', text)[1]) for result in ("hit", "miss")}


def catalog(index: Path) -> dict[int, ImageEntry]:
    with ImageIndex.open(index) as ix:
        return {e.id: e for e in ix.entries_by_path().values()}


SIMILAR_QUERIES = [{}, {"top": "5"}, {"top": "40", "attribute": "leopard"}, {"top": "100", "min_probability": "0.5"}, {"attribute": "striped", "min_probability": "0.25"}]


def test_cached_similar_answers_equal_searched_ones(served, client):
    uncached_engine = Service(ServeSettings(index_dir=served.index, similar_cache_mb=0))
    try:
        with TestClient(create_app(uncached_engine)) as uncached:
            before = cache_lookups(client)
            for image_id in (2, 7):
                for params in SIMILAR_QUERIES:
                    searched = similar_answer(uncached.get(f"/images/{image_id}/similar", params=params))
                    assert searched["query"]["id"] == image_id and (searched["results"] or "attribute" in params or "min_probability" in params)
                    assert similar_answer(client.get(f"/images/{image_id}/similar", params=params)) == searched
                    assert similar_answer(client.get(f"/images/{image_id}/similar", params=params)) == searched  # from the cache
                    # written with a leading zero, the request goes through FastAPI's validation instead of the lane: the same answer
                    routed = {**params, "top": "0" + params.get("top", "15")}
                    assert similar_answer(uncached.get(f"/images/{image_id}/similar", params=routed)) == searched
            after = cache_lookups(client)
            assert after["hit"] - before["hit"] >= 2 * len(SIMILAR_QUERIES)
            assert cache_lookups(uncached) == {"hit": 0, "miss": 4 * len(SIMILAR_QUERIES)}
            assert_error(client.get("/images/100000/similar"), 404, "not_found")
            assert_error(client.get("/images/2/similar", params={"attribute": "plaid"}), 422, "unknown_attribute")
            assert_error(client.get("/images/2/similar", params={"top": "0"}), 422, "invalid_request", "top")
            lane = client.get("/images/2/similar")
            assert lane.headers["x-content-type-options"] == "nosniff" and lane.headers["content-type"] == "application/json"
            assert 'lookalike_http_requests_total{method="GET",route="/images/{image_id}/similar",status="200"}' in client.get("/metrics").text
    finally:
        uncached_engine.close()


def test_similar_answers_follow_every_change_of_the_index(served):
    """Answers come from the cache until the index changes: through the API, or the CLI in another process."""
    eng, index = writable_app(served, "index-similar")
    auth = {"X-API-Key": KEY}
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(served.root / "cache")}
    query = photo(served, "striped", 5)
    entries = catalog(index)
    own = next(i for i, e in entries.items() if e.attribute == "striped" and Path(e.path).name == query.name)
    url = f"/images/{own}/similar?top=5"
    try:
        with TestClient(create_app(eng)) as c:
            first = similar_answer(c.get(url))
            assert similar_answer(c.get(url)) == first and cache_lookups(c) == {"hit": 1, "miss": 1}
            ids = [m["id"] for m in first["results"]]

            buf = io.BytesIO()
            with Image.open(query) as img:
                img.save(buf, "PNG")  # the query photo as new content: its nearest look-alike once added
            r = c.post("/catalog", files=[("images", upload(buf.getvalue(), "copy.png", "image/png"))], data={"attribute": "striped"}, headers=auth)
            copy_id = r.json()["added"][0]["id"]
            assert [m["id"] for m in similar_answer(c.get(url))["results"]] == [copy_id] + ids[:4]
            assert c.delete(f"/catalog/{copy_id}", headers=auth).status_code == 200
            assert similar_answer(c.get(url)) == first

            nearest = entries[ids[0]]
            lookalike_cli("index", "remove", index, nearest.path, env=env)
            without = similar_answer(c.get(url))
            assert [m["id"] for m in without["results"]][:4] == ids[1:] and ids[0] not in {m["id"] for m in without["results"]}
            lookalike_cli("index", "compact", index, env=env)
            assert similar_answer(c.get(url)) == without, "compaction keeps ids and answers"
            lookalike_cli("index", "add", index, Path(nearest.path).parent, env=env)
            back = similar_answer(c.get(url))
            assert [m["name"] for m in back["results"]] == [m["name"] for m in first["results"]] and back["results"][0]["id"] not in ids
            assert cache_lookups(c)["hit"] == 1, "every answer after a change was searched again"
    finally:
        eng.close()


def test_the_similar_cache_stays_within_its_memory_bound(served):
    eng = Service(ServeSettings(index_dir=served.index, similar_cache_mb=0.01))  # 10 KiB: a few answers of 15 matches
    ids = sorted(catalog(served.index))
    try:
        with TestClient(create_app(eng)) as c:
            for image_id in ids:
                similar_answer(c.get(f"/images/{image_id}/similar"))
            held = float(re.search(r"^lookalike_similar_cache_bytes (\S+)$", c.get("/metrics").text, re.M)[1])
            assert 0 < held <= 0.01 * 1024 * 1024
            before = cache_lookups(c)
            similar_answer(c.get(f"/images/{ids[0]}/similar"))  # long since dropped
            similar_answer(c.get(f"/images/{ids[-1]}/similar"))  # the last one asked for
            after = cache_lookups(c)
            assert (after["miss"] - before["miss"], after["hit"] - before["hit"]) == (1, 1)
    finally:
        eng.close()


def test_compare_agrees_with_search_and_fuses_rankers(served, client, writable):
    a, b = photo(served, "striped", 0), photo(served, "leopard", 1)
    r = client.post("/compare", files={"first": upload(a, "a.jpg"), "second": upload(b, "b.jpg")})
    assert r.status_code == 200, r.text
    cmp = r.json()
    ranked = client.post("/search", files={"image": upload(a)}, data={"top": "42"}).json()["results"]
    match = next(m for m in ranked if m["name"] == b.name)
    assert cmp["distance"] == pytest.approx(match["distance"], rel=1e-4, abs=1e-5)
    assert cmp["probability"] == pytest.approx(match["probability"], rel=1e-4, abs=1e-5)
    assert len(cmp["rankers"]) == 1 and cmp["fused_probability"] == pytest.approx(cmp["probability"])
    # two rankers that disagree (the second's Platt offset is 2 lower): each is reported, and they are averaged
    two = writable.client.post("/compare", files={"first": upload(a, "a.jpg"), "second": upload(b, "b.jpg")}).json()
    assert [s["name"] for s in two["rankers"]] == ["run", "strict"]
    first, strict = two["rankers"]
    assert strict["distance"] == pytest.approx(first["distance"]) and first["probability"] == pytest.approx(cmp["probability"])
    logit = np.log(first["probability"] / (1 - first["probability"]))
    assert strict["probability"] == pytest.approx(1 / (1 + np.exp(2.0 - logit)), rel=1e-6)
    assert two["fused_probability"] == pytest.approx((first["probability"] + strict["probability"]) / 2, rel=1e-9)
    same = client.post("/compare", files={"first": upload(a, "a.jpg"), "second": upload(a, "again.jpg")}).json()
    assert same["distance"] == 0 and str(same["distance"]) == "0.0" and all(str(s["distance"]) == "0.0" for s in same["rankers"]), same


# ---- micro-batching ----------------------------------------------------------------------------


class CountingModel:
    """The model's engine, noting the batch size of every call; `seconds` slows each call down."""

    def __init__(self, engine, seconds: float = 0.0):
        self.engine = engine
        self.seconds = seconds
        self.sizes: list[int] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        time.sleep(self.seconds)
        return self.engine(batch)


@contextmanager
def counted_engine(served, seconds: float = 0.0, **settings):
    """An engine of its own over the shared index, with `settings` and a CountingModel in place of its model's engine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE_DIR", str(served.root / "cache"))
        eng = Service(ServeSettings(index_dir=served.index, **settings))
        counting = CountingModel(eng.model.engine(), seconds)
        mp.setattr(eng.model, "engine", lambda *args, **kwargs: counting)
        try:
            yield eng, counting
        finally:
            eng.close()


def asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60)


async def search_all(client: httpx.AsyncClient, files: list) -> list[httpx.Response]:
    """POST /search once per file, all at once."""
    return await asyncio.gather(*(client.post("/search", files={"image": f}, data={"top": "5"}) for f in files))


def test_uploads_that_arrive_together_share_one_model_call(served):
    queries = [photo(served, attribute, 5) for attribute in ATTRIBUTES]
    truncated = photo(served, "dotted", 6).read_bytes()
    truncated = truncated[: len(truncated) // 3]

    async def go(app, counting):
        async with asgi_client(app) as client:
            together = await search_all(client, [upload(truncated, "broken.jpg")] + [upload(q) for q in queries])
            assert counting.sizes == [3], "the three good uploads were embedded in one call"
            alone = [(await search_all(client, [upload(q)]))[0] for q in queries[:2]]
            assert counting.sizes == [3, 1, 1]
        return together, alone

    with counted_engine(served, max_batch=3, batch_wait_ms=1000) as (eng, counting):
        together, alone = asyncio.run(go(create_app(eng), counting))
    assert_error(together[0], 422, "bad_image", "broken.jpg")
    for query, batched in zip(queries, together[1:]):
        assert batched.status_code == 200, batched.text
        assert batched.json()["results"][0]["name"] == query.name
    for batched, single in zip(together[1:], alone):
        assert [m["id"] for m in batched.json()["results"]] == [m["id"] for m in single.json()["results"]]
        np.testing.assert_allclose([m["distance"] for m in batched.json()["results"]], [m["distance"] for m in single.json()["results"]], atol=1e-5)


def test_overload_is_answered_503_and_the_service_recovers(served):
    query = photo(served, "leopard", 1)

    async def go(eng, counting):
        async with asgi_client(create_app(eng)) as client:
            start = time.monotonic()
            crowd = await search_all(client, [upload(photo(served, "leopard", i)) for i in range(3)])
            answered = time.monotonic() - start
            while eng.jobs_running:  # the slow call keeps its slot until it really ends
                await asyncio.sleep(0.05)
            counting.seconds = 0
            (after,) = await search_all(client, [upload(query)])
        return crowd, answered, after

    with counted_engine(served, seconds=2.0, max_concurrency=1, timeout_s=1.0) as (eng, counting):
        crowd, answered, after = asyncio.run(asyncio.wait_for(go(eng, counting), 60))
    assert answered < 1.9, "answered at the timeout, not after the slow model call"
    for r in crowd:
        assert_error(r, 503, "busy", "retry shortly")
        assert r.headers["retry-after"] == "1"
    assert after.status_code == 200 and after.json()["results"][0]["name"] == query.name


# ---- images by id -----------------------------------------------------------------------------


def test_images_and_thumbnails_by_id_only(served, client):
    query = photo(served, "leopard", 4)
    first = client.post("/search", files={"image": upload(query)}, data={"top": "1"}).json()["results"][0]
    r = client.get(first["image_url"])
    assert r.status_code == 200 and r.content == query.read_bytes() and r.headers["content-type"] == "image/jpeg"
    t = client.get(first["thumbnail_url"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(t.content)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 256
    assert client.get(first["thumbnail_url"]).content == t.content  # served from the cache
    assert_error(client.get("/images/99999"), 404, "not_found")
    assert_error(client.get("/images/-1"), 422, "invalid_request")
    assert_error(client.get("/images/abc"), 422, "invalid_request")
    assert_error(client.get("/images/99999999999999999999999"), 422, "invalid_request")
    for sneaky in ("/images/..%2F..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd", "/static/..%2F..%2Fengine.py"):
        r = client.get(sneaky)
        assert r.status_code in (404, 422), (sneaky, r.status_code)
        assert b"root:" not in r.content and b"import" not in r.content


def test_missing_catalog_file_is_a_404_that_keeps_its_path_secret(served, writable):
    w, auth = writable.client, {"X-API-Key": KEY}
    buf = io.BytesIO()
    with Image.open(photo(served, "striped", 7)) as img:
        img.transpose(Image.FLIP_LEFT_RIGHT).save(buf, "PNG")
    (added,) = w.post("/catalog", files=[("images", upload(buf.getvalue(), "gone.png", "image/png"))], headers=auth).json()["added"]
    (stored,) = [p for p in writable.uploads.iterdir() if p.read_bytes() == buf.getvalue()]
    assert w.get(added["thumbnail_url"]).status_code == 200  # now cached
    stored.unlink()
    try:
        for url in (added["image_url"], added["thumbnail_url"]):
            body = assert_error(w.get(url), 404, "image_missing", "no longer available")
            assert str(writable.uploads) not in body["detail"]
    finally:
        w.delete(f"/catalog/{added['id']}", headers=auth)


def test_busy_index_and_overload_answer_with_retry_after(served, writable, monkeypatch):
    w, auth = writable.client, {"X-API-Key": KEY}
    with ImageIndex.open(writable.index, writable=True):  # another process's update in progress
        r = w.post("/catalog", files=[("images", upload(photo(served, "dotted", 1)))], headers=auth)
        assert_error(r, 409, "index_busy", "retry")
        assert r.headers["retry-after"] == "5"
        assert_error(w.delete("/catalog/1", headers=auth), 409, "index_busy")
    # one model slot, held for 3 s by a slow request: a second request gives up after its 0.5 s timeout
    eng = Service(ServeSettings(index_dir=served.index, max_concurrency=1, timeout_s=0.5))
    preprocess = eng.preprocess
    monkeypatch.setattr(eng, "preprocess", lambda u: (time.sleep(3), preprocess(u))[1])
    try:
        with TestClient(create_app(eng)) as c:
            def search():
                return c.post("/search", files={"image": upload(photo(served, "dotted"))}, data={"top": "1"})

            slow = threading.Thread(target=search)
            slow.start()
            time.sleep(0.5)
            r = search()
            slow.join()
        assert_error(r, 503, "busy", "no model slot became free")
        assert r.headers["retry-after"] == "1"
    finally:
        eng.close()


# ---- bad input --------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims another size: a decompression bomb's calling card."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_every_bad_upload_gets_a_4xx_that_says_what_was_wrong(served, client):
    good = photo(served, "dotted").read_bytes()
    cases = [
        (b"", 422, "empty_file", "empty"),
        (b"%PDF-1.4 not an image", 415, "unsupported_media_type", "not a JPEG"),
        (good[: len(good) // 3], 422, "bad_image", "truncated"),
        (png_claiming(40_000, 40_000), 413, "image_too_large", "decompression bomb"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "unsupported_media_type", None),
    ]
    for data, status, error, mentions in cases:
        assert_error(client.post("/search", files={"image": upload(data, "x.jpg")}), status, error, mentions)
    assert_error(client.post("/search", data={"top": "3"}), 422, "invalid_request", "image")
    assert_error(client.post("/search", files={"image": upload(good)}, data={"top": "0"}), 422, "invalid_request", "top")
    assert_error(client.post("/search", files={"image": upload(good)}, data={"top": "many"}), 422, "invalid_request", "top")
    assert_error(client.post("/search", content=b"{}", headers={"content-type": "application/json"}), 422, "invalid_request")
    assert_error(client.post("/compare", files={"first": upload(good)}), 422, "invalid_request", "second")
    too_big = b"\xff\xd8\xff" + b"\0" * (21 * 1024 * 1024)
    assert_error(client.post("/search", files={"image": upload(too_big)}), 413, "content_too_large", "20 MB")
    assert_error(client.get("/no/such/page"), 404, "not_found")
    assert_error(client.put("/search"), 405, "method_not_allowed")


# ---- writes -----------------------------------------------------------------------------------


def test_catalog_writes_need_the_flag_and_the_key(served, client, writable):
    new_image = photo(served, "striped", 0).read_bytes()
    files = [("images", upload(new_image, "new.jpg"))]
    assert_error(client.post("/catalog", files=files, headers={"X-API-Key": KEY}), 403, "writes_disabled", "--allow-writes")
    assert_error(client.delete("/catalog/0", headers={"X-API-Key": KEY}), 403, "writes_disabled")
    w = writable.client
    assert_error(w.post("/catalog", files=files), 401, "unauthorized")
    assert_error(w.post("/catalog", files=files, headers={"X-API-Key": KEY[:-1] + "X"}), 401, "unauthorized")
    assert_error(w.delete("/catalog/0"), 401, "unauthorized")
    assert_error(w.post("/catalog", files=files, data={"attribute": "../etc"}, headers={"X-API-Key": KEY}), 422, "invalid_request", "attribute")
    assert w.get("/catalog").json()["images"] == 42


def test_add_search_and_remove_an_uploaded_image(served, writable):
    w, auth = writable.client, {"X-API-Key": KEY}
    buf = io.BytesIO()
    with Image.open(photo(served, "leopard", 6)) as img:
        img.rotate(90, expand=True).save(buf, "PNG")  # new content, not already catalogued
    r = w.post("/catalog", files=[("images", upload(buf.getvalue(), "rotated.png", "image/png"))], data={"attribute": "leopard"}, headers=auth)
    assert r.status_code == 200, r.text
    (added,) = r.json()["added"]
    assert added["name"] == "rotated.png" and added["attribute"] == "leopard" and not added["already_present"]
    assert w.get("/catalog").json()["attributes"]["leopard"] == PER_ATTRIBUTE + 1
    stored = list(writable.uploads.iterdir())
    assert len(stored) == 1 and stored[0].suffix == ".png" and stored[0].read_bytes() == buf.getvalue()
    top = w.post("/search", files={"image": upload(buf.getvalue(), "q.png")}, data={"top": "1"}).json()["results"][0]
    assert top["id"] == added["id"]
    assert w.get(added["image_url"]).content == buf.getvalue()

    again = w.post("/catalog", files=[("images", upload(buf.getvalue(), "again.png"))], headers=auth).json()["added"][0]
    assert again["already_present"] and again["id"] == added["id"]
    other = io.BytesIO()
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        img.rotate(180).save(other, "PNG")
    # one new image sent twice in one request: added once, and the second copy says so
    twice = w.post("/catalog", files=[("images", upload(other.getvalue(), "one.png")), ("images", upload(other.getvalue(), "two.png"))], headers=auth).json()["added"]
    assert [a["already_present"] for a in twice] == [False, True] and twice[0]["id"] == twice[1]["id"], twice
    w.delete(f"/catalog/{twice[0]['id']}", headers=auth)

    assert w.delete(f"/catalog/{added['id']}", headers=auth).json() == {"removed": added["id"]}
    assert_error(w.delete(f"/catalog/{added['id']}", headers=auth), 404, "not_found")
    assert_error(w.get(added["image_url"]), 404, "not_found")
    after = w.post("/search", files={"image": upload(buf.getvalue(), "q.png")}, data={"top": "50"}).json()["results"]
    assert added["id"] not in {m["id"] for m in after} and len(after) == 42


def test_phone_photos_mpo_and_heic_are_added_and_found(served, writable):
    w, auth = writable.client, {"X-API-Key": KEY}
    with Image.open(photo(served, "dotted", 3)) as img:
        base = img.convert("RGB").rotate(180)  # new content, not already catalogued
    mpo, heic = io.BytesIO(), io.BytesIO()
    base.save(mpo, "MPO", save_all=True, append_images=[base.resize((32, 32))])  # what phones write: a JPEG with a second picture
    base.rotate(90, expand=True).save(heic, "HEIF")  # what iPhones save photos as
    files = [("images", upload(mpo.getvalue(), "IMG_0001.JPG")), ("images", upload(heic.getvalue(), "IMG_0002.HEIC", "image/heic"))]
    before = set(writable.uploads.iterdir()) if writable.uploads.exists() else set()
    r = w.post("/catalog", files=files, data={"attribute": "dotted"}, headers=auth)
    assert r.status_code == 200, r.text
    added = r.json()["added"]
    assert [a["name"] for a in added] == ["IMG_0001.JPG", "IMG_0002.HEIC"] and not any(a["already_present"] for a in added)
    assert sorted(p.suffix for p in set(writable.uploads.iterdir()) - before) == [".heic", ".jpg"]
    for data, new in zip((mpo.getvalue(), heic.getvalue()), added):
        assert w.post("/search", files={"image": upload(data, "q")}, data={"top": "1"}).json()["results"][0]["id"] == new["id"]
        assert w.delete(f"/catalog/{new['id']}", headers=auth).status_code == 200
    assert w.get("/catalog").json()["images"] == 42


# ---- service endpoints ------------------------------------------------------------------------


def test_health_metrics_docs_and_page(client):
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "images": 42, "generation": health["generation"], "model": "run"}
    client.get("/images/424242")
    text = client.get("/metrics").text
    assert 'lookalike_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert 'lookalike_http_errors_total{method="GET",route="/images/{image_id}",status="404"}' in text
    assert 'lookalike_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in text
    assert "lookalike_catalog_images 42.0" in text
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/search", "/compare", "/images/{image_id}", "/images/{image_id}/thumbnail", "/catalog", "/catalog/{image_id}", "/healthz", "/metrics"} <= set(spec["paths"])
    tags = [op["tags"] for ops in spec["paths"].values() for op in ops.values()]
    assert all(len(t) == 1 for t in tags) and {t[0] for t in tags} == {"search", "catalog", "service"}, tags
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    # HEAD, as uptime monitors probe: the GET's status and headers, no body
    for path in ("/healthz", "/", "/images/1", "/images/1/similar"):
        got, head = client.get(path), client.head(path)
        assert (head.status_code, head.content, head.headers["content-type"]) == (200, b"", got.headers["content-type"]), path
    assert client.head("/images/1").headers["content-length"] == client.get("/images/1").headers["content-length"]
    assert client.head("/images/99999").status_code == 404
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/app.js").status_code == 200


# ---- property-based: every endpoint against the app's own OpenAPI schema -----------------------


OPERATIONS = [
    ("POST", "/search"),
    ("POST", "/compare"),
    ("GET", "/images/{image_id}"),
    ("GET", "/images/{image_id}/thumbnail"),
    ("GET", "/images/{image_id}/similar"),
    ("GET", "/catalog"),
    ("POST", "/catalog"),
    ("DELETE", "/catalog/{image_id}"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def api_schema(served):
    """The schema of an app with writes on (every route live) over its own index copy; the key is sent, so writes are fuzzed too."""
    eng, _ = writable_app(served, "index-fuzzed")
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(eng))
    eng.close()


def test_fuzzing_covers_every_operation(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


#: Negative (schema-violating) requests need a parameter or body to violate.
WITHOUT_INPUT = {("GET", "/catalog"), ("GET", "/healthz"), ("GET", "/metrics")}
FUZZ_CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if (m, p) not in WITHOUT_INPUT]


@pytest.mark.parametrize("method, path, mode", FUZZ_CASES, ids=[f"{m} {p} {g.value}" for m, p, g in FUZZ_CASES])
def test_no_endpoint_ever_answers_5xx(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(
            headers={"X-API-Key": KEY},
            checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
        )

    check()


# ---- a real server and a real browser ---------------------------------------------------------


class LiveServer:
    """uvicorn on 127.0.0.1 with an ephemeral port, in a thread; always stopped."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        assert host == "127.0.0.1"
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_browser_upload_see_results_click_one_and_a_rejected_upload(served, engine):
    playwright = require_playwright()
    expect = playwright.expect
    ARTIFACTS.mkdir(exist_ok=True)
    query = photo(served, "leopard", 2)
    with LiveServer(create_app(engine)) as base, playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = launch_chromium(p, profile)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(base + "/")  # the page's own CSP stays on: no inline script, no eval
            expect(page.locator("#attribute option")).to_have_count(4)
            expect(page.locator("#catalog-info")).to_contain_text("42 images")
            page.fill("#top", "8")
            page.set_input_files("#file", str(query))
            expect(page.locator("#status")).to_contain_text("8 matches", timeout=30_000)
            items = page.locator("#results li")
            expect(items).to_have_count(8)
            expect(items.first.locator("img")).to_have_attribute("alt", query.name)
            expect(items.first.locator(".name")).to_have_text(query.name)
            assert all(items.nth(i).locator(".name").inner_text().endswith(".jpg") for i in range(8)), "every card shows its file name"
            expect(page.locator("#query-image")).to_be_visible()
            for i in range(8):
                expect(items.nth(i).locator("img")).to_have_js_property("complete", True)
            page.screenshot(path=str(ARTIFACTS / "serve-search.png"), full_page=True)

            second_id = items.nth(1).get_attribute("data-id")
            items.nth(1).locator("button").click()
            expect(page.locator("#query-image")).to_have_attribute("src", f"/images/{second_id}")
            expect(page.locator(f"#results li[data-id='{second_id}']")).to_have_count(0)
            expect(items).to_have_count(8)
            page.select_option("#attribute", "striped")
            expect(page.locator("#results li .score", has_text="striped")).to_have_count(8, timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "serve-click.png"), full_page=True)

            # the probability slider keeps only matches at least that likely to share the query's attribute
            page.fill("#top", "20")  # past the 13 other leopards, so some matches are unlikely to share the attribute
            page.select_option("#attribute", "")
            expect(items).to_have_count(20, timeout=30_000)
            shown = [float(t.rstrip("%")) for t in page.locator("#results li .score span:first-of-type").all_inner_texts()]
            floor = int(min(shown) // 5 * 5 + 5)
            assert floor <= 100 and any(p < floor for p in shown), shown
            slide = "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }"
            page.eval_on_selector("#floor", slide, str(floor))
            expect(page.locator("#floor-value")).to_have_text(f"{floor}%")
            page.wait_for_function(
                "t => [...document.querySelectorAll('#results li .score span:first-of-type')].every(s => parseFloat(s.textContent) >= t)", arg=floor, timeout=30_000
            )
            page.eval_on_selector("#floor", slide, "0")

            page.set_input_files("#file", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"a shopping list, not a photo"}])
            expect(page.locator("#status.error")).to_contain_text("notes.jpg", timeout=30_000)
            expect(items).to_have_count(0)
            expect(page.locator("#query-image")).to_be_hidden()
            expect(page.locator("#drop-text")).to_be_visible()
            broken = page.eval_on_selector_all("img", "imgs => imgs.filter(i => i.checkVisibility() && !(i.complete && i.naturalWidth > 0)).length")
            assert broken == 0, "a broken-image icon is left on the page after a rejected upload"
            page.screenshot(path=str(ARTIFACTS / "serve-rejected.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()
    assert (ARTIFACTS / "serve-search.png").stat().st_size > 10_000


def test_browser_api_docs_work_offline_and_a_vanished_thumbnail_says_so(served, engine):
    playwright = require_playwright()
    expect = playwright.expect
    query = photo(served, "dotted", 3)
    with LiveServer(create_app(engine)) as base, playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = launch_chromium(p, profile)
        try:
            page = browser.new_page()
            outside, console_errors = [], []
            # as on a server without internet: anything not served by the app fails
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else (outside.append(route.request.url), route.abort()))
            page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
            page.goto(base + "/docs")
            expect(page.locator(".swagger-ui .info")).to_contain_text("lookalike", timeout=30_000)
            expect(page.locator(".opblock-summary-path", has_text="/search")).to_have_count(1)
            page.goto(base + "/")
            expect(page.locator("#attribute option")).to_have_count(4)
            assert not outside and not console_errors, (outside, console_errors)

            page.fill("#top", "0")
            page.set_input_files("#file", str(query))
            expect(page.locator("#status")).to_contain_text("1 match in", timeout=30_000)
            expect(page.locator("#top")).to_have_value("1")
            page.fill("#top", "500")
            page.dispatch_event("#top", "change")
            expect(page.locator("#status")).to_contain_text("42 matches", timeout=30_000)  # all the catalog holds
            expect(page.locator("#top")).to_have_value("100")

            # the server answers 404 for one match's thumbnail and picture, as when its file was removed
            page.fill("#top", "5")
            page.dispatch_event("#top", "change")
            items = page.locator("#results li")
            expect(items).to_have_count(5, timeout=30_000)
            gone = items.nth(2).get_attribute("data-id")
            page.route(f"{base}/images/{gone}**", lambda route: route.fulfill(status=404, json={"error": "image_missing", "detail": "gone"}) if "similar" not in route.request.url else route.continue_())
            page.reload()  # a page keeps the pictures it has shown
            expect(page.locator("#attribute option")).to_have_count(4)
            page.fill("#top", "5")
            page.set_input_files("#file", str(query))
            expect(page.locator(f"#results li[data-id='{gone}'] .missing")).to_have_text("image no longer available on the server", timeout=30_000)
            broken = page.eval_on_selector_all("#results img", "imgs => imgs.filter(i => i.complete && i.naturalWidth === 0).length")
            assert broken == 0, "a broken-image icon is left among the matches"
            page.locator(f"#results li[data-id='{gone}'] button").click()
            expect(page.locator("#drop-text")).to_have_text("This catalog image is no longer available on the server", timeout=30_000)
            expect(items).to_have_count(5)
        finally:
            browser.close()


def raw_get(port: int, target: bytes) -> bytes:
    """The whole answer to a GET of `target` written byte for byte on the socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@contextmanager
def cli_service(served, *options: str):
    """`lookalike serve` on an ephemeral loopback port, once /healthz answers: the port and a holder of its output (filled when it stops)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(served.root / "cache")}
    cmd = [sys.executable, "-m", "lookalike", "serve", "--index", str(served.index), "--port", str(port), *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the service did not come up"
                time.sleep(0.3)
        yield port, output
    finally:
        proc.terminate()
        output.append(proc.communicate(timeout=30)[0])


def test_cli_serves_on_loopback_and_stops(served):
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(served.root / "cache")}
    with cli_service(served) as (port, output):
        r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        assert r.json()["images"] == 42
        probe = httpx.head(f"http://127.0.0.1:{port}/healthz", timeout=2)
        assert probe.status_code == 200 and probe.content == b"", "an uptime monitor's HEAD through uvicorn"
        r = httpx.post(f"http://127.0.0.1:{port}/search", files={"image": upload(photo(served, "dotted", 5))}, data={"top": "2"}, timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["name"] == photo(served, "dotted", 5).name
        # dot segments sent as they are (an HTTP client would remove them before sending)
        for sneaky in (b"/images/1/../../etc/passwd", b"/static/../../../../../etc/passwd", b"/static/../app.py", b"/images/1/..%2F..%2Fetc%2Fpasswd"):
            answer = raw_get(port, sneaky)
            assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.1 422")), (sneaky, answer[:100])
            assert b"root:" not in answer and b"import" not in answer
    assert '"POST /search HTTP/1.1" 200' in output[0], "a line per request by default"
    with cli_service(served, "--no-access-log", "--similar-cache-mb", "0") as (port, output):
        assert httpx.get(f"http://127.0.0.1:{port}/images/1/similar", timeout=10).status_code == 200
        assert "lookalike_similar_cache_lookups_total{result=\"miss\"} 1.0" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "/similar HTTP/1.1" not in output[0] and "/metrics HTTP/1.1" not in output[0]
    bad = subprocess.run([sys.executable, "-m", "lookalike", "serve", "--index", str(served.index), "--allow-writes"], capture_output=True, text=True, env=env | {"LOOKALIKE_API_KEY": ""})
    assert bad.returncode == 2 and "--api-key" in bad.stderr and "Traceback" not in bad.stderr
    for not_an_index in (served.run, served.root / "no-such-folder"):  # a run folder is the usual slip
        wrong = subprocess.run([sys.executable, "-m", "lookalike", "serve", "--index", str(not_an_index)], capture_output=True, text=True, env=env)
        assert wrong.returncode == 1 and "is not a lookalike index" in wrong.stderr and "gone away" not in wrong.stderr, wrong.stderr
