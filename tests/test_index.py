"""The index on generated vectors: the learned-distance rewrite, every search kind against brute force, updates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from index_helpers import brute_force, clustered_vectors, images, mixed_weights
from lookalike.errors import LookalikeError
from lookalike.index import ImageIndex, IndexMetric, search_vectors
from lookalike.index.ingest import check_embedder
from lookalike.index.vectors import IVFPQ_MIN_TRAIN, AnnIndex

DIM = 48
SMALL = {"pca_dim": 48, "pq_m": 24, "hnsw_m": 16, "ef_construction": 40, "train_sample": 20_000, "nprobe": 64}


def metrics() -> list[IndexMetric]:
    w = mixed_weights(DIM)
    return [IndexMetric("learned", w, 0.7, 3.0, -2.0), IndexMetric("l2"), IndexMetric("cosine")]


@pytest.mark.parametrize("signs", ["mixed", "all_alike_negative", "all_positive"])
def test_learned_distance_rewrite_ranks_exactly_like_brute_force(signs):
    rng = np.random.default_rng(1)
    w = {"mixed": mixed_weights(DIM, 3), "all_alike_negative": -np.abs(rng.normal(1, 0.5, DIM)), "all_positive": np.abs(rng.normal(1, 0.5, DIM))}[signs]
    metric = IndexMetric("learned", w, bias=-0.4)
    X = clustered_vectors(3000, DIM, seed=2).astype(np.float64)
    Q = clustered_vectors(20, DIM, seed=3).astype(np.float64)
    Z = metric.data_space(X).astype(np.float64)
    for q, r in zip(Q, metric.query_space(Q).astype(np.float64)):
        exact = metric.distance(q, X)
        l2 = ((Z - r) ** 2).sum(axis=1)
        # |r - z|^2 = d + 2 sum_N |v| q^2 + M: the same shift for every catalogue vector
        shift = l2 - exact
        assert np.ptp(shift) < 1e-4 * (1 + np.abs(shift).max())
        # so L2 order is learned-distance order, up to float32 rounding of the stored search vectors
        by_l2 = exact[np.argsort(l2, kind="stable")[:50]]
        assert np.all(np.diff(by_l2) > -1e-5 * (1 + np.abs(exact).max()))
        np.testing.assert_allclose(by_l2, np.sort(exact)[:50], atol=1e-5 * (1 + np.abs(exact).max()))
        # the maximum-inner-product form of the issue: store [x, sum w x^2], query with [-2 w q, 1]
        mips = np.c_[X, (X * X) @ w] @ np.r_[-2 * w * q, 1.0]
        np.testing.assert_allclose(-(mips + (w * q * q).sum()), exact, rtol=1e-9, atol=1e-9)


def test_metric_matches_the_run_ranker_and_its_probability():
    from lookalike.metric.ranker import WeightedL2Ranker

    ranker = WeightedL2Ranker.from_dict(
        {"format": "lookalike.weighted_l2/1", "params": {}, "weights": mixed_weights(DIM).tolist(), "bias": 0.2, "platt_a": 4.0, "platt_b": -1.0}
    )
    metric = IndexMetric.from_ranker(ranker)
    X = clustered_vectors(200, DIM)
    np.testing.assert_allclose(metric.distance(X[0], X), ranker.distance(X[0], X))
    np.testing.assert_allclose(metric.probability(metric.distance(X[0], X)), ranker.probability(ranker.distance(X[0], X)))
    assert IndexMetric("cosine").probability([0.1]) is None


def test_vectors_longer_than_the_bound_are_refused():
    metric = IndexMetric("learned", mixed_weights(DIM))
    with pytest.raises(LookalikeError, match="L2-normalised"):
        metric.data_space(np.full((1, DIM), 1.0))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
@pytest.mark.parametrize("metric", metrics(), ids=lambda m: m.kind)
def test_every_kind_and_distance_agrees_with_brute_force(tmp_path, kind, metric):
    n, k = 12_000, 15
    X = clustered_vectors(n, DIM, seed=5)
    Q = clustered_vectors(25, DIM, seed=6)
    with ImageIndex.create(tmp_path / "ix", DIM, metric, kind=kind, params=SMALL) as ix:
        ix.add(images(n), X)
        assert ix.merge()
        assert ix.stats()["kind"] == kind and ix.stats()["tail_rows"] == 0
        found = search_vectors(ix, Q, k)
    recalls = []
    for q, matches in zip(Q, found):
        truth, truth_d = brute_force(metric, q, X, k)
        ids = np.array([m.id for m in matches])
        # whatever the kind, a reported distance is the exact one, and results come nearest first
        np.testing.assert_allclose([m.distance for m in matches], metric.distance(q, X[ids]), rtol=1e-10)
        assert all(a.distance <= b.distance for a, b in zip(matches, matches[1:]))
        assert [m.path for m in matches] == [f"/img/{i}.jpg" for i in ids]
        if kind == "flat":
            np.testing.assert_array_equal(ids, truth)
            np.testing.assert_allclose([m.distance for m in matches], truth_d, rtol=1e-10)
        recalls.append(len(set(ids) & set(truth)) / k)
    assert np.mean(recalls) >= (1.0 if kind == "flat" else 0.9), np.mean(recalls)
    if metric.calibrated:
        p = [m.probability for m in found[0]]
        assert all(0 <= x <= 1 for x in p) and p == sorted(p, reverse=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_add_remove_and_tail_stay_exact(tmp_path, kind):
    metric = metrics()[0]
    X = clustered_vectors(3000, DIM, seed=7)
    with ImageIndex.create(tmp_path / "ix", DIM, metric, kind=kind, params=SMALL) as ix:
        ix.add(images(2000), X[:2000])
        ix.merge()
        ix.add(images(500, start=2000), X[2000:2500])  # below the merge threshold: stays in the exact tail
        assert not ix.merge() and ix.stats()["tail_rows"] == 500
        removed = list(range(0, 2500, 7))
        assert ix.remove(removed) == len(removed)
        assert ix.remove(removed) == 0  # already gone
        alive = np.ones(2500, bool)
        alive[removed] = False
        for q in X[2500:2520]:
            got = [m.id for m in search_vectors(ix, q, 15)[0]]
            truth, _ = brute_force(metric, q, X[:2500], 15, alive)
            if kind == "flat":
                assert got == list(truth)
            assert not set(got) & set(removed)
        # removed rows still inside the FAISS index are filtered at query time until the next merge
        assert ix.stats()["tombstones"] == len([r for r in removed if r < 2000])
        ix.reindex(kind)
        stats = ix.stats()
        assert (stats["images"], stats["tombstones"], stats["tail_rows"]) == (2500 - len(removed), 0, 0)
        assert sorted(m.id for m in search_vectors(ix, X[5], 3000)[0]) == list(np.flatnonzero(alive))


@pytest.mark.parametrize("n,kind", [(0, "flat"), (49_999, "flat"), (50_000, "hnsw"), (1_999_999, "hnsw"), (2_000_000, "ivfpq"), (10**9, "ivfpq")])
def test_kind_is_chosen_by_catalog_size(n, kind):
    from lookalike.index.vectors import choose_kind

    assert choose_kind(n) == kind


def test_auto_kind_follows_catalog_size(tmp_path, monkeypatch):
    import lookalike.index.vectors as vectors

    monkeypatch.setattr(vectors, "EXACT_BELOW", 1000)  # the real choose_kind, at a size a test can reach
    X = clustered_vectors(1500, DIM)
    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2"), params=SMALL) as ix:
        ix.add(images(800), X[:800])
        ix.merge()
        assert ix.stats()["kind"] == "flat"
        ix.add(images(700, start=800), X[800:])
        ix.merge()
        assert ix.stats()["kind"] == "hnsw" and ix.stats()["images"] == 1500


@pytest.mark.parametrize("ann_rows,threshold", [(0, 1_000), (50_000, 1_000), (100_000, 2_000), (999_999, 19_999), (10**6, 20_000), (10**8, 20_000)])
def test_merge_threshold_grows_with_the_index_within_bounds(ann_rows, threshold):
    from lookalike.index.store import merge_threshold

    assert merge_threshold(ann_rows) == threshold


def test_tail_is_merged_once_it_passes_the_threshold(tmp_path):
    X = clustered_vectors(2002, DIM, seed=4)
    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2"), kind="flat") as ix:
        ix.add(images(1), X[:1])
        assert ix.merge() and ix.stats()["tail_rows"] == 0  # the first merge builds the FAISS index
        ix.add(images(1000, start=1), X[1:1001])
        assert not ix.merge() and ix.stats()["tail_rows"] == 1000  # at the threshold (1,000): still searched exactly
        ix.add(images(1, start=1001), X[1001:1002])
        assert ix.merge() and ix.stats()["tail_rows"] == 0
        # removals fold in once there are more than the threshold too (flat and IVF-PQ can drop rows)
        ix.remove(range(1000))
        assert not ix.merge() and ix.stats()["tombstones"] == 1000
        ix.remove([1000])
        assert ix.merge() and ix.stats()["tombstones"] == 0


def test_ivfpq_add_remove_and_reindex_stay_close_to_brute_force(tmp_path, monkeypatch):
    import lookalike.index.vectors as vectors

    monkeypatch.setattr(vectors, "IVFPQ_MIN_TRAIN", 2000)  # train on a test-sized sample
    metric = metrics()[0]
    X = clustered_vectors(3000, DIM, seed=8)
    with ImageIndex.create(tmp_path / "ix", DIM, metric, kind="ivfpq", params=SMALL) as ix:
        ix.add(images(2500), X[:2500])
        assert ix.merge() and ix.stats()["kind"] == "ivfpq"
        removed = list(range(0, 2500, 5))
        assert ix.remove(removed) == len(removed)
        ix.merge(force=True)  # IVF-PQ drops the removed rows from its lists: no tombstones left
        assert ix.stats()["tombstones"] == 0 and ix.ann.size == 2500 - len(removed)
        ix.add(images(500, start=2500), X[2500:])
        ix.merge(force=True)
        assert ix.stats()["tail_rows"] == 0 and ix.ann.size == 3000 - len(removed)
        alive = np.ones(3000, bool)
        alive[removed] = False
        recalls = []
        for q in clustered_vectors(20, DIM, seed=12):
            got = [m.id for m in search_vectors(ix, q, 10)[0]]
            truth, _ = brute_force(metric, q, X, 10, alive)
            assert not set(got) & set(removed)
            recalls.append(len(set(got) & set(truth)) / 10)
        assert np.mean(recalls) >= 0.9, np.mean(recalls)
        ix.reindex("flat")
        assert ix.stats()["kind"] == "flat" and ix.ann.size == 3000 - len(removed)


def test_a_catalog_smaller_than_the_pca_reindexes_as_hnsw(tmp_path):
    X = clustered_vectors(20, DIM, seed=13)
    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2"), kind="flat", params={"pca_dim": 32}) as ix:
        ix.add(images(20), X)
        ix.merge()
        ix.reindex("hnsw")  # 20 vectors cannot train a 32-d PCA: it keeps 20
        assert ix.stats()["kind"] == "hnsw"
        assert [m.id for m in search_vectors(ix, X[7], 20)[0]] == list(brute_force(IndexMetric("l2"), X[7], X, 20)[0])


def test_index_persists_across_processes(tmp_path):
    metric = metrics()[0]
    X = clustered_vectors(1000, DIM, seed=9)
    np.save(tmp_path / "X.npy", X)
    script = f"""
