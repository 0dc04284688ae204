"""Compaction: removed images' vectors leave the disk, ids and results stay, readers keep their snapshot, `add` compacts past a threshold."""

from __future__ import annotations

import json
import threading

import faiss
import numpy as np
import pytest

from conftest import lookalike_cli, make_dataset
from index_helpers import PixelEmbedder, brute_force, clustered_vectors, images, mixed_weights
from lookalike.index import ImageIndex, IndexMetric, ingest, search_vectors
from lookalike.index.vectors import TUNE_K, AnnIndex, _recall, exact_neighbours

DIM = 32
PARAMS = {"pca_dim": 32, "hnsw_pca_dim": 32, "pq_m": 16, "train_sample": 20_000, "nprobe": 32}
METRIC = IndexMetric("learned", mixed_weights(DIM), 0.3, 2.0, -1.0)


def snapshot(ix: ImageIndex, queries: np.ndarray, k: int = 15) -> list[list[tuple]]:
    """Everything a search reports, per query."""
    return [[(m.id, m.path, m.attribute, m.distance, m.probability) for m in matches] for matches in search_vectors(ix, queries, k)]


def churned_index(path, kind: str, X: np.ndarray) -> ImageIndex:
    """An index of X with a FAISS part, an exact tail, removals and replaced images."""
    n = len(X)
    ix = ImageIndex.create(path, DIM, METRIC, kind=kind, params=PARAMS)
    ix.add(images(n - 500), X[:-500])
    ix.merge(force=True)
    ix.add(images(400, start=n - 500), X[-500:-100])  # stays in the exact tail
    ix.remove(range(0, n - 100, 3))
    # the last 100 ids replace ids 1, 5, 9, ... (another version of the same files): their old rows are retired
    ix.add(images(100, start=n - 100), X[-100:], replaced_ids=list(range(1, 400, 4)))
    return ix


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_compaction_keeps_ids_paths_attributes_and_results(tmp_path, kind):
    X = clustered_vectors(12_000 if kind == "ivfpq" else 2500, DIM, seed=21)  # IVF-PQ trains on 10,000 or more
    Q = clustered_vectors(20, DIM, seed=22)
    ix = churned_index(tmp_path / "ix", kind, X)
    live_entries = ix.entries_by_path()
    before = snapshot(ix, Q)
    stats = ix.stats()
    assert stats["dead_rows"] == stats["vector_rows"] - stats["images"] > 0 and stats["dead_share"] > 0.3

    assert ix.compact()
    after = ix.stats()
    assert (after["dead_rows"], after["dead_share"], after["vector_rows"], after["images"]) == (0, 0.0, stats["images"], stats["images"])
    files = {p.name for p in (tmp_path / "ix").iterdir()}
    assert "vectors.f32" not in files and {f"vectors-{ix.generation:06d}.f32", f"ids-{ix.generation:06d}.npy"} <= files
    assert (tmp_path / "ix" / ix.raw.layout["file"]).stat().st_size == stats["images"] * DIM * 4
    assert snapshot(ix, Q) == before
    assert ix.entries_by_path() == live_entries
    assert not ix.compact()  # nothing left to drop
    ix.close()
    with ImageIndex.open(tmp_path / "ix") as reopened:
        assert snapshot(reopened, Q) == before and reopened.entries_by_path() == live_entries
        # the removed images' catalog rows are gone with their vectors
        assert reopened.catalog.db.execute("SELECT COUNT(*) FROM images WHERE removed_gen IS NOT NULL").fetchone()[0] == 0


