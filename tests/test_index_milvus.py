"""The Milvus backend (Milvus Lite) answers exactly as the FAISS backend: same ids, distances and probabilities."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import lookalike_cli, make_dataset, texture
from index_helpers import PixelEmbedder, clustered_vectors, mixed_weights
from lookalike.errors import LookalikeError
from lookalike.index import IndexMetric, NewImage, ingest, search_vectors
from lookalike.index.backends import IndexLocation
from lookalike.index.milvus import MilvusIndex, disconnect


def answers(index, queries, exclude=None) -> list[list[tuple]]:
    return [[(m.id, m.path, m.attribute, m.distance, m.probability) for m in found] for found in search_vectors(index, queries, 15, exclude_ids=exclude)]


def assert_same_answers(faiss_index, milvus_index, queries, exclude=None) -> None:
    """Identical top-15 ids, paths and attributes; distances and probabilities within 1e-5."""
    for a, b in zip(answers(faiss_index, queries, exclude), answers(milvus_index, queries, exclude), strict=True):
        assert [m[:3] for m in a] == [m[:3] for m in b] and len(a) == 15
        np.testing.assert_allclose([m[3] for m in a], [m[3] for m in b], rtol=0, atol=1e-5)
        if a[0][4] is not None:
            np.testing.assert_allclose([m[4] for m in a], [m[4] for m in b], rtol=0, atol=1e-5)


def both(tmp_path, metric, dim=PixelEmbedder.dim, fingerprint=PixelEmbedder.fingerprint):
    locations = (IndexLocation.parse(tmp_path / "faiss"), IndexLocation.parse("photos", "milvus", str(tmp_path / "milvus.db")))
    return tuple(loc.create(dim, metric, fingerprint) for loc in locations), locations


@pytest.mark.parametrize("kind", ["learned", "cosine"])
def test_milvus_answers_like_faiss_through_add_change_and_remove(tmp_path, kind):
    photos = make_dataset(tmp_path / "photos", per_attribute=10)
    metric = IndexMetric("learned", mixed_weights(PixelEmbedder.dim), 0.3, 2.0, 0.5) if kind == "learned" else IndexMetric("cosine")
    indexes, locations = both(tmp_path, metric)
    for index in indexes:
        ingest(index, photos, PixelEmbedder(), progress=False)
        assert index.stats()["build_finished"] is False
        index.finish_build()
    faiss_index, milvus_index = indexes
    assert milvus_index.stats()["kind"] == "flat" and milvus_index.size == 30
    assert milvus_index.state["unflushed"] == 0  # a build ends with every row sealed into indexed segments
    rng = np.random.default_rng(0)
    fresh = np.abs(rng.normal(size=(4, PixelEmbedder.dim))).astype(np.float32)
    queries = np.r_[faiss_index.vectors(), fresh / np.linalg.norm(fresh, axis=1, keepdims=True)]
    assert_same_answers(faiss_index, milvus_index, queries)
    assert_same_answers(faiss_index, milvus_index, queries[:1], exclude=[0])

    # add: 3 new images per attribute, and 10 copies of catalogued ones (their vectors are reused)
    more = make_dataset(tmp_path / "more", per_attribute=13)
    reports = [ingest(index, more, PixelEmbedder(), progress=False).to_dict() for index in indexes]
    assert reports[0] == reports[1] and (reports[1]["added"], reports[1]["embedded"], reports[1]["reused_vectors"]) == (39, 9, 30)
    assert milvus_index.state["unflushed"] == 39  # sealed only once max(1,000, 2 %) rows piled up, like the FAISS tail
    # change: a catalogued file gets other content, so its entry is replaced under a new id
    texture("stripes", seed=77).save(photos / "dots" / "000.png")
    reports = [ingest(index, photos, PixelEmbedder(), progress=False).to_dict() for index in indexes]
    assert reports[0] == reports[1] and reports[1]["changed"] == 1
    # remove: a whole folder
    for index in indexes:
        assert index.remove(e.id for e in index.entries_by_path(str(photos / "stripes")).values()) == 10
    assert faiss_index.entries_by_path() == milvus_index.entries_by_path()
    assert faiss_index.stats()["attributes"] == milvus_index.stats()["attributes"] == {"checks": 23, "dots": 23, "stripes": 13}
    assert faiss_index.stats()["build_finished"] is milvus_index.stats()["build_finished"] is True
    queries = np.r_[faiss_index.vectors(), queries[-4:]]
    assert_same_answers(faiss_index, milvus_index, queries)

    for index in indexes:
        index.close()
    faiss_index, milvus_index = (loc.open(writable=True) for loc in locations)
    assert_same_answers(faiss_index, milvus_index, queries)
    # Milvus's HNSW graph proposes a shortlist of 200 (all of them here) that is re-ranked exactly
    milvus_index.reindex("hnsw")
    assert milvus_index.stats()["milvus_index"] == "HNSW"
    assert_same_answers(faiss_index, milvus_index, queries)
    faiss_index.close()


def test_an_update_cut_short_is_finished_or_undone_by_the_next_writer(tmp_path, monkeypatch):
    dim = 16
    location = IndexLocation.parse("crash", "milvus", str(tmp_path / "milvus.db"))
    X = clustered_vectors(12, dim, seed=1)
    images = [NewImage(f"/img/{i}.jpg", "ab"[i % 2], f"{i:064x}", 10, 1.0) for i in range(12)]
    index = location.create(dim, IndexMetric("l2"), "fp")
    index.add(images[:10], X[:10])
    index.finish_build()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    # killed after the new row arrived, before the entry it replaces was deleted: finished
    with monkeypatch.context() as m:
        m.setattr(index.client, "delete", crash)
        with pytest.raises(KeyboardInterrupt):
            index.add([images[0]], X[10:11], replaced_ids=[0])
    index = location.open(writable=True)
    assert index.state["pending"] is None and sorted(e.id for e in index.entries_by_path().values()) == list(range(1, 11))
    assert (index.size, index.stats()["attributes"]) == (10, {"a": 5, "b": 5})

    # killed after one of two rows arrived: undone, and the ids are given again
    insert = index.client.insert
    with monkeypatch.context() as m:
        m.setattr(index.client, "insert", lambda name, rows: (insert(name, rows[:1]), crash()))
        with pytest.raises(KeyboardInterrupt):
            index.add(images[10:12], X[10:12])
    index = location.open(writable=True)
    assert sorted(e.id for e in index.entries_by_path().values()) == list(range(1, 11)) and index.size == 10
    assert index.add(images[10:12], X[10:12]).tolist() == [11, 12]


def test_pymilvus_is_imported_only_when_the_milvus_backend_is_chosen(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import lookalike.serve.app
        from lookalike.cli.main import _register_plugins
        from lookalike.index import IndexMetric, NewImage, search_vectors
        from lookalike.index.backends import IndexLocation

        _register_plugins()
        X = np.eye(4, dtype=np.float32)
        images = [NewImage(f"/img/{{i}}.jpg", None, f"{{i:064x}}", 1, 1.0) for i in range(4)]
        for location in (IndexLocation.parse({str(tmp_path / "faiss")!r}), IndexLocation.parse("photos", "milvus", {str(tmp_path / "m.db")!r})):
            with location.create(4, IndexMetric("l2")) as index:
                index.add(images, X)
                assert [m.id for m in search_vectors(index, X[1], 2)[0]] == [1, 0]
            print(location.backend, sorted({{m.split(".")[0] for m in sys.modules}} & {{"pymilvus", "milvus_lite"}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["faiss []", "milvus ['milvus_lite', 'pymilvus']"]


def test_wrong_backend_options_and_a_busy_lite_file_get_clear_messages(tmp_path):
    with pytest.raises(LookalikeError, match="needs --uri"):
        IndexLocation.parse("photos", "milvus")
    with pytest.raises(LookalikeError, match="must end in .db"):
        IndexLocation.parse("photos", "milvus", str(tmp_path / "catalog.sqlite"))
    with pytest.raises(LookalikeError, match="cannot name a Milvus collection"):
        IndexLocation.parse("my-photos", "milvus", str(tmp_path / "m.db"))
    with pytest.raises(LookalikeError, match="--uri goes with --backend milvus"):
        IndexLocation.parse(tmp_path / "index", "faiss", str(tmp_path / "m.db"))
    uri = str(tmp_path / "m.db")
    with pytest.raises(LookalikeError, match="has no collection photos"):
        MilvusIndex.open(uri, "photos")
    index = MilvusIndex.create(uri, "photos", 4, IndexMetric("l2"))
    with pytest.raises(LookalikeError, match="already holds an index"):
        index.finish_build() or MilvusIndex.create(uri, "photos", 4, IndexMetric("l2"))
    # this process holds the Milvus Lite file: another one is told why it cannot open it
    busy = lookalike_cli("index", "stats", "photos", "--backend", "milvus", "--uri", uri, check=False)
    assert busy.returncode == 1 and "one process at a time" in " ".join(busy.stderr.split()) and "Traceback" not in busy.stderr
    disconnect(uri)
