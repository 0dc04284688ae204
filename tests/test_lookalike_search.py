"""Lookalike search with the default refined model, on real photos: copies find their original, nothing ties,
catalog photos find themselves first, and an attribute the model never saw is not swallowed by the others.

The posterior embedding (every confident photo of an attribute on one point) is the planted bug these
checks must catch: it is run too, and fails them.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from conftest import REAL_DATA, held_out_reliability, make_dataset
from conftest import lookalike_cli as lookalike
from lookalike.backbones import create_backbone
from lookalike.evaluation import gallery_metrics
from lookalike.evaluation.lookalike import altered_copy, unseen_shortfall_warning
from lookalike.images import open_image
from lookalike.metric.distances import L2, LearnedWeightedL2
from lookalike.model import ImageEmbedder, SimilarityModel
from lookalike.config import load_config
from lookalike.pipeline import held_out_attribute, run_pipeline, unseen_attribute_test
from lookalike.rundir import RunDir

pytestmark = pytest.mark.slow
ATTRIBUTES = ("dotted", "leopard", "striped")
SMALL = "[data]\ntrain_queries_per_attribute = 10\ntest_queries_per_attribute = 5\n[evaluate]\nquery_pictures = 0\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """20 real photos per attribute (linked, not copied), a run with the default model (its unseen test on) and one with the posterior."""
    root = tmp_path_factory.mktemp("lookalike-search")
    for attribute in ATTRIBUTES:
        (root / "photos" / attribute).mkdir(parents=True)
        for src in sorted((REAL_DATA / attribute).glob("*.jpg"))[:20]:
            os.symlink(src, root / "photos" / attribute / src.name)
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(root / "cache")}
    (root / "default.toml").write_text(SMALL)
    (root / "posterior.toml").write_text(SMALL + 'unseen_attribute = false\n[refine]\nembedding = "posterior"\n')
    for name in ("default", "posterior"):
        lookalike("run", "--data", root / "photos", "--out", root / name, "--splits", "1", "--config", root / f"{name}.toml", env=env)
    return root, env


def test_copies_are_found_and_matches_never_tie_unlike_with_the_posterior(workspace):
    root, _ = workspace
    default = json.loads((root / "default" / "metrics.json").read_text())["lookalike_search"]
    posterior = json.loads((root / "posterior" / "metrics.json").read_text())["lookalike_search"]
    # measured: 15 of the 15 test photos' copies found first, no query with tied matches; the posterior: 4 of 15
    # (on all 557 photos, 1 split: 97.4% against 10.1%, and 0% of queries tied against 52%)
    assert default["copies"]["weighted_l2"]["found_first"] >= 0.85
    assert default["ties"]["weighted_l2"] == 0.0
    assert posterior["copies"]["weighted_l2"]["found_first"] <= 0.5


def test_quality_floors_of_the_default_model(workspace, tmp_path):
    """Quality, not only contracts, on the split's 15 held-out test photos (5 per attribute); measured values beside each floor."""
    root, _ = workspace
    d = json.loads((root / "default" / "metrics.json").read_text())["distances"]
    # the learned distance against chance: top-1 0.93 and mean rank 1.07 against 0.07 and 5.6
    assert d["weighted_l2"]["top1"] >= 0.8 and d["weighted_l2"]["mean_rank"] <= 1.5 and d["random"]["mean_rank"] >= 4
    run = RunDir(root / "default")
    dataset, split = run.dataset(), run.split(0)
    test = list(split.parts["test"])
    labels = np.array([dataset.images[i].attribute for i in test])
    paths = [str(dataset.absolute_path(i)) for i in test]
    model = SimilarityModel.load(root / "default")
    learned = LearnedWeightedL2(model.ranker_)
    features = model.embed(paths)
    # refinement beats the pretrained features: gallery mAP 0.98 against 0.59, recall@1 1.0 against 0.6
    refined = gallery_metrics(learned, features, labels)
    pretrained = gallery_metrics(L2(), ImageEmbedder(create_backbone("efficientnet-lite0"), tmp_path / "cache").embed(paths, progress=False).features, labels)
    assert refined["map"] >= pretrained["map"] + 0.2 and refined["recall_at_1"] >= pretrained["recall_at_1"], (refined, pretrained)
    # retrieval: the 4 nearest other test photos (all the same-attribute ones there are) mostly share the query's: 0.97
    D = learned.matrix(features, features)
    np.fill_diagonal(D, np.inf)
    assert np.mean(labels[np.argsort(D, axis=1)[:, :4]] == labels[:, None]) >= 0.8
    # calibration on the 105 held-out test pairs, 5 reliability bins: expected calibration error 0.020
    gap, pairs = held_out_reliability(root / "default")
    assert pairs == 105 and gap < 0.08


