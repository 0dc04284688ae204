"""Regression tests for issue 14: the reproductions of hostile files, slow clients and changes under a running service."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from index_helpers import clustered_vectors
from lookalike import fileio
from lookalike.index import ImageIndex, IndexMetric, NewImage

DIM = 16


def new_images(n: int) -> list[NewImage]:
    return [NewImage(f"/img/{i}.jpg", None, f"{i:064x}", 100 + i, 1.5) for i in range(n)]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- item 8: the manifest, the commit point, is fsync'ed with its folder -----------------------


def test_manifest_commit_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2")) as ix:
        synced.clear()
        ix.add(new_images(3), clustered_vectors(3, DIM))
    folder = str((tmp_path / "ix").resolve())
    manifest_tmp = [p for p in synced if Path(p).name.startswith(".manifest.json.")]
    assert manifest_tmp, f"the manifest was renamed without fsync (fsync'ed: {synced})"
    assert synced.index(folder) > synced.index(manifest_tmp[-1]), "the folder must be fsync'ed after the manifest's rename"


# ---- item 10: files respect the umask like open() --------------------------------------------


def test_atomic_writes_respect_the_umask(tmp_path, umask_022):
    fileio.write_json(tmp_path / "a.json", {"x": 1})
    fileio.write_bytes(tmp_path / "b.bin", b"123")
    fileio.save_npy(tmp_path / "c.npy", np.zeros(3))
    with open(tmp_path / "reference", "w"):
        pass
    assert {mode(tmp_path / n) for n in ("a.json", "b.bin", "c.npy")} == {mode(tmp_path / "reference")} == {0o644}
    os.umask(0o077)
    fileio.write_text(tmp_path / "private.txt", "secret")
    assert mode(tmp_path / "private.txt") == 0o600


def test_index_manifest_respects_the_umask(tmp_path, umask_022):
    with ImageIndex.create(tmp_path / "ix", DIM, IndexMetric("l2")) as ix:
        ix.add(new_images(2), clustered_vectors(2, DIM))
    assert mode(tmp_path / "ix" / "manifest.json") == 0o644
