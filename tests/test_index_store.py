"""ImageIndex's own bookkeeping on small indexes: what `index stats` reports, the refusals, the manifest on disk,
resuming an interrupted build, repairs after a crash, when merges run, what tuning measures, lookups by id."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

from index_helpers import brute_force, clustered_vectors, images, mixed_weights
from lookalike.errors import LookalikeError
from lookalike.index import ImageIndex, IndexMetric, search_vectors
from lookalike.index.vectors import DEFAULT_PARAMS, TUNE_K, AnnIndex

DIM = 16
L2 = IndexMetric("l2")
KNOWN_PARAMS = ", ".join(DEFAULT_PARAMS)


def exactly(text: str) -> str:
    """A pytest.raises pattern matching the whole message."""
    return f"^{re.escape(text)}$"


def files_in(path) -> set[str]:
    return {p.name for p in path.iterdir()}


def crash_before_commit(ix: ImageIndex, monkeypatch, update) -> None:
    """Run `update` on `ix` as a writer that dies just before its manifest is written (everything else is on disk)."""

    def die(**changes):
        raise KeyboardInterrupt("killed before the commit")

    with monkeypatch.context() as m:
        m.setattr(ix, "_publish", die)
        with pytest.raises(KeyboardInterrupt):
            update(ix)


# ---- stats -------------------------------------------------------------------------------------


def test_stats_report_the_counts_layout_and_settings_of_a_known_index(tmp_path, monkeypatch):
    from lookalike.index import store

    clock = [1_600_000_000.0]  # the index's clock, set by the test
    monkeypatch.setattr(store, "time", SimpleNamespace(time=lambda: clock[0], strftime=time.strftime, localtime=time.localtime))
    X = clustered_vectors(35, DIM, seed=1)
    path = tmp_path / "ix"
    with ImageIndex.create(path, DIM, L2, backbone_fingerprint="bb", kind="flat", params={"hnsw_m": 8}, run_dir="runs/demo") as ix:
        empty = ix.stats()
        assert {k: empty[k] for k in ("images", "attributes", "kind", "indexed_rows", "tail_rows", "tombstones", "vector_rows", "dead_rows", "dead_share", "tuned")} == {
            "images": 0, "attributes": {}, "kind": None, "indexed_rows": 0, "tail_rows": 0, "tombstones": 0,
            "vector_rows": 0, "dead_rows": 0, "dead_share": 0.0, "tuned": {},
        }  # fmt: skip
        ix.add(images(30), X[:30])  # generation 1; attributes a, b, c in turn
        assert ix.merge()  # generation 2: the FAISS file holds ids 0-29
        # generation 3: ids 30-34 wait in the exact tail, and 3 is retired (as a changed file's old version is)
        ix.add(images(5, start=30), X[30:], replaced_ids=[3])
        clock[0] += 3600.4  # an hour later
        assert ix.remove([0, 30]) == 2  # generation 4: 0 and 3 still in the FAISS file, 30 in the tail (all a's)
        (path / ".ann-000005.faiss.tmp").write_bytes(b"a writer's file in the making")
        (path / "old").mkdir()  # a folder is not a file of the index
        stats = ix.stats()
        manifest_bytes, present = (path / "manifest.json").stat().st_size, files_in(path)
    assert stats["directory"] == str(path.resolve())
    assert (stats["images"], stats["attributes"]) == (32, {"a": 9, "b": 12, "c": 11})
    assert (stats["dim"], stats["distance"], stats["kind_requested"], stats["kind"]) == (DIM, "Euclidean (L2)", "flat", "flat")
    assert (stats["indexed_rows"], stats["tail_rows"], stats["tombstones"]) == (30, 5, 2)
    assert (stats["vector_rows"], stats["dead_rows"], stats["dead_share"]) == (35, 3, 0.0857)  # 3/35, 4 decimals
    assert (stats["tuned"], stats["generation"], stats["backbone_fingerprint"], stats["run_dir"]) == ({}, 4, "bb", "runs/demo")
    assert stats["params"] == {**DEFAULT_PARAMS, "hnsw_m": 8}
    files = stats["files_bytes"]
    assert {"manifest.json", "catalog.sqlite", "vectors.f32", "ann-000002.faiss"} <= set(files) <= present
    assert "old" not in files and not any(name.startswith(".") for name in files)  # nor is another writer's file in the making
    assert files["vectors.f32"] == 35 * DIM * 4 and files["manifest.json"] == manifest_bytes
    assert files["ann-000002.faiss"] >= 30 * DIM * 4  # the flat index holds the 30 merged vectors
    assert stats["updated"] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_600_003_600))  # the last update's time


# ---- creating: refusals, resuming, overwriting -------------------------------------------------


def test_create_and_reindex_refuse_unknown_kinds_and_parameters_by_name(tmp_path, capsys):
    with pytest.raises(LookalikeError, match=exactly("unknown index kind 'annoy'; choose one of: auto, flat, hnsw, ivfpq")):
        ImageIndex.create(tmp_path / "new", DIM, L2, kind="annoy")
    with pytest.raises(LookalikeError, match=exactly(f"unknown index parameter(s) ['efsearch', 'm']; known: {KNOWN_PARAMS}")):
        ImageIndex.create(tmp_path / "new", DIM, L2, params={"m": 8, "efsearch": 50, "hnsw_m": 8})
    assert not (tmp_path / "new").exists()  # refused before anything was written
    (tmp_path / "afile").write_text("x")
    with pytest.raises(LookalikeError, match=exactly(f"{tmp_path / 'afile'} is a file; --out must be a folder for the index")):
        ImageIndex.create(tmp_path / "afile", DIM, L2)

    X = clustered_vectors(20, DIM, seed=2)
    with ImageIndex.create(tmp_path / "ix", DIM, L2, kind="flat", params={"ef_search": 50}) as ix:
        ix.add(images(20), X)
        ix.merge()
        generation = ix.generation
        with pytest.raises(LookalikeError, match=exactly("unknown index kind 'annoy'; choose one of: auto, flat, hnsw, ivfpq")):
            ix.reindex("annoy")
        with pytest.raises(LookalikeError, match=exactly(f"unknown index parameter(s) ['efsearch']; known: {KNOWN_PARAMS}")):
            ix.reindex("hnsw", {"efsearch": 50})
        assert ix.generation == generation and ix.stats()["kind"] == "flat"  # nothing changed
        capsys.readouterr()
        ix.reindex("hnsw", {"hnsw_m": 8}, progress=True)
        assert capsys.readouterr().out == "Training the hnsw index on 20 vectors\n"
        # the new parameter joins the ones given at creation; ids and answers stay
        assert (ix.stats()["kind"], ix.params["hnsw_m"], ix.params["ef_search"]) == ("hnsw", 8, 50)
        assert [m.id for m in search_vectors(ix, X[4], 20)[0]] == list(brute_force(L2, X[4], X, 20)[0])
        ix.reindex()  # no kind: the index's own (hnsw), rebuilt
        assert (ix.stats()["kind"], ix.stats()["kind_requested"], ix.size) == ("hnsw", "hnsw", 20)
        ix.reindex("auto", progress=True)  # what `lookalike index reindex` asks for without --kind: flat for 20 images
        assert (ix.stats()["kind"], ix.stats()["kind_requested"], capsys.readouterr().out) == ("flat", "auto", "")  # nothing to train


def test_create_takes_an_empty_folder_or_its_own_leftovers_but_refuses_other_files(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    theirs = ["b.jpg", "notes.tmp", "a.jpg", ".DS_Store"]  # hidden or .tmp, they are the user's all the same
    for name in theirs:
        (photos / name).write_bytes(b"x")
    with pytest.raises(LookalikeError, match=exactly(f"{photos} holds other files (.DS_Store, a.jpg, b.jpg); choose an empty or new folder for the index")) as refused:
        ImageIndex.create(photos, DIM, L2)
    assert files_in(photos) == {*theirs, "writer.lock"}  # nothing of the user's deleted
    for name in theirs:
        (photos / name).unlink()
    with ImageIndex.create(photos, DIM, L2) as ix:  # the refusal let go of the writer lock (its error, still held, did not keep it)
        assert ix.size == 0 and refused.value

    # what an index writes is not "other files": a half-made index without a manifest is started afresh
    leftovers = tmp_path / "leftovers"
    leftovers.mkdir()
    own = ["catalog.sqlite-journal", "vectors.f32", "vectors-000004.f32", "ids-000004.npy", "ann-000003.faiss", ".manifest.json.tmp"]
    for name in own:
        (leftovers / name).write_bytes(b"stale")
    with ImageIndex.create(leftovers, DIM, L2) as ix:
        assert (ix.size, ix.rows, ix.generation) == (0, 0, 0)
        assert files_in(leftovers).isdisjoint(own[1:])


def test_a_new_index_records_its_settings_in_the_manifest(tmp_path):
    metric = IndexMetric("learned", -np.linspace(0.1, 1.0, DIM), bias=0.2, platt_a=-3.0, platt_b=0.5)
    before = time.time()
    with ImageIndex.create(tmp_path / "ix", DIM, metric, backbone_fingerprint="bb", kind="hnsw", params={"ef_search": 50}, run_dir="runs/x"):
        pass
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    created = manifest.pop("created")
    assert before <= created <= time.time() and manifest.pop("updated") == created
    assert manifest == {
        "format": "lookalike.index/2", "generation": 0, "rows": 0, "dim": DIM, "kind": "hnsw",
        "params": {**DEFAULT_PARAMS, "ef_search": 50}, "metric": metric.to_dict(), "metric_fingerprint": metric.fingerprint(),
        "backbone_fingerprint": "bb", "run_dir": "runs/x", "vectors": {"file": "vectors.f32", "ids": None, "appended_from": 0},
        "ann": None, "building": True,
    }  # fmt: skip


def test_an_interrupted_build_resumes_only_with_the_same_settings(tmp_path, monkeypatch):
    X = clustered_vectors(12, DIM, seed=3)
    path = tmp_path / "ix"
    settings = {"dim": DIM, "metric": L2, "backbone_fingerprint": "bb", "kind": "flat"}
    with ImageIndex.create(path, **settings) as ix:
        ix.add(images(6), X[:6])
        crash_before_commit(ix, monkeypatch, lambda ix: ix.add(images(3, start=6), X[6:9]))  # rows written, never committed
    refused = exactly(f"{path} already holds an index; use `lookalike index add` to update it, or pass --overwrite to rebuild it")
    for changed in ({"dim": DIM + 1}, {"metric": IndexMetric("cosine")}, {"backbone_fingerprint": "other"}, {"kind": "hnsw"}):
        with pytest.raises(LookalikeError, match=refused):
            ImageIndex.create(path, **{**settings, **changed})
    with ImageIndex.create(path, **settings) as ix:  # the same settings: carry on from the last commit
        assert (ix.size, ix.rows, ix.entries([6, 7, 8])) == (6, 6, {})
        assert (path / "vectors.f32").stat().st_size == 6 * DIM * 4  # the uncommitted rows are gone
        np.testing.assert_array_equal(ix.add(images(6, start=6), X[6:]), np.arange(6, 12))
        np.testing.assert_array_equal(ix.vectors_of(range(12)), X)
        ix.merge()
        ix.finish_build()
    with pytest.raises(LookalikeError, match=refused):  # finished: not resumed, even with the same settings
        ImageIndex.create(path, **settings)
    with ImageIndex.create(path, **settings, overwrite=True) as ix:
        assert (ix.size, ix.rows, ix.generation, ix.manifest["building"]) == (0, 0, 0, True)
        assert not [name for name in files_in(path) if name.startswith(("vectors", "ann-"))]  # nothing of the old index left
        with pytest.raises(LookalikeError, match="is being updated by another lookalike process"):
            ImageIndex.open(path, writable=True)  # clearing the folder kept the writer's lock


# ---- opening -----------------------------------------------------------------------------------


def test_opening_what_is_not_a_readable_index_says_why_and_names_the_file(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(LookalikeError, match=exactly(f"{folder} is not a lookalike index: no manifest.json; create one with `lookalike index build`")):
        ImageIndex.open(folder)
    (folder / "catalog.sqlite").write_bytes(b"")
    hint = " (an interrupted build? run `lookalike index build` again)"
    with pytest.raises(LookalikeError, match=exactly(f"{folder} is not a lookalike index: no manifest.json{hint}; create one with `lookalike index build`")):
        ImageIndex.open(folder, writable=True)

    with ImageIndex.create(tmp_path / "ix", DIM, L2) as ix:
        ix.add(images(3), clustered_vectors(3, DIM))
    manifest = tmp_path / "ix" / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text('{"format": "lookalike.index/2", "generation": ')  # cut short
    with pytest.raises(LookalikeError, match=f"^cannot read {re.escape(str(manifest))}: Expecting value: line 1"):
        ImageIndex.open(tmp_path / "ix")
    for fmt in ("lookalike.index/3", None):
        manifest.write_text(json.dumps({**good, "format": fmt}))
        message = f"{manifest} has format {fmt!r}, this version of lookalike reads lookalike.index/1 and lookalike.index/2"
        with pytest.raises(LookalikeError, match=exactly(message)) as refused:
            ImageIndex.open(tmp_path / "ix", writable=True)
    manifest.write_text(json.dumps(good))
    with ImageIndex.create(tmp_path / "ix", DIM, L2) as ix:  # a failed open let go of the writer lock (its error is still held)
        assert ix.size == 3 and refused.value  # (resumed: the same settings, still building)


def test_an_index_written_by_the_first_format_opens_and_is_upgraded_by_its_next_update(tmp_path):
    X = clustered_vectors(10, DIM, seed=4)
    with ImageIndex.create(tmp_path / "ix", DIM, L2, kind="flat") as ix:
        ix.add(images(8), X[:8])
        ix.merge()
    manifest = tmp_path / "ix" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["vectors"]  # format 1 had no compaction, so no vectors layout
    manifest.write_text(json.dumps({**old, "format": "lookalike.index/1"}))
    with ImageIndex.open(tmp_path / "ix") as ix:
        assert ix.size == 8 and [m.id for m in search_vectors(ix, X[2], 3)[0]] == list(brute_force(L2, X[2], X[:8], 3)[0])
    with ImageIndex.open(tmp_path / "ix", writable=True) as ix:
        ix.add(images(2, start=8), X[8:])
    upgraded = json.loads(manifest.read_text())
    assert upgraded["format"] == "lookalike.index/2" and upgraded["vectors"] == {"file": "vectors.f32", "ids": None, "appended_from": 0}


def test_a_writer_repairs_what_a_crashed_update_left_and_a_reader_leaves_it(tmp_path, monkeypatch):
    X = clustered_vectors(40, DIM, seed=5)
    path = tmp_path / "ix"
    with ImageIndex.create(path, DIM, L2, kind="flat") as ix:
        ix.add(images(30), X[:30])
        ix.merge()  # generation 2: ann-000002.faiss
        ix.remove(range(0, 30, 2))  # generation 3
        answer = [m.id for m in search_vectors(ix, X[1], 15)[0]]

    def check(reader_sees: set[str], writer_sees: set[str], vector_bytes: int, catalog_rows: int) -> None:
        with ImageIndex.open(path) as reader:  # a reader repairs nothing
            assert reader.size == 15 and [m.id for m in search_vectors(reader, X[1], 15)[0]] == answer
            assert reader_sees <= files_in(path)
        with ImageIndex.open(path, writable=True) as ix:
            assert not writer_sees & files_in(path) and {*ix.raw.files, ix.manifest["ann"]["file"]} <= files_in(path)
            assert (path / ix.raw.layout["file"]).stat().st_size == vector_bytes
            assert ix.catalog.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == catalog_rows
            assert ix.size == 15 and [m.id for m in search_vectors(ix, X[1], 15)[0]] == answer

    # an addition that wrote its vectors and catalog rows, and a removal that retired catalog rows, never committed
    with ImageIndex.open(path, writable=True) as ix:
        crash_before_commit(ix, monkeypatch, lambda ix: ix.add(images(10, start=30), X[30:], replaced_ids=[1]))
    assert (path / "vectors.f32").stat().st_size == 40 * DIM * 4
    check(set(), set(), 30 * DIM * 4, 30)  # the 10 rows and their catalog entries are gone, 1 is back; the 15 removed stay
    with ImageIndex.open(path, writable=True) as ix:
        crash_before_commit(ix, monkeypatch, lambda ix: ix.remove([1, 3, 5]))
    check(set(), set(), 30 * DIM * 4, 30)

    # a merge that wrote its FAISS file (and a temporary file) but never committed them
    with ImageIndex.open(path, writable=True) as ix:
        crash_before_commit(ix, monkeypatch, lambda ix: ix.merge(force=True))
    (path / ".manifest.json.tmp").write_text("{")
    stray = {"ann-000004.faiss", ".manifest.json.tmp"}
    for name in ("notes.tmp", ".notes"):  # not the index's, whatever their names look like
        (path / name).write_text("mine")
    check(stray | {"notes.tmp", ".notes"}, stray, 30 * DIM * 4, 30)
    assert {"notes.tmp", ".notes"} <= files_in(path)

    # a compaction that committed, then died before deleting the old file and the removed images' catalog rows
    with ImageIndex.open(path, writable=True) as ix:
        monkeypatch.setattr(ix, "_delete_unnamed_files", lambda: None)
        monkeypatch.setattr(ix.catalog, "purge", lambda generation: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            ix.compact()
        monkeypatch.undo()
    check({"vectors.f32"}, {"vectors.f32"}, 15 * DIM * 4, 15)

    with ImageIndex.open(path, writable=True) as ix:
        np.testing.assert_array_equal(ix.add(images(10, start=30), X[30:]), np.arange(30, 40))
        np.testing.assert_array_equal(ix.vectors_of(range(1, 40, 2)), X[1:40:2])


# ---- lookups by id -----------------------------------------------------------------------------


def test_vectors_of_and_is_live_follow_additions_removals_and_compactions(tmp_path):
    X = clustered_vectors(41, DIM, seed=6)
    with ImageIndex.create(tmp_path / "ix", DIM, L2, kind="flat") as ix:
        ix.add(images(30), X[:30])
        assert [m.id for m in search_vectors(ix, X[7], 5)[0]] == list(brute_force(L2, X[7], X[:30], 5)[0])  # no FAISS index yet: all tail
        np.testing.assert_array_equal(ix.vectors_of([7, 2, 7]), X[[7, 2, 7]])
        mine = ix.vectors_of(np.array([5]))
        mine *= 2  # a copy the caller may change
        np.testing.assert_array_equal(ix.vectors_of([5]), X[[5]])
        ix.remove([2])
        assert [ix.is_live(i) for i in (-1, 0, 2, 3, 29, 30)] == [False, True, False, True, True, False]
        np.testing.assert_array_equal(ix.vectors_of([2]), X[[2]])  # a removed image's row stays until a compaction
        ix.add(images(10, start=30), X[30:40])  # the vectors file grew since it was last read
        assert ix.is_live(39) and not ix.is_live(40)
        np.testing.assert_array_equal(ix.vectors_of([39, 1]), X[[39, 1]])
        assert ix.compact()  # one removed image is enough to compact (above=0)
        with pytest.raises(IndexError, match="image id 2 has no stored vector"):
            ix.vectors_of([2])
        ix.add(images(1, start=40), X[40:])
        np.testing.assert_array_equal(ix.vectors_of([40, 0, 39]), X[[40, 0, 39]])
    with ImageIndex.open(tmp_path / "ix") as reader:
        assert [reader.is_live(i) for i in (0, 2, 4, 40, 41)] == [True, False, True, True, False]
        np.testing.assert_array_equal(reader.vectors_of([40, 3]), X[[40, 3]])


def test_a_known_contents_vector_is_reused_while_a_row_holds_it(tmp_path):
    """The content-hash cache: a file whose content the index has seen (live or removed image) needs no embedding,
    until a compaction drops the removed image's row."""
    X = clustered_vectors(4, DIM, seed=9)
    with ImageIndex.create(tmp_path / "ix", DIM, L2, kind="flat") as ix:
        ix.add(images(4), X)
        sha = images(4)[2].sha256
        np.testing.assert_array_equal(ix.reuse_vector(sha), X[2])
        ix.remove([2])
        np.testing.assert_array_equal(ix.reuse_vector(sha), X[2])
        assert ix.reuse_vector("f" * 64) is None
        ix.compact()
        assert ix.reuse_vector(sha) is None