def test_index_finds_copies_and_the_photo_itself_first_with_many_queries_at_once(workspace, tmp_path):
    root, env = workspace
    index = tmp_path / "photos.index"
    lookalike("index", "build", "--run", root / "default", "--images", root / "photos", "--out", index, env=env)
    photos = sorted((root / "photos").rglob("*.jpg"))
    picked = photos[::4]  # 15 photos, every attribute
    copies = []
    for i, photo in enumerate(picked):
        copies.append(tmp_path / "copies" / f"{i:02d}-{photo.name}")
        copies[-1].parent.mkdir(exist_ok=True)
        altered_copy(open_image(photo), seed=i).save(copies[-1], quality=95)
    (tmp_path / "copies" / "zz-broken.jpg").write_bytes(b"not a photo")  # one unreadable query costs the others nothing
    # one call, a folder of queries: one JSON object per line, in the REST /search shape
    proc = lookalike("index", "search", index, tmp_path / "copies", "--top", "15", "--json", env=env, check=False)
    assert proc.returncode == 3 and "skipped" in proc.stderr and "zz-broken.jpg" in proc.stderr, proc.stderr  # 3: partial success
    lines = proc.stdout.strip().splitlines()
    answers = [json.loads(line) for line in lines]
    assert len(answers) == len(copies) and all(set(a) == {"query", "attribute", "min_probability", "results", "took_ms"} for a in answers)
    found = [a["results"][0]["name"] == copy.name.split("-", 1)[1] for a, copy in zip(answers, copies)]
    assert np.mean(found) >= 0.85, found  # measured: 15 of 15
    # within an attribute the order is decided by how alike photos look: no two distances equal
    for a in answers:
        distances = [r["distance"] for r in a["results"]]
        assert distances == sorted(distances) and len(set(distances)) == len(distances)
    # a catalog photo searched for itself comes first when it is kept in the results
    for photo in picked[:5]:
        own = json.loads(lookalike("index", "search", index, photo, "--keep-self", "--json", env=env).stdout)
        assert own["query"]["id"] is not None and own["results"][0]["id"] == own["query"]["id"]
        assert own["results"][0]["distance"] < own["results"][1]["distance"]


def test_a_held_out_attribute_found_clearly_worse_than_pretrained_is_warned_about():
    def result(learned, pretrained):
        return {"held_out": "water_bottle", "learned": {"unseen": learned, "trained": 0.8}, "pretrained": {"unseen": pretrained, "trained": 0.6}}

    warning = unseen_shortfall_warning(result(0.384, 0.629))
    assert "water_bottle" in warning and "38.4% against 62.9%" in warning and "refine.epochs = 0" in warning and 'refine.visual_part = "pretrained"' in warning
    assert unseen_shortfall_warning(result(0.80, 0.80)) is None and unseen_shortfall_warning(result(0.95, 0.80)) is None
    assert unseen_shortfall_warning(result(0.55, 0.629)) is None  # 8 points: within the small test's noise
    assert unseen_shortfall_warning(result(0.52, 0.629)) is not None
    unrefined = unseen_shortfall_warning(result(0.384, 0.629), refined=False)  # nothing to turn off but the learned distance
    assert "refine.epochs" not in unrefined and "--distance l2" in unrefined


