"""Duplicate detection on generated pictures: resized, re-encoded and slightly cropped copies vs distinct images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import typer
from PIL import Image, ImageDraw, ImageFilter
from typer.testing import CliRunner

from lookalike import hashing
from lookalike.cli.datatools import register
from lookalike.datatools.dedup import REPORT_NAME, default_quarantine, find_duplicates, find_leaks, quarantine
from lookalike.hashing import default_max_distance, hamming, hash_images, near_pairs
from lookalike.errors import BadImageError, LookalikeError


def picture(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth picture of overlapping shapes; different seeds give clearly different pictures."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(w // 6, w // 2)), y0 + int(rng.integers(h // 6, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img.filter(ImageFilter.GaussianBlur(2))


def _save(img: Image.Image, path, fmt="PNG", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


@pytest.fixture
def dataset(tmp_path):
    """dotted/ and striped/ with 8 distinct pictures plus near and exact duplicates of some."""
    root = tmp_path / "shirts"
    originals = {}
    for seed in range(8):
        attribute = "dotted" if seed % 2 == 0 else "striped"
        originals[seed] = _save(picture(seed), root / attribute / f"img{seed}.png")
    w, h = 320, 240
    _save(picture(0).resize((w // 2, h // 2), Image.LANCZOS), root / "dotted" / "img0_small.png")  # resized
    _save(picture(1), root / "striped" / "img1_reencoded.jpg", "JPEG", quality=60)  # re-encoded
    _save(picture(3).crop((0, 0, w - w // 100, h)), root / "striped" / "sub" / "img3_crop.png")  # 1% cropped, in a sub-folder
    shutil.copyfile(originals[2], root / "striped" / "img2_copy.png")  # exact copy, labelled differently
    shutil.copyfile(originals[4], root / "dotted" / "img4_copy.png")  # exact copy, same label
    (root / "dotted" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / ".hidden").mkdir()
    shutil.copyfile(originals[5], root / ".hidden" / "img5.png")  # hidden folders are ignored
    return root


def _groups(result):
    return {g.keep: sorted(d["path"] for d in g.duplicates) for g in result.groups}


def test_groups_near_and_exact_duplicates_but_not_distinct_images(dataset):
    result = find_duplicates(dataset, progress=False)
    assert result.hash_size == 16 and result.max_distance == 16
    assert result.n_images == 14  # 8 originals + 5 copies + the broken file
    assert _groups(result) == {
        "dotted/img0.png": ["dotted/img0_small.png"],  # the larger picture is kept
        "striped/img1.png": ["striped/img1_reencoded.jpg"],
        "dotted/img2.png": ["striped/img2_copy.png"],
        "striped/img3.png": ["striped/sub/img3_crop.png"],
        "dotted/img4.png": ["dotted/img4_copy.png"],
    }
    kinds = {d["path"]: (d["kind"], d["distance"]) for g in result.groups for d in g.duplicates}
    assert kinds["striped/img2_copy.png"] == ("exact", 0)
    assert kinds["dotted/img4_copy.png"] == ("exact", 0)
    assert kinds["dotted/img0_small.png"][0] == "near" and kinds["dotted/img0_small.png"][1] <= 16
    assert kinds["striped/sub/img3_crop.png"][0] == "near"
    conflict = next(g for g in result.groups if g.keep == "dotted/img2.png")
    assert conflict.attributes == ["dotted", "striped"] and "warning" in conflict.to_dict()
    assert [u["path"] for u in result.unreadable] == ["dotted/broken.jpg"]


def test_max_distance_zero_finds_only_identical_hashes(dataset):
    result = find_duplicates(dataset, max_distance=0, progress=False)
    dups = {d["path"] for g in result.groups for d in g.duplicates}
    assert {"striped/img2_copy.png", "dotted/img4_copy.png"} <= dups
    assert "striped/sub/img3_crop.png" not in dups and "striped/img1_reencoded.jpg" not in dups


def test_distinct_pictures_are_far_apart(tmp_path):
    paths = [_save(picture(seed), tmp_path / f"{seed}.png") for seed in range(30)]
    hashes, _ = hash_images(paths)
    i, j, d = near_pairs(hashes, None, default_max_distance(16) * 2)
    assert len(i) == 0, list(zip(i, j, d))


def test_quarantine_moves_duplicates_keeping_relative_paths(dataset):
    before = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    result = find_duplicates(dataset, progress=False)
    q = default_quarantine(dataset)
    assert q == dataset.parent / "shirts-duplicates"

    quarantine(result, q, dry_run=True)
    after_dry = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert after_dry == before and not q.exists()
    assert len(result.moves) == 5

    quarantine(result, q)
    moved = sorted(p.relative_to(q).as_posix() for p in q.rglob("*") if p.is_file())
    assert moved == sorted([REPORT_NAME, "dotted/img0_small.png", "striped/img1_reencoded.jpg", "striped/img2_copy.png", "striped/sub/img3_crop.png", "dotted/img4_copy.png"])
    for m in result.moves:
        assert not (dataset / m["from"]).exists()
    kept = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert sorted(set(before) - set(kept)) == sorted(m["from"] for m in result.moves)  # nothing else touched, nothing deleted
    report = json.loads((q / REPORT_NAME).read_text())
    assert report["duplicates"] == 5 and report["dry_run"] is False
    assert {m["from"]: m["duplicate_of"] for m in report["moved"]}["dotted/img0_small.png"] == "dotted/img0.png"

    # a second run finds nothing more, and never overwrites what is in the quarantine
    assert find_duplicates(dataset, progress=False).groups == []
    shutil.copyfile(dataset / "dotted" / "img4.png", dataset / "dotted" / "img4_copy.png")
    again = quarantine(find_duplicates(dataset, progress=False), q)
    assert again.moves[0]["to"] == "dotted/img4_copy.1.png"
    assert (q / "dotted" / "img4_copy.png").exists() and (q / "dotted" / "img4_copy.1.png").exists()
    # ... nor the record of the first run's moves, which is what undoing them needs
    report = json.loads((q / REPORT_NAME).read_text())
    assert [m["to"] for m in report["moved"]] == ["dotted/img4_copy.1.png"]
    assert sorted(m["to"] for m in report["earlier_moves"]) == sorted(m["to"] for m in result.moves)
    assert {(m["root"], m["quarantine"]) for m in report["earlier_moves"]} == {(str(dataset), str(q))}, "paths are relative to these"
    quarantine(find_duplicates(dataset, progress=False), q, dry_run=True, report_path=q / REPORT_NAME)
    assert len(json.loads((q / REPORT_NAME).read_text())["earlier_moves"]) == 6, "a dry run keeps the record, and adds no move that did not happen"


def test_quarantine_inside_the_dataset_must_be_hidden(dataset):
    result = find_duplicates(dataset, progress=False)
    with pytest.raises(LookalikeError, match="read as an attribute"):
        quarantine(result, dataset / "duplicates")
    quarantine(result, dataset / ".duplicates")
    assert (dataset / ".duplicates" / "dotted" / "img0_small.png").exists()
    assert find_duplicates(dataset, progress=False).groups == []  # the hidden quarantine is not scanned


def test_find_leaks_between_train_and_test(tmp_path):
    train = [_save(picture(s), tmp_path / "train" / f"{s}.png") for s in range(6)]
    test = [
        _save(picture(10), tmp_path / "test" / "new.png"),
        _save(picture(2).resize((160, 120), Image.LANCZOS), tmp_path / "test" / "small2.png"),
        _save(picture(11), tmp_path / "test" / "other.png"),
        _save(picture(4), tmp_path / "test" / "same4.jpg", "JPEG", quality=70),
    ]
    leaks = find_leaks(train, test, hash_size=16)
    assert {(leak.index_a, leak.index_b) for leak in leaks} == {(2, 1), (4, 3)}
    assert [leak.distance for leak in leaks] == sorted(leak.distance for leak in leaks)
    assert {(leak.path_a, leak.path_b) for leak in leaks} == {(str(train[2]), str(test[1])), (str(train[4]), str(test[3]))}
    assert all(0 <= leak.distance <= 16 for leak in leaks)
    assert find_leaks(train, test[::2], max_distance=0) == []
    assert find_leaks(train, [], hash_size=8) == []
    with pytest.raises(LookalikeError, match="between 0 and 255"):
        find_leaks(train, test, max_distance=256)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(BadImageError):
        find_leaks(train, [tmp_path / "bad.jpg"])


@pytest.mark.parametrize("n_bytes", [32, 3])  # 256-bit hashes, and a width that is not whole 64-bit words
@pytest.mark.parametrize("block_bytes", [None, 2000])  # one block, and blocks of a few rows
def test_near_pairs_matches_a_plain_loop(n_bytes, block_bytes, monkeypatch):
    if block_bytes:
        monkeypatch.setattr(hashing, "_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(40, n_bytes), dtype=np.uint8)
    a[5] = a[3]
    a[7] = a[3] ^ np.eye(1, n_bytes, 1, dtype=np.uint8)[0]  # one bit away
    b = rng.integers(0, 256, size=(25, n_bytes), dtype=np.uint8)
    a[10] = a[11] = b[0] = 0  # identical, but featureless: they pair with nothing
    b[1] = 255
    plain_a, plain_b = hashing.featureless(a), hashing.featureless(b)
    assert plain_a[10] and plain_a[11] and plain_b[0] and plain_b[1] and plain_a.sum() + plain_b.sum() < 10
    for limit in (0, 1, n_bytes * 3, n_bytes * 4):
        got = set(zip(*[x.tolist() for x in near_pairs(a, None, limit)]))
        want = {(i, j, hamming(a[i], a[j])) for i in range(40) for j in range(i + 1, 40) if hamming(a[i], a[j]) <= limit and not plain_a[i] and not plain_a[j]}
        assert got == want
        got = set(zip(*[x.tolist() for x in near_pairs(a, b, limit)]))
        want = {(i, j, hamming(a[i], b[j])) for i in range(40) for j in range(25) if hamming(a[i], b[j]) <= limit and not plain_a[i] and not plain_b[j]}
        assert got == want


def test_plain_pictures_of_different_colours_are_not_near_duplicates(tmp_path):
    """A plain or smoothly lit picture hashes to all zeros: the split must not call a red and a navy swatch twins."""
    from lookalike.config import DataConfig
    from lookalike.data import make_split, scan_dataset

    for colour, rgb in {"red": (200, 30, 30), "navy": (20, 30, 110), "olive": (110, 120, 40)}.items():
        (tmp_path / "d" / colour).mkdir(parents=True)
        for k in range(10):
            ramp = np.linspace(0.6, 1.0, 96)[:, None, None] * (np.array(rgb) * (1 + k / 40))[None, None, :]
            Image.fromarray(np.broadcast_to(ramp, (96, 128, 3)).clip(0, 255).astype(np.uint8)).save(tmp_path / "d" / colour / f"{k}.jpg")
    ds = scan_dataset(tmp_path / "d", progress=False)
    assert len(ds.images) == 30
    assert make_split(ds, DataConfig(), seed=0).near_duplicates == []  # the default refuses leaks: this must not raise


def test_cli_dedup(dataset, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    report = tmp_path / "dry.json"
    result = runner.invoke(app, ["dedup", str(dataset), "--dry-run", "--no-progress", "--report", str(report)])
    assert result.exit_code == 3, "a partial success: the dataset's unreadable file could hide duplicates"
    assert "(1 unreadable, left out)" in result.output and "skipped dotted/broken.jpg" in result.stderr
    assert "5 duplicate group(s): 2 exact and 3 near" in result.output
    assert "would move striped/img2_copy.png" in result.output and "[different attributes!]" in result.output
    assert "dry run: nothing moved" in result.output
    assert json.loads(report.read_text())["dry_run"] is True
    assert not default_quarantine(dataset).exists()

    q = tmp_path / "dups"
    (dataset / "dotted" / "broken.jpg").unlink()
    result = runner.invoke(app, ["dedup", str(dataset), "--no-progress", "--quarantine", str(q), "--hash-size", "16", "--max-distance", "16"])
    assert result.exit_code == 0, result.output
    assert f"moved 5 file(s) to {q}" in result.output
    assert (q / REPORT_NAME).exists()

    result = runner.invoke(app, ["dedup", str(tmp_path / "nowhere"), "--no-progress"])
    assert isinstance(result.exception, LookalikeError) and "not a folder" in str(result.exception)