import json, numpy as np
from lookalike.index import ImageIndex, IndexMetric, NewImage
X = np.load({str(tmp_path / 'X.npy')!r})
metric = IndexMetric.from_dict(json.loads({json.dumps(json.dumps(metric.to_dict()))}))
with ImageIndex.create({str(tmp_path / 'ix')!r}, X.shape[1], metric, backbone_fingerprint="bb", kind="flat") as ix:
    ix.add([NewImage(f"/img/{{i}}.jpg", None, f"{{i:064x}}", 1, 0.0) for i in range(len(X))], X)
    ix.merge()
    ix.remove([3, 4])
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    with ImageIndex.open(tmp_path / "ix") as ix:
        assert ix.size == 998 and ix.manifest["backbone_fingerprint"] == "bb"
        got = search_vectors(ix, X[3], 10)[0]
    alive = np.ones(len(X), bool)
    alive[[3, 4]] = False
    truth, truth_d = brute_force(metric, X[3], X, 10, alive)
    assert [m.id for m in got] == list(truth)
    np.testing.assert_allclose([m.distance for m in got], truth_d)


def test_mismatched_backbone_or_dimension_is_a_clear_error(tmp_path):
    class Other:
        fingerprint, dim = "another-backbone", DIM

    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2"), backbone_fingerprint="mine") as ix:
        with pytest.raises(LookalikeError, match="not the one the index"):
            check_embedder(ix, Other())
        Other.fingerprint, Other.dim = "mine", 512
        with pytest.raises(LookalikeError, match="512-d vectors"):
            check_embedder(ix, Other())
        with pytest.raises(LookalikeError, match="dimension 10"):
            search_vectors(ix, np.ones(10), 5)
        with pytest.raises(LookalikeError, match="vectors of shape"):
            ix.add(images(2), np.ones((2, 10), np.float32))