def test_the_held_out_attribute_is_drawn_with_the_seed_not_chosen_by_name():
    attributes = ["a", "b", "c", "d"]
    drawn = [held_out_attribute(attributes, seed) for seed in range(40)]
    assert set(drawn) == set(attributes) and drawn == [held_out_attribute(list(reversed(attributes)), seed) for seed in range(40)]
    assert held_out_attribute(["a", "b"], 0) is None


def test_with_two_attributes_the_run_notes_that_none_can_be_held_out(tmp_path):
    data = make_dataset(tmp_path / "two", kinds=("stripes", "dots"))
    cfg = load_config(None, {"refine.epochs": 0, "features.resolution": 64, "evaluate": {"query_pictures": 0, "gallery": False, "copy_test": False}})
    metrics = run_pipeline(data, tmp_path / "run", cfg, progress=False)
    assert "unseen" not in metrics["lookalike_search"] and not (tmp_path / "run" / "unseen").exists()
    assert "unseen-attribute test skipped: it holds one attribute out and trains on the others, so it needs 3 attributes and this dataset has 2 (dots, stripes)" in (tmp_path / "run" / "log.txt").read_text()


def test_a_dataset_too_small_for_the_unseen_test_still_gets_its_report(tmp_path):
    """Held out, stripes leaves 5 dots and 5 checks: too few for a nested run's test part. The run keeps its splits' results."""
    data = make_dataset(tmp_path / "d", per_attribute=5, kinds=("dots", "checks"))
    make_dataset(tmp_path / "more", per_attribute=20, kinds=("stripes",))
    (tmp_path / "more" / "stripes").rename(data / "stripes")
    cfg = load_config(None, {"refine.epochs": 0, "features.resolution": 64, "evaluate": {"query_pictures": 0, "gallery": False, "copy_test": False}})
    assert held_out_attribute(["checks", "dots", "stripes"], cfg.data.seed) == "stripes"
    (tmp_path / "run" / "unseen").mkdir(parents=True)
    (tmp_path / "run" / "unseen" / "unseen.json").write_text('{"held_out": "stripes"}')  # from an earlier, larger dataset
    metrics = run_pipeline(data, tmp_path / "run", cfg, progress=False)
    assert metrics["n_test_queries"] > 0 and "unseen" not in metrics["lookalike_search"]  # the earlier result is not shown
    assert metrics["lookalike_search"]["unseen_skipped"].startswith("the test part holds only 1 checks, 1 dots image(s)")
    assert "The unseen-attribute test was skipped: the test part holds only" in (tmp_path / "run" / "report.html").read_text()
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "warning: unseen-attribute test skipped, as a run without stripes cannot be evaluated: the test part holds only" in log
    assert "warning: split 0: no test query for checks, dots (a query and its positive need 2 of its test photos)" in log  # 1 test photo each


