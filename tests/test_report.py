"""The HTML report as a reader sees it: in Chromium, on the suite's small run and on a 5-split run made from it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import launch_chromium, lookalike_cli, make_dataset, require_playwright
from lookalike import SimilarityModel, visualize
from lookalike.errors import LookalikeError
from lookalike.evaluation import example_queries
from lookalike.evaluation.lookalike import unseen_shortfall_warning
from lookalike.pipeline import summarize
from lookalike.report import EXAMPLES_SHOWN, visual_part_summary, write_report

MAX_HEIGHT = 5000


def test_example_queries_take_turns_across_attributes_and_show_misses():
    attributes = ["dotted"] * 10 + ["leopard"] * 10 + ["striped"] * 3
    ranks = [1] * 7 + [4, 9, 2] + [1] * 10 + [3, 1, 1]
    picked = example_queries(attributes, ranks, 6, seed=7)
    assert len(picked) == len(set(picked)) == 6
    assert [attributes[i] for i in picked] == ["dotted", "leopard", "striped"] * 2
    misses = {i for i in picked if ranks[i] > 1}
    assert {attributes[i] for i in misses} == {"dotted", "striped"}  # leopard has no miss to show
    assert picked == example_queries(attributes, ranks, 6, seed=7) != example_queries(attributes, ranks, 6, seed=8)
    assert sorted(example_queries(attributes, ranks, 100, seed=0)) == list(range(len(attributes)))


def test_rank_curves_share_identical_lines_and_keep_the_legend_off_the_axes():
    rng = np.random.default_rng(0)
    l2 = rng.integers(1, 8, 40)
    fig = visualize.rank_curves_figure({"random": rng.integers(1, 40, 40), "L1": rng.integers(1, 6, 40), "L2": l2, "cosine": l2.copy(), "weighted L2 (learned)": rng.integers(1, 4, 40)})
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["random", "L1", "L2 = cosine", "weighted L2 (learned)"]
    assert len({(line.get_linestyle(), line.get_marker()) for line in fig.axes[0].get_lines()}) == 4
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    assert not legend.get_window_extent(renderer).overlaps(fig.axes[0].get_window_extent(renderer))


def _negatives_per_query(run: Path) -> set[int]:
    return {len(s["negatives"]) for split in run.glob("split-*/split.json") for s in json.loads(split.read_text())["sets"]["test"]}


def _best_by_top1(run: Path) -> set[str]:
    distances = json.loads((run / "metrics.json").read_text())["distances"]
    best = max((d["top1"], -d["mean_rank"]) for d in distances.values())
    return {name for name, d in distances.items() if (d["top1"], -d["mean_rank"]) == best}


def _five_splits_where_l1_wins(run: Path, into: Path) -> Path:
    """The small run's split copied to 5 splits, with L1 made the best distance (no training)."""
    shutil.copytree(run, into, ignore=shutil.ignore_patterns("*.npy", "*.safetensors", "report.html"))
    evaluation = json.loads((into / "split-0" / "evaluation.json").read_text())
    evaluation["distances"]["l1"] |= {"top1": 1.0, "top5": 1.0, "mean_rank": 1.0, "median_rank": 1.0}
    (into / "split-0" / "evaluation.json").write_text(json.dumps(evaluation))
    for k in range(1, 5):
        shutil.copytree(into / "split-0", into / f"split-{k}")
    for k in (3, 4):  # two splits whose check chose the pretrained visual part
        history = json.loads((into / f"split-{k}" / "refined" / "history.json").read_text())
        history["visual_part"] = {"chosen": "pretrained", "reason": "the learned visual part finds 23.5% less often", "gate_reference": {"median_confidence_of": "validation", "value": 0.57}}
        (into / f"split-{k}" / "refined" / "history.json").write_text(json.dumps(history))
    unseen = json.loads((into / "unseen" / "unseen.json").read_text())  # and a held-out attribute found far worse than pretrained
    unseen["learned"]["unseen"], unseen["pretrained"]["unseen"] = 0.384, 0.629
    (into / "unseen" / "unseen.json").write_text(json.dumps(unseen))
    summarize(into)
    write_report(into)
    return into