def test_ids_keep_working_across_appends_and_repeated_compactions(tmp_path):
    X = clustered_vectors(3000, DIM, seed=31)
    with ImageIndex.create(tmp_path / "ix", DIM, METRIC, kind="flat") as ix:
        alive = np.zeros(len(X), bool)
        for step, start in enumerate(range(0, 3000, 600)):
            ix.add(images(600, start=start), X[start : start + 600])
            alive[start : start + 600] = True
            gone = np.flatnonzero(alive)[step::4]
            ix.remove(gone)
            alive[gone] = False
            assert ix.compact() and ix.stats()["dead_rows"] == 0
            ix.merge()
            live = np.flatnonzero(alive)
            np.testing.assert_array_equal(ix.vectors()[live], X[live])  # looked up by id, wherever the row now lives
            for q in X[live[::97]]:
                truth, truth_d = brute_force(METRIC, q, X, 10, alive)
                got = search_vectors(ix, q, 10)[0]
                assert [m.id for m in got] == list(truth) and [m.path for m in got] == [f"/img/{i}.jpg" for i in truth]
                np.testing.assert_allclose([m.distance for m in got], truth_d, rtol=1e-10)
        with pytest.raises(IndexError, match="no stored vector"):
            ix.vectors()[np.flatnonzero(~alive[:3000])[0]]


def test_a_reader_keeps_its_snapshot_while_the_index_is_compacted(tmp_path):
    X = clustered_vectors(1200, DIM, seed=41)
    Q = X[:10]
    with ImageIndex.create(tmp_path / "ix", DIM, METRIC, kind="flat") as writer:
        writer.add(images(1200), X)
        writer.merge(force=True)
        reader = ImageIndex.open(tmp_path / "ix")
        before = snapshot(reader, Q, 40)
        removed = {m[0] for m in before[0][:20]} | set(range(500, 900))
        writer.remove(removed)  # the reader still sees these images
        assert writer.compact()
        assert not (tmp_path / "ix" / "vectors.f32").exists()  # deleted while the reader has it mapped
        assert snapshot(reader, Q, 40) == before
        assert reader.entries([before[0][0][0]])[before[0][0][0]].path == before[0][0][1]
        reader.close()
        with ImageIndex.open(tmp_path / "ix") as fresh:
            assert fresh.size == 1200 - len(removed) and not {m.id for m in search_vectors(fresh, Q[0], 40)[0]} & removed


def test_searches_go_on_during_compactions(tmp_path):
    """A searcher that reopens on every query, as the service does, never fails or sees a removed image while a writer compacts."""
    X = clustered_vectors(4000, DIM, seed=51)
    keep = np.arange(0, 4000, 10)  # never removed: each is its own nearest match
    errors, searches = [], [0]
    done = threading.Event()

    def search_loop():
        while not done.is_set():
            try:
                with ImageIndex.open(tmp_path / "ix") as ix:
                    q = keep[searches[0] % len(keep)]
                    got = search_vectors(ix, X[q], 5)[0]
                    assert got[0].id == q and got[0].path == f"/img/{q}.jpg", got[0]
                    assert all(ix.alive[m.id] for m in got)
                    searches[0] += 1
            except Exception as e:  # noqa: BLE001 - collected and reported by the test
                errors.append(repr(e))
                return

    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2"), kind="flat") as writer:
        writer.add(images(4000), X)
        writer.merge(force=True)
        thread = threading.Thread(target=search_loop)
        thread.start()
        try:
            for start in range(1, 10, 2):
                writer.remove([i for i in range(start, 4000, 10)])
                assert writer.compact()
        finally:
            done.set()
            thread.join()
    assert not errors, errors
    assert searches[0] > 5


