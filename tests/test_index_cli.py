"""`lookalike index` end to end on real photos with a really trained run: build, search, add, remove, stats."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_DATA
from conftest import lookalike_cli as lookalike
from lookalike import ImageIndex as CatalogIndex
from lookalike.errors import LookalikeError

pytestmark = pytest.mark.slow
ATTRIBUTES = ("dotted", "leopard", "striped")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on 12 real photos per attribute; 4 more per attribute kept back to add later."""
    root = tmp_path_factory.mktemp("index-cli")
    for attribute in ATTRIBUTES:
        photos = sorted((REAL_DATA / attribute).glob("*.jpg"))
        for folder, chosen in (("photos", photos[:12]), ("later", photos[12:16])):
            (root / folder / attribute).mkdir(parents=True)
            for src in chosen:
                os.symlink(src, root / folder / attribute / src.name)
    (root / "small.toml").write_text("[data]\ntrain_queries_per_attribute = 10\ntest_queries_per_attribute = 4\n[evaluate]\nquery_pictures = 2\n[refine]\nepochs = 0\n")
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(root / "cache")}
    lookalike("run", "--data", root / "photos", "--out", root / "run", "--splits", "1", "--config", root / "small.toml", env=env)
    return root, env


def test_build_search_add_remove_stats_on_real_photos(trained):
    root, env = trained
    index = root / "index"
    proc = lookalike("index", "build", "--run", root / "run", "--images", root / "photos", "--out", index, "--json", env=env)
    built = json.loads(proc.stdout)
    assert (built["added"], built["embedded"], built["kind"]) == (36, 36, "flat")
    assert "never calibrated" not in proc.stderr  # the model knows every attribute of this catalog

    query = sorted((root / "photos" / "leopard").iterdir())[0]
    result = json.loads(lookalike("index", "search", index, query, "--top", "15", "--json", "--grid", root / "grid.png", env=env).stdout)
    assert set(result) == {"query", "attribute", "min_probability", "results", "took_ms"} and result["query"]["path"] == str(query)
    assert result["query"]["format"] == "JPEG", "the format as REST /search names it"
    matches = result["results"]
    assert len(matches) == 15 and str(query) not in [m["path"] for m in matches]
    distances = [m["distance"] for m in matches]
    probabilities = [m["probability"] for m in matches]
    assert distances == sorted(distances) and probabilities == sorted(probabilities, reverse=True)
    assert all(0 <= p <= 1 for p in probabilities)
    assert sum(m["attribute"] == "leopard" for m in matches[:5]) >= 4  # measured 5 (chance: 5 x 11/35)
    with Image.open(root / "grid.png") as grid:
        width, height = grid.size  # the query + 15 matches: 4 rows of 4 tiles of 200 px
        assert 4 * 200 < width < 5 * 200 and 4 * 200 < height < 5 * 200

    # the same ranking as the run's own model, by brute force over every catalogued image
    from lookalike.index import ImageIndex, search_vectors
    from lookalike.model import SimilarityModel

    os.environ["LOOKALIKE_CACHE_DIR"] = env["LOOKALIKE_CACHE_DIR"]
    model = SimilarityModel.load(root / "run")
    with ImageIndex.open(index) as ix:
        entries = ix.entries_by_path()
        paths = sorted(p for p in entries if p != str(query))
        X = ix.vectors()[[entries[p].id for p in paths]]
        q = ix.vectors()[entries[str(query)].id]
    d = model.ranker_.distance(q, X)
    assert [m["path"] for m in matches] == [paths[i] for i in np.argsort(d, kind="stable")[:15]]
    np.testing.assert_allclose(distances, np.sort(d)[:15], rtol=1e-6)
    feats = model.embed([str(query)])
    np.testing.assert_allclose(q, feats[0], rtol=1e-5, atol=1e-6)
    # every catalogued photo as a query: its 5 nearest others are mostly of its attribute, even without refinement
    with ImageIndex.open(index) as ix:
        attribute = {e.id: e.attribute for e in ix.entries_by_path().values()}
        same = [np.mean([m.attribute == attribute[i] for m in search_vectors(ix, ix.vectors()[i], 5, exclude_ids=[i])[0]]) for i in attribute]
    assert np.mean(same) >= 0.6  # measured 0.76 (chance 0.31)

    added = json.loads(lookalike("index", "add", index, root / "later", "--json", env=env).stdout)
    assert (added["added"], added["embedded"], added["images"]) == (12, 12, 48)
    again = json.loads(lookalike("index", "add", index, root / "later", "--json", env=env).stdout)
    assert (again["added"], again["embedded"], again["unchanged"]) == (0, 0, 12)

    new_photo = next((root / "later" / "striped").iterdir())
    found = json.loads(lookalike("index", "search", index, new_photo, "--top", "3", "--keep-self", "--json", env=env).stdout)
    assert found["results"][0]["path"] == str(new_photo)

    removed = json.loads(lookalike("index", "remove", index, root / "later" / "striped", root / "nowhere.jpg", "--json", env=env).stdout)
    assert removed["action"] == "remove" and removed["removed"] == 4 and removed["images"] == 44 and removed["not_in_index"] == [str(root / "nowhere.jpg")]
    stats = json.loads(lookalike("index", "stats", index, "--json", env=env).stdout)
    assert stats["images"] == 44 and stats["attributes"] == {"dotted": 16, "leopard": 16, "striped": 12}
    assert stats["distance"].startswith("learned weighted L2")
    assert (stats["dead_rows"], stats["vector_rows"]) == (4, 48)
    # the removed photos come back (their stored vectors reused by content), and 4 dead rows of 52 > 5 % compacts
    back = json.loads(lookalike("index", "add", index, root / "later", "--compact-above", "0.05", "--json", env=env).stdout)
    assert (back["added"], back["reused_vectors"], back["embedded"], back["compacted"], back["images"]) == (4, 4, 0, True, 48)
    again = json.loads(lookalike("index", "search", index, new_photo, "--top", "3", "--keep-self", "--json", env=env).stdout)
    assert again["results"][0]["path"] == str(new_photo) and again["results"][0]["distance"] == found["results"][0]["distance"]

    # reindex: the same stored vectors in another kind, the tail folded in, the same answers
    assert (stats["kind"], stats["tail_rows"]) == ("flat", 12)
    with ImageIndex.open(index) as ix:
        exact = [m.path for m in search_vectors(ix, q, 16)[0] if m.path != str(query)]
    rebuilt = json.loads(lookalike("index", "reindex", index, "--kind", "hnsw", "--json", env=env).stdout)
    assert (rebuilt["kind"], rebuilt["images"], rebuilt["tombstones"], rebuilt["tail_rows"]) == ("hnsw", 48, 0, 0)
    again = json.loads(lookalike("index", "search", index, query, "--top", "15", "--json", env=env).stdout)["results"]
    assert [m["path"] for m in again] == exact[:15]
    kept = json.loads(lookalike("index", "reindex", index, "--json", env=env).stdout)  # no --kind: the index keeps its kind
    assert (kept["kind"], kept["images"]) == ("hnsw", 48)

    manifest = json.loads((index / "manifest.json").read_text())
    manifest["backbone_fingerprint"] = "some-other-backbone"
    (index / "manifest.json").write_text(json.dumps(manifest))
    wrong = lookalike("index", "add", index, root / "later", env=env, check=False)
    assert wrong.returncode == 1 and "is not the one the index" in " ".join(wrong.stderr.split()) and "Traceback" not in wrong.stderr
    missing = lookalike("index", "search", root / "nowhere", new_photo, env=env, check=False)
    assert missing.returncode == 1 and "is not a lookalike index" in " ".join(missing.stderr.split())