def test_catalog_entries_by_path_and_touch(tmp_path):
    with ImageIndex.create(tmp_path / "ix", DIM, L2) as ix:
        ix.add(images(12), clustered_vectors(12, DIM))
        ix.remove([11])
        assert sorted(ix.entries_by_path()) == [f"/img/{i}.jpg" for i in sorted(range(11), key=lambda i: f"/img/{i}.jpg")]
        assert list(ix.entries_by_path("/img/1.jpg")) == ["/img/1.jpg"] and ix.entries_by_path("/img/11.jpg") == {}
        # an unchanged file's new size and time: recorded without an update
        generation = ix.generation
        ix.touch(1, 555, 99.5)
        assert (ix.entries([1])[1].size, ix.entries([1])[1].mtime, ix.entries([0])[0].size) == (555, 99.5, 100)
        assert ix.generation == generation


def test_a_read_only_index_refuses_updates_and_an_update_refuses_mismatched_vectors(tmp_path):
    X = clustered_vectors(5, DIM, seed=10)
    with ImageIndex.create(tmp_path / "ix", DIM, L2) as ix:
        ix.add(images(3), X[:3])
        with pytest.raises(LookalikeError, match=exactly(f"got vectors of shape (2, {DIM}) for 3 images; this index stores {DIM}-d vectors")):
            ix.add(images(3, start=3), X[3:5])
        assert ix.remove([3, -1, 99, 0]) == 1  # only 0 is an image of the index
        assert ix.remove([0]) == 0 and (ix.size, ix.rows) == (2, 3)
        ix.close()  # closing twice (here and on leaving the block) is harmless
    reader = ImageIndex.open(tmp_path / "ix")
    refused = exactly(f"{tmp_path / 'ix'} was opened read-only; open it with writable=True to change it")
    for update in (
        lambda ix: ix.add(images(1, start=3), X[3:4]),
        lambda ix: ix.remove([1]),
        lambda ix: ix.merge(force=True),
        lambda ix: ix.compact(),
        lambda ix: ix.reindex("flat"),
        lambda ix: ix.finish_build(),
    ):
        with pytest.raises(LookalikeError, match=refused):
            update(reader)
    assert (reader.size, reader.generation) == (2, 2)
    reader.close()
    reader.close()