def test_stats_report_dead_rows_and_add_compacts_past_the_threshold(tmp_path):
    images_dir = make_dataset(tmp_path / "photos", per_attribute=5, size=24)
    embedder = PixelEmbedder()

    def delete(paths):
        by_path = ix.entries_by_path()
        ix.remove([by_path[str(p)].id for p in paths])
        for p in paths:
            p.unlink()

    with ImageIndex.create(tmp_path / "ix", PixelEmbedder.dim, IndexMetric("l2"), PixelEmbedder.fingerprint) as ix:
        ingest(ix, images_dir, embedder, progress=False)
        delete(sorted((images_dir / "dots").iterdir())[:3])
        assert (ix.stats()["dead_rows"], ix.stats()["dead_share"]) == (3, 0.2)
        # a changed file retires its old row too: 4 dead of 16 stored is not more than the default 0.25
        changed = sorted((images_dir / "stripes").iterdir())[0]
        changed.write_bytes((images_dir / "checks" / "000.png").read_bytes())
        report = ingest(ix, images_dir, embedder, progress=False)
        assert (report.changed, report.compacted, ix.stats()["dead_rows"]) == (1, False, 4)
        delete(sorted((images_dir / "dots").iterdir())[:1])
        report = ingest(ix, images_dir, embedder, progress=False, compact_above=1.0)  # 1 = never
        assert not report.compacted and ix.stats()["dead_rows"] == 5
        report = ingest(ix, images_dir, embedder, progress=False)  # 5/16 > 0.25
        assert report.compacted and ix.stats()["dead_rows"] == 0 and ix.stats()["images"] == 11
        by_path = ix.entries_by_path()
        stored = ix.vectors()[[by_path[p].id for p in sorted(by_path)]]
        np.testing.assert_allclose(stored, embedder.embed(sorted(by_path))[0], rtol=1e-6)


def test_compact_and_stats_from_the_command_line(tmp_path):
    X = clustered_vectors(300, DIM, seed=61)
    with ImageIndex.create(tmp_path / "ix", DIM, METRIC, kind="flat") as ix:
        ix.add(images(300), X)
        ix.remove(range(0, 300, 4))
        before = snapshot(ix, X[:5])
    stats = json.loads(lookalike_cli("index", "stats", tmp_path / "ix", "--json").stdout)
    assert (stats["dead_rows"], stats["dead_share"]) == (75, 0.25)
    done = json.loads(lookalike_cli("index", "compact", tmp_path / "ix", "--json").stdout)
    assert done == {"compacted": True, "dropped_rows": 75, "vector_rows": 225, "images": 225}
    with ImageIndex.open(tmp_path / "ix") as ix:
        assert snapshot(ix, X[:5]) == before