def test_existing_index_and_foreign_folders_are_not_overwritten(tmp_path):
    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2")) as ix:
        ix.add(images(5), clustered_vectors(5, DIM))
        ix.finish_build()
    with pytest.raises(LookalikeError, match="already holds an index"):
        ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(LookalikeError, match="holds other files"):
        ImageIndex.create(tmp_path / "photos", DIM, IndexMetric("l2"))
    with pytest.raises(LookalikeError, match="not a lookalike index"):
        ImageIndex.open(tmp_path / "photos")
    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("cosine"), overwrite=True) as ix:
        assert ix.size == 0 and ix.metric.kind == "cosine"
    assert Path(tmp_path / "photos" / "a.jpg").exists()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removed_neighbours_do_not_cut_results_short(tmp_path, kind):
    metric = metrics()[0]
    X = clustered_vectors(2000, DIM, seed=11)
    q = X[0]
    nearest, _ = brute_force(metric, q, X, 60)
    with ImageIndex.create(tmp_path / "ix", DIM, metric, kind=kind, params=SMALL) as ix:
        ix.add(images(2000), X)
        ix.merge()
        ix.remove(nearest[:60])  # all of the query's neighbourhood, still inside the FAISS index
        alive = np.ones(2000, bool)
        alive[nearest[:60]] = False
        got = [m.id for m in search_vectors(ix, q, 15)[0]]
    truth, _ = brute_force(metric, q, X, 15, alive)
    assert len(got) == 15 and not set(got) & set(nearest[:60])
    if kind == "flat":
        assert got == list(truth)