def test_mistyped_searches_and_builds_are_refused_with_what_exists(trained, tmp_path):
    root, env = trained
    run, index = root / "run", tmp_path / "idx"
    lookalike("index", "build", "--run", run, "--images", root / "later", "--out", index, env=env)
    query = next((root / "later" / "dotted").iterdir())
    unknown = lookalike("index", "search", index, query, "--attribute", "polka", env=env, check=False)
    assert unknown.returncode == 2 and "--attribute: no catalog image has the attribute 'polka'; known attributes: dotted" in " ".join(unknown.stderr.split())
    with CatalogIndex.open(index) as catalog:
        with pytest.raises(LookalikeError, match="known attributes"):
            catalog.search(query, attribute="polka")
        with pytest.raises(LookalikeError, match="nprobe = 0"):
            catalog.search(query, params={"nprobe": 0})
    manifest = json.loads((index / "manifest.json").read_text())
    (index / "manifest.json").write_text(json.dumps(manifest | {"building": True}))  # as a build killed half-way leaves it
    for args in (["stats", index], ["search", index, query]):
        assert "the build of this index was interrupted after 12 image(s)" in " ".join(lookalike("index", *args, env=env).stderr.split())
    (index / "manifest.json").write_text(json.dumps(manifest))
    assert "interrupted" not in lookalike("index", "stats", index, env=env).stderr
    typo = lookalike("index", "build", "--run", run, "--images", root / "latr", "--out", tmp_path / "typo", env=env, check=False)
    assert typo.returncode == 2 and "latr does not exist" in typo.stderr and not (tmp_path / "typo").exists(), "no empty index left behind"
    no_model = lookalike("index", "build", "--run", root / "rnu", "--images", root / "later", "--out", tmp_path / "typo", env=env, check=False)
    assert no_model.returncode == 2 and "--model: the model or run folder" in no_model.stderr and "moved?" not in no_model.stderr


