"""Crash safety: a writer killed at any step leaves a consistent index, and re-running completes it exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_dataset
from index_helpers import PixelEmbedder
from lookalike.errors import LookalikeError
from lookalike.index import ImageIndex, IndexMetric, ingest, scan_images, search_vectors

TESTS = Path(__file__).resolve().parent

# Runs one update in a fresh process and SIGKILLs it at a chosen step: before/after the Nth call of a function.
CRASHER = """
import importlib, os, signal, sys
sys.path.insert(0, {tests!r})
from index_helpers import PixelEmbedder
from lookalike.index import ImageIndex, IndexMetric, ingest

module, owner, name, when, nth = importlib.import_module({module!r}), {owner!r}, {name!r}, {when!r}, {nth}
target = getattr(module, owner) if owner else module
original = getattr(target, name)
calls = [0]

def crashing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(target, name, crashing)
{action}
"""
BUILD = """
index = ImageIndex.create({index!r}, PixelEmbedder.dim, IndexMetric("l2"), PixelEmbedder.fingerprint, kind="flat")
ingest(index, {images!r}, PixelEmbedder(), chunk_size=6, progress=False)
index.finish_build()
"""
COMPACT = "ImageIndex.open({index!r}, writable=True).compact()"

# (object in lookalike.index.store, function, before/after, which call, images committed when it dies): every step
# of the update protocol, 18 images in chunks of 6; the manifest is written at creation, then once per chunk
CRASH_POINTS = [
    ("RawVectors", "append", "after", 2, 6),  # vectors written, catalog not yet
    ("Catalog", "insert", "after", 2, 6),  # catalog rows committed, manifest not yet
    ("", "write_json", "before", 3, 6),  # manifest of the 2nd chunk never written
    ("", "write_json", "after", 3, 12),  # 2nd chunk committed, nothing after it
    ("AnnIndex", "save", "after", 1, 18),  # new FAISS file in place, manifest still names the old state
    ("", "write_json", "after", 5, 18),  # FAISS index committed, build not yet marked finished
]


def kill_during(action: str, module: str, owner: str, name: str, when: str, nth: int) -> None:
    """Run `action` in a subprocess that SIGKILLs itself before/after the nth call of module[.owner].name."""
    script = CRASHER.format(tests=str(TESTS), module=module, owner=owner, name=name, when=when, nth=nth, action=action)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def check_consistent(index_dir: Path, embedder: PixelEmbedder) -> dict[str, int]:
    """Every visible entry's stored vector is its file's embedding; paths unique; FAISS and catalog agree."""
    with ImageIndex.open(index_dir) as ix:
        entries = ix.entries_by_path()
        ids = sorted(e.id for e in entries.values())
        assert ids == list(np.flatnonzero(ix.alive))
        assert len(ix.vectors()) == ix.raw.stored(ix.rows)
        if entries:
            feats, ok, _ = embedder.embed(sorted(entries))
            stored = ix.vectors()[[entries[p].id for p in ok]]
            np.testing.assert_allclose(stored, feats, rtol=1e-6)
        if ix.ann is not None:
            assert ix.ann.size - ix.manifest["ann"]["tombstones"] == ix.alive[: ix.ann_rows].sum()
        return {p: e.id for p, e in entries.items()}


@pytest.mark.parametrize("owner,name,when,nth,committed", CRASH_POINTS)
def test_killed_writer_leaves_a_consistent_index_and_rerun_completes(tmp_path, owner, name, when, nth, committed):
    images = make_dataset(tmp_path / "photos", per_attribute=6, size=24)
    index_dir = tmp_path / "ix"
    kill_during(BUILD.format(index=str(index_dir), images=str(images)), "lookalike.index.store", owner, name, when, nth)

    embedder = PixelEmbedder()
    before = check_consistent(index_dir, embedder)
    assert len(before) == committed  # every chunk committed before the kill, and nothing of the one after
    with ImageIndex.open(index_dir) as ix:
        assert ix.stats()["build_finished"] is False, "stats says the build must be run again"

    # the re-run takes over: resumes the build, embeds only what was not committed
    embedder.calls.clear()
    with ImageIndex.create(index_dir, PixelEmbedder.dim, IndexMetric("l2"), PixelEmbedder.fingerprint, kind="flat") as ix:
        report = ingest(ix, images, embedder, chunk_size=6, progress=False)
        ix.finish_build()
    assert report.added == 18 - len(before) and report.unchanged == len(before)
    assert len(embedder.calls) == 18 - len(before)
    after = check_consistent(index_dir, embedder)
    assert sorted(after) == sorted(p for p, _ in scan_images(images))
    assert {p: before[p] for p in before} == {p: after[p] for p in before}  # nothing committed was lost or moved
    leftovers = sorted(p.name for p in index_dir.iterdir() if p.name.startswith(("ann-", ".")))
    assert len(leftovers) == 1 and leftovers[0].startswith("ann-")  # no stray FAISS or temporary files
    with ImageIndex.open(index_dir) as ix:
        assert ix.stats()["build_finished"] is True
        for path, i in list(after.items())[::5]:
            assert search_vectors(ix, ix.vectors()[i], 1)[0][0].path == path


# every step of a compaction: (module, object in it, function, before/after, which call)
COMPACTION_CRASH_POINTS = [
    ("lookalike.index.vectors", "", "save_npy", "before", 1),  # new vectors file written, its ids not yet
    ("lookalike.index.store", "", "write_json", "before", 1),  # new files complete, manifest not yet
    ("lookalike.index.store", "", "write_json", "after", 1),  # committed; old file and removed rows still there
    ("lookalike.index.store", "Catalog", "purge", "before", 2),  # old file deleted, removed images' rows not yet (call 1: opening)
]


@pytest.mark.parametrize("module,owner,name,when,nth", COMPACTION_CRASH_POINTS)
def test_killed_compaction_leaves_a_consistent_index_and_rerun_completes(tmp_path, module, owner, name, when, nth):
    images = make_dataset(tmp_path / "photos", per_attribute=6, size=24)
    index_dir = tmp_path / "ix"
    embedder = PixelEmbedder()
    with ImageIndex.create(index_dir, PixelEmbedder.dim, IndexMetric("l2"), PixelEmbedder.fingerprint, kind="flat") as ix:
        ingest(ix, images, embedder, chunk_size=6, progress=False)
        ix.remove(range(0, 18, 3))
        ix.merge(force=True)
        queries = ix.vectors()[range(1, 18, 3)]
        results = [[(m.id, m.path, m.distance) for m in found] for found in search_vectors(ix, queries, 10)]
    live = check_consistent(index_dir, embedder)

    kill_during(COMPACT.format(index=str(index_dir)), module, owner, name, when, nth)

    def unchanged():
        assert check_consistent(index_dir, embedder) == live
        with ImageIndex.open(index_dir) as ix:
            assert [[(m.id, m.path, m.distance) for m in found] for found in search_vectors(ix, queries, 10)] == results

    unchanged()
    with ImageIndex.open(index_dir, writable=True) as ix:  # the next writer finishes a committed compaction's clean-up
        committed = (name, when) in (("write_json", "after"), ("purge", "before"))  # killed once the manifest named the new file
        assert (ix.stats()["dead_rows"] == 0) == committed
        assert ix.compact() == (not committed)
        assert ix.stats()["dead_rows"] == 0 and ix.catalog.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 12
        expected = {"manifest.json", "catalog.sqlite", "writer.lock", ix.manifest["ann"]["file"], *ix.raw.files}
    unchanged()
    assert {p.name for p in index_dir.iterdir()} - {"catalog.sqlite-wal", "catalog.sqlite-shm"} == expected


def test_second_writer_is_refused_while_readers_carry_on(tmp_path):
    images = make_dataset(tmp_path / "photos", per_attribute=2, size=24)
    with ImageIndex.create(tmp_path / "ix", PixelEmbedder.dim, IndexMetric("cosine"), PixelEmbedder.fingerprint) as writer:
        ingest(writer, images, PixelEmbedder(), progress=False)
        with pytest.raises(LookalikeError, match=rf"another lookalike process \(pid {os.getpid()}\)"):
            ImageIndex.open(tmp_path / "ix", writable=True)
        other = subprocess.run(
            [sys.executable, "-c", f"from lookalike.index import ImageIndex; ImageIndex.open({str(tmp_path / 'ix')!r}, writable=True)"],
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0 and "being updated by another lookalike process" in other.stderr
        with ImageIndex.open(tmp_path / "ix") as reader:
            assert reader.size == 6
    with ImageIndex.open(tmp_path / "ix", writable=True) as again:
        assert again.size == 6


def test_readers_keep_their_snapshot_during_an_update(tmp_path):
    images = make_dataset(tmp_path / "photos", per_attribute=3, size=24)
    with ImageIndex.create(tmp_path / "ix", PixelEmbedder.dim, IndexMetric("l2"), PixelEmbedder.fingerprint) as writer:
        ingest(writer, images / "dots", PixelEmbedder(), progress=False)
        reader = ImageIndex.open(tmp_path / "ix")
        ingest(writer, images, PixelEmbedder(), progress=False)
        writer.remove([0])
        assert reader.size == 3 and len(search_vectors(reader, reader.vectors()[0], 10)[0]) == 3
        reader.close()
    with ImageIndex.open(tmp_path / "ix") as fresh:
        assert fresh.size == 8


def test_add_embeds_only_new_or_changed_files(tmp_path):
    images = make_dataset(tmp_path / "photos", per_attribute=4, size=24)
    embedder = PixelEmbedder()
    with ImageIndex.create(tmp_path / "ix", PixelEmbedder.dim, IndexMetric("l2"), PixelEmbedder.fingerprint) as ix:
        first = ingest(ix, images, embedder, progress=False)
        assert (first.added, first.embedded) == (12, 12)
        again = ingest(ix, images, embedder, progress=False)
        assert (again.added, again.unchanged, again.embedded) == (0, 12, 0)
        # same bytes rewritten (new mtime): hashed, not embedded; a copy elsewhere reuses the stored vector
        stripes = sorted((images / "stripes").iterdir())
        stripes[0].write_bytes(stripes[0].read_bytes())
        (images / "copies").mkdir()
        (images / "copies" / "copy.png").write_bytes(stripes[1].read_bytes())
        # a changed picture replaces its old entry
        (images / "dots" / "000.png").write_bytes((images / "checks" / "000.png").read_bytes())
        (images / "broken.jpg").write_bytes(b"not an image")
        embedder.calls.clear()
        third = ingest(ix, images, embedder, progress=False)
        assert (third.added, third.changed, third.embedded, third.reused_vectors) == (1, 1, 0, 2)
        assert [s["path"] for s in third.skipped] == [str(images / "broken.jpg")] and embedder.calls == [str(images / "broken.jpg")]
        by_path = ix.entries_by_path()
        assert len(by_path) == 13 and by_path[str(images / "copies" / "copy.png")].attribute == "copies"
        assert by_path[str(images / "dots" / "000.png")].sha256 == by_path[str(images / "checks" / "000.png")].sha256