def test_a_reader_that_never_sees_a_stable_index_gives_up_with_a_clear_message(tmp_path, monkeypatch):
    from lookalike.index import store

    with ImageIndex.create(tmp_path / "ix", DIM, L2, kind="flat") as writer:
        writer.add(images(30), clustered_vectors(30, DIM))
        writer.remove(range(0, 30, 3))
        writer.compact()
        stale = json.loads((tmp_path / "ix" / "manifest.json").read_text())
        writer.remove([1])
        writer.compact()  # deletes the ids file the stale manifest names
    monkeypatch.setattr(store, "_read_manifest", lambda directory: stale)  # every read races a compaction
    with pytest.raises(LookalikeError, match=exactly(f"{tmp_path / 'ix'} keeps changing under this reader; try again")):
        ImageIndex.open(tmp_path / "ix")


# ---- merging -----------------------------------------------------------------------------------


def test_merging_an_empty_index_builds_nothing(tmp_path):
    with ImageIndex.create(tmp_path / "ix", DIM, L2, kind="flat") as ix:
        assert not ix.merge() and not ix.merge(force=True)
        ix.add(images(4), clustered_vectors(4, DIM))
        ix.remove(range(4))
        assert not ix.merge(force=True) and ix.stats()["kind"] is None
        assert not [name for name in files_in(tmp_path / "ix") if name.startswith("ann-")]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removals_fold_into_the_faiss_index_as_its_kind_allows(tmp_path, capsys, kind):
    """Flat drops removed rows at each merge; an HNSW graph cannot, so its tombstones stay until they pass 30% of
    the graph, which then is rebuilt."""
    X = clustered_vectors(110, DIM, seed=7)
    path = tmp_path / "ix"
    with ImageIndex.create(path, DIM, L2, kind=kind) as ix:
        ix.add(images(100), X[:100])
        assert ix.merge()
        ix.remove(range(30))
        assert not ix.merge()  # 30 of 100 is not more than 30%, and far below the merge threshold
        ix.add(images(10, start=100), X[100:])
        assert ix.merge(force=True)  # the tail goes in either way
        expected = {"flat": (0, 80), "hnsw": (30, 110)}[kind]  # (tombstones, rows the FAISS index holds)
        assert (ix.stats()["tombstones"], ix.ann.size, ix.stats()["tail_rows"]) == (*expected, 0)
        ix.remove([30, 31, 32])  # hnsw: 33 tombstones, not more than 30% of its 110 nodes
        assert not ix.merge()
        ix.remove([33])  # 34: more
        assert ix.merge() == (kind == "hnsw")
        expected = {"flat": (4, 80), "hnsw": (0, 76)}[kind]
        assert (ix.stats()["tombstones"], ix.ann.size) == expected
        assert capsys.readouterr().out == ""  # merges print nothing unless asked to (`--json` output, the service)
        alive = np.r_[np.zeros(34, bool), np.ones(76, bool)]
        for q in X[[0, 40, 105]]:
            assert [m.id for m in search_vectors(ix, q, 10)[0]] == list(brute_force(L2, q, X, 10, alive)[0])
        # one FAISS file, named for the generation of the last merge (flat: the forced one, hnsw: the rebuild)
        ann_files = [name for name in files_in(path) if name.startswith("ann-")]
        assert ann_files == [ix.manifest["ann"]["file"]] == [{"flat": "ann-000005.faiss", "hnsw": "ann-000008.faiss"}[kind]]