def test_ivfpq_chooses_nprobe_and_shortlist_for_the_recall_target_at_build_time(tmp_path):
    metric = metrics()[0]
    X = clustered_vectors(12_000, DIM, seed=13)
    Q = clustered_vectors(40, DIM, seed=14)
    # a shortlist of 20 is far too short for 0.97: the build must find a longer one, and enough cells
    with ImageIndex.create(tmp_path / "ix", DIM, metric, kind="ivfpq", params={**SMALL, "nprobe": 0, "rerank": 20, "target_recall": 0.97}) as ix:
        ix.add(images(12_000), X)
        ix.merge()
        tuned = ix.stats()["tuned"]
        assert tuned["recall"] >= 0.97 and tuned["rerank"] > 20 and tuned["nprobe"] >= 1
        assert (ix.search_params["nprobe"], ix.search_params["rerank"]) == (tuned["nprobe"], tuned["rerank"])
        found = search_vectors(ix, Q, 15)
        ix.add(images(1500, start=12_000), clustered_vectors(1500, DIM, seed=15))
        assert ix.merge() and ix.stats()["tuned"] == tuned  # kept when the tail is merged, redone by a rebuild
    recall = np.mean([len({m.id for m in got} & set(brute_force(metric, q, X, 15)[0])) / 15 for q, got in zip(Q, found)])
    assert recall >= 0.93, recall  # fresh queries, not the catalog images the choice was measured on
    with ImageIndex.create(tmp_path / "fixed", DIM, metric, kind="ivfpq", params=SMALL) as ix:  # nprobe given: nothing to choose
        ix.add(images(12_000), X)
        ix.merge()
        assert ix.stats()["tuned"] == {} and ix.search_params["nprobe"] == SMALL["nprobe"]


