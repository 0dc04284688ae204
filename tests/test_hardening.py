"""Regression tests for issue 14: the reproductions of hostile files, slow clients and changes under a running service."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import lookalike_cli, make_dataset
from hostile import black_png
from hostile import cases as hostile_cases
from index_helpers import PixelEmbedder, clustered_vectors
from lookalike import fileio
from lookalike.backbones import BackboneConfig, Preprocessor
from lookalike.datatools.download import download, read_url_list
from lookalike.errors import BadImageError
from lookalike.images import open_image
from lookalike.index import ImageIndex, IndexMetric, NewImage
from lookalike.index.ingest import ingest

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


# ---- item 1: extreme aspect ratios are refused before any large allocation --------------------


@pytest.mark.parametrize("size", [(10_000, 1), (1, 3_000), (80_000_000, 1)])
def test_extreme_aspect_ratios_are_refused_before_resizing(tmp_path, size):
    path = tmp_path / "strip.png"
    path.write_bytes(black_png(*size))
    pre = Preprocessor(BackboneConfig(name="t", input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, embedding_dim=8, normalization="l2"))
    with pytest.raises(BadImageError, match=r"strip.png: image is \d+x\d+, an aspect ratio over 50:1"):
        pre.load(path)
    with pytest.raises(BadImageError, match="aspect ratio over 50:1"):
        pre.array(Image.new("RGB", (3000, 1)))
    assert pre.array(Image.new("RGB", (50, 1))).shape == (3, 224, 224)


# ---- item 5: FIFOs and links to devices named *.jpg are refused at once -----------------------


def finishes(fn, seconds: float = 20.0):
    """fn()'s result or exception, or a failure if it has not returned within `seconds` (it is left blocked in a daemon thread)."""
    out: dict = {}

    def call():
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            out["error"] = e

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds:g} s (hung on a FIFO or device?)"
    if "error" in out:
        raise out["error"]
    return out["result"]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero_link", "folder"])
def test_special_files_are_refused_without_hanging(tmp_path, kind):
    (case,) = [c for c in hostile_cases() if c.name == kind]
    path = case.write(tmp_path)
    with pytest.raises(OSError, match="not a regular file"):
        finishes(lambda: fileio.sha256_file(path))
    with pytest.raises(BadImageError, match="not a regular file"):
        finishes(lambda: open_image(path))


def test_index_add_skips_a_fifo_and_keeps_the_lock_free(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(photos / "good.png")
    os.mkfifo(photos / "pipe.jpg")
    os.symlink("/dev/zero", photos / "zero.jpg")

    def add():
        with ImageIndex.create(tmp_path / "ix", PixelEmbedder.dim, IndexMetric("l2"), PixelEmbedder.fingerprint) as ix:
            return ingest(ix, photos, PixelEmbedder(), progress=False)

    report = finishes(add)
    assert report.added == 1
    assert {Path(s["path"]).name: s["reason"] for s in report.skipped} == {
        name: "cannot read file (not a regular file (a folder, FIFO or device); only plain files are read)" for name in ("pipe.jpg", "zero.jpg")
    }
    ImageIndex.open(tmp_path / "ix", writable=True).close()  # the writer lock was released


# ---- item 7: an over-long attribute is an invalid line, not a crash ------------------------------


def test_a_300_character_attribute_is_reported_as_an_invalid_line(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{'a' * 300}\thttp://127.0.0.1:9/x.jpg\n", encoding="utf-8")
    assert read_url_list(urls).invalid_lines[0]["reason"].endswith("bytes long; a folder name may have at most 200")
    report = download(urls, tmp_path / "out", retries=0, timeout=1)
    assert report.results == [] and [r["line"] for r in report.url_list.invalid_lines] == [1]


# ---- item 9: advice that matches the config it names, given before any training


def test_too_few_test_images_are_refused_before_refinement_with_the_right_advice(tmp_path):
    data = make_dataset(tmp_path / "four", per_attribute=4)
    result = lookalike_cli("run", "--data", data, "--out", tmp_path / "run", env=os.environ | {"COLUMNS": "300"}, check=False)
    message = " ".join(result.stderr.split())
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "lower data.train_ratio (now 0.75)" in message and "raise data.train_ratio" not in message, message
    assert not (tmp_path / "run" / "split-0" / "refined").exists(), "refused before any training"


def test_missing_validation_pairs_are_explained_by_the_real_cause(tmp_path):
    data = make_dataset(tmp_path / "six", per_attribute=6)
    (tmp_path / "c.toml").write_text("[refine]\nepochs = 0\n[evaluate]\nquery_pictures = 0\ncopy_test = false\n")
    lookalike_cli("run", "--data", data, "--out", tmp_path / "run", "--config", tmp_path / "c.toml")
    log = " ".join((tmp_path / "run" / "log.txt").read_text().split())
    assert "no validation pairs: the validation part holds 3 image(s)" in log and "(data.validation_ratio = 0.2)" in log, log
    assert "(data.validation_ratio = 0)" not in log
