import os

import numpy as np
import pytest
from PIL import Image

from conftest import make_dataset, texture
from lookalike.config import DataConfig
from lookalike.data import make_split, scan_dataset, verify_disjoint
from lookalike.data.dataset import Dataset, ImageRecord
from lookalike.data.splits import PARTS, ComparativeSet, Split, comparative_sets, mislabelled_near_duplicates
from lookalike.errors import LookalikeError


def test_scan_lists_and_skips_with_reasons(tmp_path):
    root = make_dataset(tmp_path / "d", per_attribute=6)
    (root / "dots" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "dots" / "empty.png").write_bytes(b"")
    (root / "dots" / "readme.txt").write_text("hi")
    (root / "dots" / ".hidden.png").write_bytes(b"")
    (root / "stripes" / "UPPER.PNG").write_bytes((root / "stripes" / "000.png").read_bytes())
    texture("dots", seed=77).convert("CMYK").save(root / "dots" / "cmyk.jpg")
    (root / "lonely").mkdir()
    texture("dots", seed=99).save(root / "lonely" / "one.png")
    (root / "empty_attribute").mkdir()
    ds = scan_dataset(root, progress=False)
    assert ds.attributes == ["checks", "dots", "stripes"]
    assert len(ds.images) == 6 + 7 + 6  # the CMYK image is usable
    reasons = {s["path"]: s["reason"] for s in ds.skipped}
    assert "empty" in reasons["dots/empty.png"]
    assert "corrupt" in reasons["dots/broken.jpg"] or "not a recognised" in reasons["dots/broken.jpg"]
    assert "not an image" in reasons["dots/readme.txt"]
    assert "identical content" in reasons["stripes/UPPER.PNG"]
    assert "1 usable image" in reasons["lonely/"] and "0 usable image" in reasons["empty_attribute/"]
    assert not any(".hidden" in p for p in reasons)