def test_report_reads_well_in_a_browser(small_run, tmp_path):
    five = _five_splits_where_l1_wins(small_run.run, tmp_path / "five-splits")
    playwright = require_playwright()
    with playwright.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        browser = launch_chromium(p, profile)
        try:
            page = browser.new_page()
            for run, splits, best in ((five, 5, {"l1"}), (small_run.run, 1, _best_by_top1(small_run.run))):
                page.goto((run / "report.html").as_uri(), wait_until="load")
                height = page.evaluate("document.documentElement.scrollHeight")
                page.screenshot(path=str(tmp_path / f"report-{splits}-splits.png"), full_page=True)
                assert height < MAX_HEIGHT, f"the {splits}-split report is {height} px tall"
                highlighted = page.locator("table#rank tr.best").evaluate_all("rows => rows.map(r => r.dataset.distance)")
                assert set(highlighted) == best, highlighted
                assert page.locator("details").count() == splits and page.locator("details[open]").count() == 0
                examples = page.locator("#examples img").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth)")
                assert len(examples) == min(EXAMPLES_SHOWN, 3 * splits) and all(examples), "every example shown has loaded"  # 3 pictures per split
                text = page.locator("body").inner_text()
                assert "How to read this" in text and all(term in text for term in ("top-1 / top-5", "mAP", "copy found first", "tied matches"))
                # the photos behind the most misses, pictured in the order metrics.json lists them
                misses = json.loads((run / "metrics.json").read_text())["misses"]
                assert page.locator("#misses").count() == (misses["misses"] > 0)
                if misses["misses"]:
                    assert f"{misses['misses']} of the {misses['queries']} test queries missed" in page.locator("#misses").inner_text()
                    photos = page.locator(".photos figure").evaluate_all("fs => fs.map(f => [f.dataset.path, f.querySelector('img').complete && f.querySelector('img').naturalWidth > 0])")
                    assert photos == [[p["path"], True] for p in misses["photos"]], photos
                    assert (run is five) <= bool(photos), "five copies of a split repeat each miss five times, enough to list its photos"
                calibration = json.loads((run / "metrics.json").read_text())["calibration"]
                assert f"expected calibration error {calibration['ece']:.3f}" in page.locator("#calibration").inner_text()
                assert "expected calibration error: every pair of test photos" in text and "Brier score: the mean squared gap" in text
                assert page.locator("img[src='reliability.png']").evaluate("i => i.complete && i.naturalWidth") > 0
                (negatives,) = _negatives_per_query(run)
                assert f"1 positive among {negatives} negatives" in text and "allows up to 100" in text
                unseen = json.loads((run / "metrics.json").read_text())["lookalike_search"]["unseen"]
                rows = page.locator("table#unseen tr[data-model]").evaluate_all("rows => rows.map(r => [r.dataset.model, ...[...r.cells].slice(1).map(c => c.textContent)])")
                assert rows == [[model, f"{100 * unseen[model]['unseen']:.1f}%", f"{100 * unseen[model]['trained']:.1f}%"] for model in ("learned", "pretrained")], rows
                assert f"1-NN, {unseen['held_out']} (never trained on)" in text and "1-NN, never trained on / trained attributes" in text
                assert f"{unseen['unseen_in_catalog']} photos of {unseen['held_out']}" in text and "benchmarks/lookalike_search.py" not in text
                # which visual part the models keep, and why, per split
                chosen = [json.loads((run / f"split-{k}" / "refined" / "history.json").read_text())["visual_part"]["chosen"] for k in range(splits)]
                expected = "learned on 3 of 5 splits, pretrained on 2" if run is five else f"{chosen[0]} on 1 of 1 split"
                assert f"Visual part: {expected}" in text and "visual part: the half of the embedding" in text
                reasons = page.locator("details p.visual-part").evaluate_all("ps => ps.map(p => p.textContent)")
                assert len(reasons) == splits and all(r.startswith(f"Visual part: {c} (") for r, c in zip(reasons, chosen)), reasons
                if run is five:
                    assert "less sure than the median validation photo (0.570)" in reasons[4] and "median" not in reasons[0]
                # the check's figures per held-out attribute, which show which kind of photo the learned part loses
                held_out = json.loads((run / "split-0" / "refined" / "history.json").read_text())["visual_part"]["held_out"]
                assert held_out and all(f"{a} {100 * f['learned']:.1f}% / {100 * f['pretrained']:.1f}% ({f['photos']} photos)" in reasons[0] for a, f in held_out.items()), reasons[0]
                warning = unseen_shortfall_warning(unseen)
                assert (run is five) == (warning is not None), unseen
                shown = page.locator("#unseen-warning")
                assert shown.count() == (warning is not None)
                if warning:
                    assert shown.is_visible() and "38.4% against 62.9%" in shown.inner_text() and "refine.epochs = 0" in shown.inner_text()
        finally:
            browser.close()
    assert (tmp_path / "report-5-splits.png").stat().st_size > 10_000