class _Collect(logging.Handler):
    """The messages the `lookalike` logger emits, as the console shows them."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_an_attribute_never_trained_on_keeps_apart(workspace, monkeypatch):
    """`lookalike run` held one attribute out (metrics.json); the same test on the other two, and the mean against the pretrained model."""
    root, env = workspace
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", env["LOOKALIKE_CACHE_DIR"])  # the runs' activation and feature caches
    run = RunDir(root / "default")
    dataset, cfg = run.dataset(), run.config()
    recorded = json.loads(run.metrics.read_text())["lookalike_search"]["unseen"]
    held_out = recorded["held_out"]
    assert held_out == held_out_attribute(list(ATTRIBUTES), cfg.data.seed)
    results = {held_out: recorded}
    logged, library_log = _Collect(), logging.getLogger("lookalike")
    level = library_log.level
    library_log.addHandler(logged)
    library_log.setLevel(logging.INFO)
    try:
        for attribute in ATTRIBUTES:
            if attribute != held_out:
                results[attribute] = unseen_attribute_test(dataset, attribute, root / f"without-{attribute}", cfg, progress=False)
    finally:
        library_log.removeHandler(logged)
        library_log.setLevel(level)
    # on the console, a nested run's own "split 0" lines say whose they are; its log.txt, a run of its own, needs no label
    for attribute in set(ATTRIBUTES) - {held_out}:
        scoped = [m for m in logged.messages if m.startswith(f"unseen test without {attribute}: ")]
        assert any("split 0: " in m and "visual part (" in m for m in scoped), logged.messages
        assert "split 0: " in (root / f"without-{attribute}" / "log.txt").read_text() and "unseen test without" not in (root / f"without-{attribute}" / "log.txt").read_text()
    assert not [m for m in logged.messages if m.startswith("split 0: ")], "every nested-run line is labelled"
    for attribute, r in results.items():
        nested = RunDir(root / "default" / "unseen" if attribute == held_out else root / f"without-{attribute}")
        trained_on = {im.attribute for im in nested.dataset().images}
        assert r["held_out"] == attribute and r["trained_on"] == sorted(trained_on) == sorted(set(ATTRIBUTES) - {attribute}), r
        test = nested.split(0).parts["test"]
        # the catalog: the nested split's test photos and the same share (5 of 20) of the held-out attribute's photos
        assert r["catalog"] == len(test) + r["unseen_in_catalog"] and r["unseen_in_catalog"] == round(20 * len(test) / 40), r
        assert all(0 <= r[model][group] <= 1 for model in ("learned", "pretrained") for group in ("unseen", "trained")), r
    written = root / "default" / "unseen" / "unseen.json"
    before = written.stat().st_mtime_ns
    monkeypatch.setattr("lookalike.pipeline.create_backbone", lambda *a, **k: pytest.fail("an up-to-date test builds no network"))
    assert unseen_attribute_test(dataset, held_out, root / "default" / "unseen", cfg, progress=False) | {"fingerprint": None} == recorded | {"fingerprint": None}
    assert written.stat().st_mtime_ns == before, "an up-to-date test is read back, not redone"
    mean = {model: {g: float(np.mean([r[model][g] for r in results.values()])) for g in ("unseen", "trained")} for model in ("learned", "pretrained")}
    # measured, mean over the three held-out attributes (5 unseen and 10 trained photos each): the held-out photos 0.87
    # against pretrained 0.80 (chance about 0.29), the trained attributes 0.93 against 0.60; the floors leave room for
    # that small sample's noise
    assert mean["learned"]["unseen"] >= max(0.6, mean["pretrained"]["unseen"] - 0.10), results
    assert mean["learned"]["trained"] >= max(0.8, mean["pretrained"]["trained"] + 0.10), results


def test_on_object_photos_the_model_keeps_the_pretrained_visual_part_and_an_unseen_class_keeps_apart(tmp_path):
    """fridgeObjects: the held-out check finds the learned visual part loses object classes it never saw, so the model
    keeps the pretrained pooled features; `lookalike run`'s own unseen-attribute test then matches the pretrained backbone."""
    fridge = REAL_DATA.parent / "fridgeObjects"
    (tmp_path / "c.toml").write_text('[data]\nnear_duplicates = "resolve"\n[evaluate]\nquery_pictures = 0\n')
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(tmp_path / "cache")}
    proc = lookalike("run", "--data", fridge, "--out", tmp_path / "run", "--splits", "1", "--config", tmp_path / "c.toml", env=env)
    log = proc.stdout + proc.stderr
    for refined in (tmp_path / "run" / "split-0" / "refined", tmp_path / "run" / "unseen" / "split-0" / "refined"):
        choice = json.loads((refined / "history.json").read_text())["visual_part"]
        # measured: the learned visual part finds a same-class neighbour 23.5 points less often (split 0; 19.7-32.6 over 5 splits)
        assert choice["chosen"] == "pretrained" and choice["mean_gap"] < -0.1, choice
    unseen = json.loads((tmp_path / "run" / "metrics.json").read_text())["lookalike_search"]["unseen"]
    # measured: water bottles 62.5% against the pretrained backbone's 75.0% (8 photos, so one photo is 12.5 points;
    # the learned visual part: 37.5%)
    assert unseen["learned"]["unseen"] >= unseen["pretrained"]["unseen"] - 0.125, unseen
    assert "pretrained visual part (held out can, carton, milk_bottle, water_bottle in turn" in log