@pytest.mark.parametrize("k,chunk", [(1, 700), (3, 7), (16, 700), (16, 1), (40, 333)])
def test_exact_neighbours_across_chunks_match_brute_force(k, chunk):
    """The brute force behind compaction's and tuning's ground truth, for any k and chunking (a one-off in the partition loses neighbours)."""
    X = clustered_vectors(2500, DIM, seed=71)
    ids = np.arange(10_000, 12_500)
    Q = clustered_vectors(30, DIM, seed=72)
    got = exact_neighbours(Q, ((ids[s : s + chunk], X[s : s + chunk]) for s in range(0, 2500, chunk)), k)
    d = ((Q[:, None, :].astype(np.float64) - X[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(got, ids[np.argsort(d, axis=1, kind="stable")[:, :k]])


def test_recall_counts_each_querys_true_neighbours_without_itself_or_padding():
    """How tuning scores a setting: the share of each query's first TUNE_K true neighbours found, itself and -1 padding left out."""
    truth = np.array([[7, 0, 3, -1, -1], [4, 5, 6, 8, 9]])
    found = np.array([[0, 3, 11, 12], [4, 5, 20, 21]])
    own = np.array([7, 9])
    # query 7: true neighbours {0, 3} (itself and the padding dropped), both found; query 9: {4, 5, 6, 8}, 2 found
    assert _recall(found, truth, own) == pytest.approx((2 / 2 + 2 / 4) / 2)
    many = np.arange(TUNE_K + 5)[None]
    assert _recall(many[:, :TUNE_K], many + 100, np.array([-5])) == 0.0
    assert _recall(many[:, TUNE_K:], many, np.array([-5])) == 0.0  # only the first TUNE_K true neighbours count
    assert _recall(np.array([[5]]), np.array([[3, 5]]), np.array([3])) == 1.0  # one true neighbour, found
    assert _recall(np.array([[1]]), np.array([[3, -1]]), np.array([3])) == 0.0  # nothing left to find: no division by zero


class _ScriptedIVF(AnnIndex):
    """An IVF index whose searches are scripted: for each nprobe, where in the shortlist each true neighbour lands."""

    size = 100_000

    def __init__(self, landing: dict[int, list[int]]):
        self.quantizer = faiss.IndexFlatL2(4)
        super().__init__(faiss.IndexIVFFlat(self.quantizer, 4, 16), "ivfpq")  # 16 cells: nprobe 1, 2, 3, 4, 6, 8, 11, 16
        self.landing, self.calls = landing, []

    def search(self, queries, k, params):
        self.calls.append((params["nprobe"], k))
        found = 50_000 + np.tile(np.arange(k), (len(queries), 1))  # ids that are nobody's true neighbour
        for j, position in enumerate(self.landing[min(params["nprobe"], max(self.landing))]):
            if position < k:
                found[:, position] = 1000 + j
        return found


@pytest.mark.parametrize(
    "landing, chosen, calls",
    [
        # the shortest shortlist wins even at more cells, and nothing shorter is left to find: stop there
        ({1: [*range(12), 550], 2: [*range(13), 250], 3: [*range(14), 700]}, (3, 100, 14 / 15), [1, 2, 3]),
        # the target is met at the third shortlist (x3); more cells no longer raise recall: stop, keep the first nprobe
        ({1: [*range(13), 290], 2: [*range(13), 290]}, (1, 300, 14 / 15), [1, 2]),
        # never met: the longest shortlist at the last nprobe tried, which stops once recall stops growing
        ({1: [*range(10)], 2: [*range(10), 700], 3: [*range(10), 700, 710], 4: [*range(10), 700, 710]}, (4, 800, 12 / 15), [1, 2, 3, 4]),
    ],
)
def test_tuning_takes_the_shortest_shortlist_then_the_fewest_cells(landing, chosen, calls):
    """IVF-PQ's build-time choice of nprobe and shortlist, on scripted searches (shortlists x1, 1.5, 2, 3, 4, 6, 8 of 100)."""
    ivf = _ScriptedIVF(landing)
    truth = (1000 + np.arange(TUNE_K + 2))[None]  # one query (a mean over several could round below the target)
    got = ivf.tune(np.zeros((1, 4), np.float32), truth, own=np.array([-7]), rerank=100, target=14 / 15)
    assert (got["nprobe"], got["rerank"]) == chosen[:2] and got["recall"] == pytest.approx(chosen[2])
    assert ivf.calls == [(p, 801) for p in calls]  # one search per nprobe, as long as the longest shortlist + itself


def test_a_reader_with_a_manifest_a_compaction_has_just_superseded_reads_the_new_one(tmp_path, monkeypatch):
    """The race behind a rare failure of the test above: a reader reads the manifest, a compaction then deletes the
    ids file that manifest names, and the reader must take the next manifest, not fail with FileNotFoundError."""
    from lookalike.index import store

    X = clustered_vectors(300, DIM, seed=61)
    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2"), kind="flat") as writer:
        writer.add(images(300), X)
        writer.merge(force=True)
        writer.remove(range(0, 300, 3))
        assert writer.compact()
        stale = json.loads((tmp_path / "ix" / "manifest.json").read_text())
        writer.remove(range(1, 300, 3))
        assert writer.compact()
    assert not (tmp_path / "ix" / stale["vectors"]["ids"]).exists()
    manifests = iter([stale])
    real = store._read_manifest
    monkeypatch.setattr(store, "_read_manifest", lambda directory: next(manifests, None) or real(directory))
    with ImageIndex.open(tmp_path / "ix") as ix:
        assert ix.size == 100 and search_vectors(ix, X[2], 1)[0][0].id == 2