def test_the_report_counts_the_splits_whose_check_leaned_toward_the_pretrained_part():
    leaning = {"chosen": "learned", "unclear": True}
    assert visual_part_summary([{"chosen": "learned"}, leaning, {"chosen": "pretrained"}]) == (
        "learned on 2 of 3 splits, pretrained on 1; on 1 the check found the learned part weaker on attributes it never saw, but not clearly enough to switch"
    )
    assert visual_part_summary([{"chosen": "learned"}] * 2) == "learned on 2 of 2 splits" and visual_part_summary([None]) is None


def test_the_summary_leaves_out_splits_of_another_dataset_and_says_what_earlier_evaluations_lack(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run.run, run, ignore=shutil.ignore_patterns("*.safetensors", "report.html"))
    (run / "misses").mkdir(exist_ok=True)
    (run / "misses" / "photo-99.jpg").write_bytes(b"a thumbnail from an earlier summary")
    # a split folder left by an earlier run over another dataset: its image indices are not this dataset's
    shutil.copytree(run / "split-0", run / "split-1")
    split = json.loads((run / "split-1" / "split.json").read_text())
    (run / "split-1" / "split.json").write_text(json.dumps(split | {"fingerprint": "made from another dataset"}))
    metrics = summarize(run)  # no splits named, as `lookalike evaluate` calls it
    assert metrics["splits"] == 1 and metrics["misses"]["splits"] == 1
    assert "left out split(s) 1: made from another version of the dataset" in (run / "log.txt").read_text()
    assert sorted(p.name for p in (run / "misses").iterdir()) == [f"photo-{n:02d}.jpg" for n in range(len(metrics["misses"]["photos"]))]
    # misses too spread out to list a photo
    (run / "metrics.json").write_text(json.dumps(metrics | {"misses": metrics["misses"] | {"misses": 5, "photos": []}}))
    assert "5 of the 12 test queries missed under weighted L2 (the positive not first). They are spread out: no photo takes part in 3 or more." in " ".join(
        Path(write_report(run)).read_text().split()
    )
    # a split evaluated by a version that kept no misses: nothing listed, and the log says how to list them
    evaluation = json.loads((run / "split-0" / "evaluation.json").read_text())
    (run / "split-0" / "evaluation.json").write_text(json.dumps({key: value for key, value in evaluation.items() if key != "misses"}))
    metrics = summarize(run)
    assert metrics["misses"] is None and not list((run / "misses").glob("photo-*.jpg"))
    assert "split(s) 0 were evaluated by an earlier version" in (run / "log.txt").read_text()
    assert "Photos behind the most misses" not in Path(write_report(run)).read_text()


def test_a_run_folder_whose_split_no_longer_matches_its_dataset_is_refused_not_misread(small_run, tmp_path):
    """A `lookalike run` into a finished run's folder that stops after scanning its new photos leaves the old split's
    model beside the new dataset.json: read together, the old model's matches would carry the new photos' names."""
    run = tmp_path / "run"
    shutil.copytree(small_run.run, run)
    query = next((small_run.data / "dotted").iterdir())
    assert SimilarityModel.load(run).attributes_ == ["dotted", "leopard", "striped"]
    other = make_dataset(tmp_path / "other", per_attribute=4, kinds=("cans", "bottles"))  # too few photos to test on
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(small_run.root / "cache")}
    failed = lookalike_cli("run", "--data", other, "--out", run, "--splits", "1", env=env, check=False)
    assert failed.returncode != 0 and "the test part holds only 1" in failed.stderr
    assert json.loads((run / "dataset.json").read_text())["attributes"] == ["bottles", "cans"]  # the scan was written
    with pytest.raises(LookalikeError, match="split 0 of .* was made from another dataset"):
        SimilarityModel.load(run)
    refused = lookalike_cli("retrieve", query, "--run", run, env=env, check=False)
    assert refused.returncode != 0 and "was made from another dataset" in refused.stderr and "Traceback" not in refused.stderr
    assert "cans" not in refused.stdout and "bottles" not in refused.stdout
    with pytest.raises(LookalikeError, match="has no split 3; its splits: 0"):
        SimilarityModel.load(small_run.run, split=3)