def test_an_hnsw_graph_is_not_rewritten_for_tombstones_it_cannot_drop(tmp_path):
    """Past the merge threshold (1,000) removals are folded into a flat or IVF-PQ index; an HNSW graph cannot drop
    them, so rewriting it would change nothing until they pass 30% of it."""
    X = clustered_vectors(3400, DIM, seed=11)
    with ImageIndex.create(tmp_path / "ix", DIM, L2, kind="hnsw", params={"hnsw_m": 8, "ef_construction": 16}) as ix:
        ix.add(images(3400), X)
        assert ix.merge()
        ix.remove(range(1001))  # 29% of the graph
        generation = ix.generation
        assert not ix.merge() and (ix.generation, ix.stats()["tombstones"]) == (generation, 1001)


# ---- building: the training sample and the tuning ----------------------------------------------


def test_ivfpq_is_trained_and_tuned_on_live_catalog_images(tmp_path, monkeypatch, capsys):
    """The training sample and the tuning's queries come from images in the catalog, never removed ones; tuning
    scores each query against its exact nearest live images in the search space (itself left out), and asks for
    a shortlist at least as long as the results a search returns. The same catalog builds the same index."""
    import lookalike.index.vectors as vectors

    monkeypatch.setattr(vectors, "IVFPQ_MIN_TRAIN", 300)  # train on a test-sized sample
    metric = IndexMetric("learned", mixed_weights(DIM, 1))  # positive weights: queries and data map differently
    X = clustered_vectors(720, DIM, seed=8)
    seen = {}
    real_train, real_tune = AnnIndex.train.__func__, AnnIndex.tune

    def train(cls, kind, dim, sample, n_expected, params):
        seen["train"] = (np.array(sample), n_expected)
        return real_train(cls, kind, dim, sample, n_expected, params)

    def tune(self, queries, truth, own, rerank, target):
        seen["tune"] = (np.array(queries), np.array(truth), np.array(own), rerank, target)
        seen["tuned"] = real_tune(self, queries, truth, own, rerank, target)
        return seen["tuned"]

    monkeypatch.setattr(AnnIndex, "train", classmethod(train))
    monkeypatch.setattr(AnnIndex, "tune", tune)
    params = {"pca_dim": DIM, "pq_m": 8, "nprobe": 0, "rerank": 10, "tune_queries": 40, "train_sample": 400, "target_recall": 0.9}

    def build(path, progress):
        with ImageIndex.create(path, DIM, metric, kind="ivfpq", params=params) as ix:
            ix.add(images(720), X)
            ix.remove(range(0, 720, 4))
            assert ix.merge(progress=progress)
            return np.flatnonzero(ix.alive), ix.stats(), (path / ix.manifest["ann"]["file"]).read_bytes()

    live, stats, faiss_file = build(tmp_path / "ix", progress=True)
    printed = capsys.readouterr().out

    sample, n_expected = seen["train"]
    assert n_expected == len(live) == 540 and sample.shape == (400, DIM + 1)
    Z = metric.data_space(X[live])
    sampled = [np.flatnonzero((Z == row).all(1)) for row in sample]
    assert all(len(s) == 1 for s in sampled) and len({s[0] for s in sampled}) == 400  # 400 distinct live images

    queries, truth, own, rerank, target = seen["tune"]
    assert len(own) == len(set(own)) == 40 and set(own) <= set(live)
    np.testing.assert_allclose(queries, metric.query_space(X[own]), rtol=1e-6)
    assert truth.shape == (40, TUNE_K + 1)  # TUNE_K neighbours besides the query itself
    for q, found in zip(queries, truth):
        d = ((Z.astype(np.float64) - q) ** 2).sum(1)
        assert set(found) <= set(live)
        np.testing.assert_allclose(np.sort(((metric.data_space(X[found]) - q) ** 2).sum(1)), np.sort(d)[: TUNE_K + 1], rtol=1e-4)
    assert (rerank, target) == (TUNE_K, 0.9)  # rerank 10 asks for fewer candidates than a search's 15 results

    chosen = seen["tuned"]
    assert stats["tuned"] == {"nprobe": chosen["nprobe"], "rerank": chosen["rerank"], "recall": round(chosen["recall"], 4)}
    assert stats["kind"] == "ivfpq" and chosen["rerank"] >= TUNE_K and chosen["recall"] >= 0.9
    # what `lookalike index build` prints meanwhile
    assert printed == (
        "Training the ivfpq index on 400 vectors\n"
        f"nprobe {chosen['nprobe']}, shortlist {chosen['rerank']}: recall@15 {chosen['recall']:.3f} on 40 catalog images (target 0.9)\n"
    )

    # built again from the same catalog: the same sample, the same tuning queries, the same index
    first = dict(seen)
    _, again, same_file = build(tmp_path / "again", progress=False)
    assert again["tuned"] == stats["tuned"] and same_file == faiss_file
    np.testing.assert_array_equal(seen["train"][0], first["train"][0])
    np.testing.assert_array_equal(seen["tune"][2], first["tune"][2])