def test_each_kind_is_built_as_its_parameters_say():
    """What `train` builds: flat is exact, hnsw and ivfpq search PCA-reduced vectors (each its own size, never more
    than there are training vectors), IVF-PQ has ~sqrt(n) cells within what its sample can train, in L2."""
    dim = 64
    sample = np.random.default_rng(3).normal(size=(IVFPQ_MIN_TRAIN, dim)).astype(np.float32)
    flat = AnnIndex.train("flat", dim, sample[:10], 10, {})
    assert isinstance(faiss.downcast_index(flat.index.index), faiss.IndexFlatL2) and flat.index.d == dim

    def hnsw_parts(index):
        inner = faiss.downcast_index(index.index.index)
        graph = faiss.downcast_index(inner.index) if isinstance(inner, faiss.IndexPreTransform) else inner
        pca = faiss.downcast_VectorTransform(inner.chain.at(0)).d_out if isinstance(inner, faiss.IndexPreTransform) else None
        return pca, graph.d, graph.hnsw.nb_neighbors(1), graph.hnsw.efConstruction

    params = {"hnsw_pca_dim": 24, "pca_dim": 40, "hnsw_m": 8, "ef_construction": 20}
    assert hnsw_parts(AnnIndex.train("hnsw", dim, sample[:500], 500, params)) == (24, 24, 8, 20)
    assert hnsw_parts(AnnIndex.train("hnsw", dim, sample[:20], 20, params)) == (20, 20, 8, 20)  # 20 training vectors: PCA to 20
    assert hnsw_parts(AnnIndex.train("hnsw", dim, sample[:500], 500, params | {"hnsw_pca_dim": 0})) == (None, dim, 8, 20)
    assert hnsw_parts(AnnIndex.train("hnsw", dim, sample[:500], 500, params | {"hnsw_pca_dim": 2 * dim})) == (None, dim, 8, 20)

    def ivf_parts(index):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index.index))
        return isinstance(index.index, faiss.IndexPreTransform), ivf.d, ivf.nlist, ivf.M, ivf.metric_type == faiss.METRIC_L2

    ivf_params = {"pca_dim": 32, "pq_m": 16}
    assert ivf_parts(AnnIndex.train("ivfpq", dim, sample, 250_000, ivf_params)) == (True, 32, IVFPQ_MIN_TRAIN // 39, 16, True)  # sqrt: 500
    assert ivf_parts(AnnIndex.train("ivfpq", dim, sample, 100, ivf_params | {"pca_dim": dim}))[:3] == (False, dim, 16)  # sqrt: 10
    assert ivf_parts(AnnIndex.train("ivfpq", dim, sample, 40_000, ivf_params | {"pca_dim": 0}))[:3] == (False, dim, 200)
    with pytest.raises(LookalikeError, match=r"IVF-PQ needs at least 10,000 images to train, this catalog has 9,999; use --kind flat \(exact\) or --kind hnsw"):
        AnnIndex.train("ivfpq", dim, sample[:-1], 100, ivf_params)
    with pytest.raises(LookalikeError, match="pq_m=24 must divide the reduced dimension 32"):
        AnnIndex.train("ivfpq", dim, sample, 100, ivf_params | {"pq_m": 24})
    with pytest.raises(LookalikeError, match="unknown index kind 'annoy'; choose one of: auto, flat, hnsw, ivfpq"):
        AnnIndex.train("annoy", dim, sample, 100, {})


def test_index_metric_round_trips_and_names_itself():
    """What an index records of its distance (manifest, fingerprint, `index stats`), exactly."""
    m = IndexMetric("learned", [-0.5, -0.25, 0.0], bias=0.3, platt_a=-2.0, platt_b=0.5, norm_bound=1.5)
    recorded = {"kind": "learned", "weights": [-0.5, -0.25, 0.0], "bias": 0.3, "platt_a": -2.0, "platt_b": 0.5, "norm_bound": 1.5}
    assert m.to_dict() == recorded and IndexMetric.from_dict(json.loads(json.dumps(recorded))).to_dict() == recorded
    assert IndexMetric.from_dict({"kind": "learned", "weights": [-1.0]}).to_dict() == {
        "kind": "learned", "weights": [-1.0], "bias": 0.0, "platt_a": None, "platt_b": None, "norm_bound": 1.0
    }
    fingerprints = [
        IndexMetric(*args).fingerprint()
        for args in (("learned", [-0.5, -0.25, 0.0], 0.3), ("learned", [-0.5, -0.25, 0.0], 0.31), ("learned", [-0.5, -0.2, 0.0], 0.3), ("l2",), ("cosine",))
    ]
    assert len(set(fingerprints)) == 5 and all(len(f) == 16 and int(f, 16) >= 0 for f in fingerprints)
    assert IndexMetric.from_dict(recorded).fingerprint() == fingerprints[0]  # calibration is not part of the distance
    assert m.describe() == "learned weighted L2 (3 weights, 2 negative)"
    assert (IndexMetric("l2").describe(), IndexMetric("cosine").describe()) == ("Euclidean (L2)", "cosine (1 - cos)")
    with pytest.raises(LookalikeError, match=r"^unknown distance 'manhattan'; choose one of: learned, l2, cosine$"):
        IndexMetric("manhattan")
    with pytest.raises(LookalikeError, match=r"^the learned distance needs the SVM weights of a trained run$"):
        IndexMetric()


def test_index_metric_distances_and_search_spaces_on_vectors_that_are_not_unit_length():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(20, 6)) * rng.uniform(0.5, 3.0, size=(20, 1))
    q = rng.normal(size=6)
    l2, cos = IndexMetric("l2"), IndexMetric("cosine")
    np.testing.assert_allclose(l2.distance(q, X), np.sqrt(((X - q) ** 2).sum(1)))
    np.testing.assert_allclose(cos.distance(q, X), 1 - X @ q / (np.linalg.norm(X, axis=1) * np.linalg.norm(q)))
    assert l2.data_space(X).dtype == np.float32 and np.allclose(l2.data_space(X), X, atol=1e-6)
    np.testing.assert_allclose(cos.data_space(X), X / np.linalg.norm(X, axis=1, keepdims=True), atol=1e-6)
    assert l2.probability([0.5]) is None and IndexMetric("learned", [-1.0] * 6).probability([0.5]) is None
    calibrated = IndexMetric("learned", [-1.0] * 6, bias=0.4, platt_a=-3.0, platt_b=0.2)
    np.testing.assert_allclose(calibrated.probability([0.5, 1.0]), 1 / (1 + np.exp(-(-3.0 * (0.4 - np.array([0.5, 1.0])) + 0.2))))

    weights = -rng.uniform(0.1, 2.0, 6)
    weights[2] = 0.3  # an old ranker's positive weight: still searchable exactly
    learned = IndexMetric("learned", weights, norm_bound=3.0)
    inside = X / np.linalg.norm(X, axis=1, keepdims=True) * rng.uniform(0.5, 3.0, size=(20, 1))
    gap = ((learned.query_space(q)[0] - learned.data_space(inside)) ** 2).sum(1) - learned.distance(q, inside)
    assert np.ptp(gap) < 1e-4  # L2 in the search space = the learned distance + a constant per query
    at_bound = np.eye(6)[2:3] * 3.0  # only the positive weight's coordinate can run out of headroom
    assert learned.data_space(at_bound).shape == (1, 7) and learned.data_space(at_bound)[0, -1] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(LookalikeError, match=r"a vector of norm 3\.300 is longer than this index allows \(3\.000\); embeddings must be L2-normalised"):
        learned.data_space(at_bound * 1.1)