def test_a_relative_dataset_path_scans_like_an_absolute_one(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", per_attribute=4)
    monkeypatch.chdir(tmp_path / "d" / "dots")
    relative = scan_dataset(os.path.join("..", "..", "d"), progress=False)
    absolute = scan_dataset(root, progress=False)
    assert relative.root == absolute.root and [im.path for im in relative.images] == [im.path for im in absolute.images]


def test_linked_photos_keep_their_names_in_the_dataset(tmp_path):
    """Photos linked into attribute folders from elsewhere are listed by where they sit, as every other photo is."""
    elsewhere = make_dataset(tmp_path / "elsewhere", per_attribute=4)
    root = tmp_path / "linked"
    for attribute in ("dots", "stripes"):
        (root / attribute).mkdir(parents=True)
        for src in sorted((elsewhere / attribute).iterdir()):
            os.symlink(src, root / attribute / f"linked-{src.name}")
    ds = scan_dataset(root, progress=False)
    assert [im.path for im in ds.images if im.attribute == "dots"] == [f"dots/linked-{i:03d}.png" for i in range(4)]
    assert ds.absolute_path(0).is_symlink() and ds.absolute_path(0).read_bytes() == (elsewhere / "dots" / "000.png").read_bytes()


def test_single_attribute_is_refused(tmp_path):
    root = make_dataset(tmp_path / "d", per_attribute=6, kinds=("dots",))
    with pytest.raises(LookalikeError, match="at least 2 attribute"):
        scan_dataset(root, progress=False)


def test_missing_and_file_roots_are_refused(tmp_path):
    with pytest.raises(LookalikeError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(LookalikeError, match="is a file"):
        scan_dataset(tmp_path / "f")


def test_unreadable_dataset_folder(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "d", per_attribute=4)

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(LookalikeError, match="permission denied"):
        scan_dataset(root)


@pytest.fixture
def dataset(tmp_path):
    return scan_dataset(make_dataset(tmp_path / "d", per_attribute=20), progress=False)


def test_split_is_deterministic_disjoint_and_sized(dataset):
    cfg = DataConfig(test_queries_per_attribute=5, negatives_per_query=20)
    a, b = make_split(dataset, cfg, seed=3), make_split(dataset, cfg, seed=3)
    assert a.to_dict() == b.to_dict()
    assert make_split(dataset, cfg, seed=4).to_dict() != a.to_dict()
    all_parts = [set(a.parts[p]) for p in PARTS]
    assert sum(len(p) for p in all_parts) == len(dataset.images)
    assert not (all_parts[0] & all_parts[1]) and not (all_parts[0] & all_parts[2]) and not (all_parts[1] & all_parts[2])
    for attribute in dataset.attributes:
        n_train_val = sum(dataset.images[i].attribute == attribute for i in a.parts["train"] + a.parts["validation"])
        assert n_train_val == 15  # 0.75 of 20
    assert len(a.sets["test"]) == 3 * 5
    for part in PARTS:
        members = set(a.parts[part])
        for s in a.sets[part]:
            attr = dataset.images[s.query].attribute
            assert s.query != s.positive and dataset.images[s.positive].attribute == attr
            assert {s.query, s.positive, *s.negatives} <= members
            assert all(dataset.images[n].attribute != attr for n in s.negatives)
            assert len(set(s.negatives)) == len(s.negatives)
    assert all(len(s.negatives) == 20 for s in a.sets["train"])


def test_negatives_capped_by_what_exists(dataset):
    s = make_split(dataset, DataConfig(negatives_per_query=100), seed=0)
    n_other_test = {s_.query: sum(dataset.images[i].attribute != dataset.images[s_.query].attribute for i in s.parts["test"]) for s_ in s.sets["test"]}
    assert all(len(c.negatives) == n_other_test[c.query] for c in s.sets["test"])


def test_queries_capped_per_attribute(dataset):
    s = make_split(dataset, DataConfig(train_queries_per_attribute=2), seed=0)
    assert len(s.sets["train"]) == 3 * 2


def test_split_by_subfolder_keeps_groups_together(tmp_path):
    root = tmp_path / "d"
    for k, kind in enumerate(("dots", "stripes")):
        for g in range(6):
            (root / kind / f"product{g}").mkdir(parents=True)
            for i in range(3):
                texture(kind, seed=k * 100 + g * 10 + i).save(root / kind / f"product{g}" / f"{i}.png")
    ds = scan_dataset(root, progress=False)
    s = make_split(ds, DataConfig(split_by_subfolder=True), seed=0)
    where = {}
    for part, members in s.parts.items():
        for i in members:
            im = ds.images[i]
            where.setdefault((im.attribute, im.group), set()).add(part)
    assert all(len(parts) == 1 for parts in where.values())
    assert len(where) == 12


def test_leak_by_content_is_caught(dataset):
    s = make_split(dataset, DataConfig(), seed=0)
    # pretend a training image has the same bytes as a test image
    i, j = s.parts["train"][0], s.parts["test"][0]
    dataset.images[j] = type(dataset.images[j])(dataset.images[j].path, dataset.images[j].attribute, "", dataset.images[i].sha256)
    with pytest.raises(LookalikeError, match="share 1 image"):
        verify_disjoint(dataset, s.parts)


def test_leak_by_path_is_caught(dataset):
    s = make_split(dataset, DataConfig(), seed=0)
    parts = {p: list(v) for p, v in s.parts.items()}
    parts["test"].append(parts["train"][0])
    with pytest.raises(LookalikeError, match="by path"):
        verify_disjoint(dataset, parts)


def test_split_json_round_trip(dataset):
    from lookalike.data import Split

    s = make_split(dataset, DataConfig(), seed=1)
    assert Split.from_dict(s.to_dict()) == s
    assert np.all(np.diff(s.parts["train"]) > 0)


def _near_copy_dataset(tmp_path):
    root = make_dataset(tmp_path / "d", per_attribute=12)
    for i in range(12):  # a re-encoded, resized twin of every dots image
        img = Image.open(root / "dots" / f"{i:03d}.png").resize((60, 60))
        img.save(root / "dots" / f"{i:03d}-copy.jpg", quality=80)
    return scan_dataset(root, progress=False)


def test_near_duplicates_across_the_split_are_refused_with_pairs(tmp_path):
    from lookalike.data.splits import NearDuplicateLeak

    ds = _near_copy_dataset(tmp_path)
    assert all(len(im.dhash) == 64 for im in ds.images)
    with pytest.raises(NearDuplicateLeak) as e:
        make_split(ds, DataConfig(), seed=0)
    assert e.value.pairs and all(p["a"].replace("-copy.jpg", "") [:8] == p["b"].replace("-copy.jpg", "")[:8] for p in e.value.pairs)
    assert "lookalike dedup" in str(e.value)


def test_near_duplicates_under_different_attributes_are_called_mislabelled(tmp_path):
    from lookalike.data.splits import NearDuplicateLeak

    root = make_dataset(tmp_path / "d", per_attribute=12)
    for i in range(12):  # a re-encoded, resized twin of every dots image, filed under stripes
        Image.open(root / "dots" / f"{i:03d}.png").resize((60, 60)).save(root / "stripes" / f"dots-{i:03d}.jpg", quality=80)
    ds = scan_dataset(root, progress=False)
    with pytest.raises(NearDuplicateLeak, match="of them carry different attributes .*one copy of the photo is in the wrong folder") as e:
        make_split(ds, DataConfig(), seed=0)
    assert all({p["attribute_a"], p["attribute_b"]} == {"dots", "stripes"} for p in e.value.pairs)
    assert len(e.value.pairs) < 12  # some twins share a part: only the whole-dataset check finds every one
    found = mislabelled_near_duplicates(ds, DataConfig().near_duplicate_max_distance)
    assert sorted(found) == [(f"dots/{i:03d}.png", f"stripes/dots-{i:03d}.jpg") for i in range(12)]
    assert mislabelled_near_duplicates(_near_copy_dataset(tmp_path / "same"), 16) == []  # twins under one attribute are not mislabelled
    from lookalike.config import load_config
    from lookalike.pipeline import prepare

    prepare(root, tmp_path / "run", load_config(None, {"data.near_duplicates": "ignore"}))  # the scan says so whatever the split does
    assert "warning: 12 near-duplicate pair(s) are filed under different attributes" in (tmp_path / "run" / "log.txt").read_text()


def test_near_duplicates_resolved_keep_twins_together(tmp_path):
    ds = _near_copy_dataset(tmp_path)
    s = make_split(ds, DataConfig(near_duplicates="resolve"), seed=0)
    assert s.near_duplicates
    part_of = {ds.images[i].path: p for p, members in s.parts.items() for i in members}
    for i in range(12):
        assert part_of[f"dots/{i:03d}.png"] == part_of[f"dots/{i:03d}-copy.jpg"]
    assert make_split(ds, DataConfig(near_duplicates="ignore"), seed=0).near_duplicates == []


def _records(attributes: str) -> Dataset:
    return Dataset("/data", [ImageRecord(f"{a}/{i}.jpg", a, "", f"{i:064x}") for i, a in enumerate(attributes)])


def test_comparative_sets_draw_distinct_queries_and_negatives():
    # a: 4 images, b: 3, c: 2, d: 1 (too few for a positive)
    dataset = _records("aaaabbbccd")
    members = list(range(10))
    sets = comparative_sets(dataset, members, queries_per_attribute=3, n_negatives=5, rng=np.random.default_rng(0))
    by_attribute = {a: [s for s in sets if dataset.images[s.query].attribute == a] for a in "abcd"}
    assert [len(by_attribute[a]) for a in "abcd"] == [3, 3, 2, 0]
    for a, group in by_attribute.items():
        assert len({s.query for s in group}) == len(group), "queries are drawn without replacement"
        for s in group:
            assert s.positive != s.query and dataset.images[s.positive].attribute == a
            assert len(s.negatives) == len(set(s.negatives)) == 5 and all(dataset.images[n].attribute != a for n in s.negatives)
    # no other attribute: no sets, and the attributes after it still get theirs
    assert comparative_sets(_records("aab"), [0, 1], 3, 5, np.random.default_rng(0)) == []
    assert len(comparative_sets(_records("abb"), [0, 1, 2], 3, 5, np.random.default_rng(0))) == 2


def test_split_round_trips_through_its_dict():
    split = Split(7, {"train": [0, 1], "validation": [2], "test": [3]}, {"test": [ComparativeSet(3, 4, (0, 1))]}, [{"a": "x.jpg", "b": "y.jpg"}])
    d = split.to_dict()
    assert d["near_duplicates"] == [{"a": "x.jpg", "b": "y.jpg"}] and d["sets"]["test"][0]["negatives"] == [0, 1]
    assert Split.from_dict(d) == split


def test_a_photo_under_two_attributes_is_left_out_everywhere(tmp_path):
    root = make_dataset(tmp_path / "d", per_attribute=6)
    (root / "dots" / "copy-of-stripe.png").write_bytes((root / "stripes" / "003.png").read_bytes())
    ds = scan_dataset(root, progress=False)
    paths = {im.path for im in ds.images}
    assert "stripes/003.png" not in paths and "dots/copy-of-stripe.png" not in paths
    assert len(ds.images) == 3 * 6 - 1
    reasons = {s["path"]: s["reason"] for s in ds.skipped}
    assert "label is unknown" in reasons["dots/copy-of-stripe.png"] and "stripes/003.png" in reasons["dots/copy-of-stripe.png"]
    assert "dots/copy-of-stripe.png" in reasons["stripes/003.png"]


def test_an_empty_test_part_says_when_resolved_near_duplicates_emptied_it():
    from lookalike.config import LookalikeConfig
    from lookalike.pipeline import check_split_sizes

    ds = _records("aaaabbbb")
    pairs = [{"a": "a/0.jpg", "b": "a/3.jpg", "part_a": "train", "part_b": "test", "attribute_a": "a", "attribute_b": "a", "distance": 0, "index_b": 3}]
    s = Split(seed=0, parts={"train": [0, 1, 2, 3, 4, 5, 6], "validation": [], "test": [7]}, sets={p: [] for p in PARTS}, near_duplicates=pairs)
    with pytest.raises(LookalikeError, match=r"1 test image\(s\) were moved next to their near-duplicate twins"):
        check_split_sizes(s, LookalikeConfig(), ds)
    with pytest.raises(LookalikeError, match=r"holds only 0 a, 1 b image\(s\): no attribute"):
        check_split_sizes(Split(seed=0, parts=s.parts, sets=s.sets), LookalikeConfig(), ds)


def test_attribute_folders_spelled_with_composed_and_decomposed_accents_are_refused(tmp_path):
    import unicodedata

    root = make_dataset(tmp_path / "d", per_attribute=4, kinds=("stripes", "dots"))
    for form in ("NFC", "NFD"):
        folder = root / unicodedata.normalize(form, "léopard")
        folder.mkdir()
        for i in range(4):
            texture("checks", seed=50 + i + (10 if form == "NFD" else 0)).save(folder / f"{form}{i}.png")
    with pytest.raises(LookalikeError, match="two attribute folders that read the same"):
        scan_dataset(root, progress=False)