def test_a_catalog_with_attributes_the_model_never_learned_says_so(trained, tmp_path):
    root, env = trained
    for attribute, photos in (("dotted", sorted((root / "later" / "dotted").iterdir())[:2]), ("houndstooth", sorted((root / "later" / "striped").iterdir())[:3])):
        (tmp_path / "catalog" / attribute).mkdir(parents=True)
        for photo in photos:
            os.symlink(photo, tmp_path / "catalog" / attribute / photo.name)
    proc = lookalike("index", "build", "--run", root / "run", "--images", tmp_path / "catalog", "--out", tmp_path / "index", env=env)
    note = " ".join(proc.stderr.split())
    assert "the model was trained on dotted, leopard, striped, not on houndstooth (3 images)" in note and "never calibrated" in note, note


def test_milvus_backend_gives_the_faiss_answers_for_a_trained_run(trained, tmp_path, monkeypatch):
    """The same run and photos in both backends: identical top-15 from the CLI, the library and the service, add and remove included."""
    from fastapi.testclient import TestClient

    from lookalike.index.api import ImageIndex
    from lookalike.index.backends import IndexLocation
    from lookalike.index.build import build_index
    from lookalike.index.milvus import disconnect
    from lookalike.serve.app import create_app
    from lookalike.serve.service import Service
    from lookalike.serve.settings import ServeSettings

    root, env = trained
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", env["LOOKALIKE_CACHE_DIR"])
    uri, milvus_args = tmp_path / "catalog.db", ("--backend", "milvus", "--uri", tmp_path / "catalog.db")
    built = json.loads(lookalike("index", "build", "--model", root / "run", "--images", root / "photos", "--out", "photos", *milvus_args, "--json", env=env).stdout)
    assert (built["added"], built["images"], built["kind"]) == (36, 36, "flat")
    queries = [sorted((root / "photos" / "dotted").iterdir())[0], sorted((root / "later" / "leopard").iterdir())[0]]
    by_cli = [json.loads(line)["results"] for line in lookalike("index", "search", "photos", *queries, *milvus_args, "--json", env=env).stdout.splitlines()]

    build_index(root / "run", root / "photos", tmp_path / "faiss", progress=False)
    faiss = ImageIndex.open(tmp_path / "faiss", writable=True)
    milvus = ImageIndex.open(IndexLocation.parse("photos", "milvus", str(uri)), model=faiss.model, writable=True)
    vectors, own = faiss.query_vectors(queries)
    assert own[0] is not None and own[1] is None  # the first query is catalogued: left out of its own results

    def assert_same(found, expected):
        assert [m["id"] for m in found] == [m.id for m in expected] and len(expected) == 15
        np.testing.assert_allclose([m["distance"] for m in found], [m.distance for m in expected], rtol=0, atol=1e-5)
        np.testing.assert_allclose([m["probability"] for m in found], [m.probability for m in expected], rtol=0, atol=1e-5)

    for found, expected in zip(by_cli, faiss.search_vectors(vectors, 15, leave_out=own)):
        assert_same(found, expected)

    for index in (faiss, milvus):
        index.add(root / "later")
        assert index.remove([root / "photos" / "striped"]) == 12
    assert faiss.store.entries_by_path() == milvus.store.entries_by_path() and milvus.stats()["attributes"] == {"dotted": 16, "leopard": 16, "striped": 4}
    assert (len(milvus), milvus.stats()["milvus_index"]) == (36, "FLAT")
    for expected, found in zip(faiss.search_vectors(vectors, 15), milvus.search_vectors(vectors, 15)):
        assert_same([m.to_dict() for m in found], expected)

    engine = Service(ServeSettings(index_dir="photos", index_backend="milvus", index_uri=str(uri)))
    try:
        with TestClient(create_app(engine)) as client, open(queries[1], "rb") as f:
            assert_same(client.post("/search", files={"image": (queries[1].name, f, "image/jpeg")}).json()["results"], faiss.search_vectors(vectors[1:], 15)[0])
            assert_same(client.get(f"/images/{own[0]}/similar").json()["results"], faiss.search_vectors(vectors[:1], 15, leave_out=own[:1])[0])
    finally:
        engine.close()
        faiss.close()
        disconnect(str(uri))
