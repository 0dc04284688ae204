"""Lookalike-search benchmark: copies found, attributes never trained on, ties; the trained model against the pretrained one.

1. Copy test. `lookalike run` trains on each split; its model then embeds every photo of the dataset as a
   catalog, and an altered copy of every photo (cropped to 70-85% of the area, shrunk to 60%, 10% brighter,
   JPEG quality 50; seeded) is searched in it. Reported: how often the original comes first.
2. Unseen attributes. For each attribute in turn, a run is trained on the others only. Its catalog is that
   run's test photos plus the same share of the held-out attribute's photos, drawn at random; every photo
   queries the rest (leave-one-out 1-NN), and the label of its nearest match is scored, separately for the
   held-out attribute and for the trained ones. This is `lookalike.pipeline.unseen_attribute_test`, which
   `lookalike run` makes for one attribute drawn with its seed; here every attribute is held out, each split.
3. Ties: among each catalog photo's 15 nearest same-attribute matches, two at exactly the same distance.

The pretrained backbone (EfficientNet-Lite0 pooled features at 224 px, L2 on unit vectors) is the reference
row for each test.

    .venv/bin/python benchmarks/lookalike_search.py                         # fashionTexture, 5 splits (~4 min on 2 cores)
    .venv/bin/python benchmarks/lookalike_search.py --data ../shared/datasets/fridgeObjects --splits 3
    .venv/bin/python benchmarks/lookalike_search.py --json                  # one JSON object
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from lookalike.backbones import create_backbone
from lookalike.config import load_config
from lookalike.data import Dataset
from lookalike.errors import LookalikeError
from lookalike.evaluation.lookalike import altered_copy, copy_ranks, copy_summary, tied_fraction
from lookalike.features import configured_cache_dir
from lookalike.images import open_image
from lookalike.metric.distances import L2, LearnedWeightedL2
from lookalike.model import ImageEmbedder, SimilarityModel
from lookalike.parallel import run_tasks, workers_for
from lookalike.pipeline import run_pipeline, unseen_attribute_test
from lookalike.refine.stage import resolve_mode
from lookalike.rundir import RunDir

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashionTexture"


def embed(embedder: ImageEmbedder, paths: list[str]) -> np.ndarray:
    result = embedder.embed(paths, progress=False)
    if result.skipped:
        raise SystemExit(f"could not embed {result.skipped[0]['path']}: {result.skipped[0]['reason']}")
    return result.features


def copy_test(run_dir: Path, splits: int, pretrained: ImageEmbedder) -> dict:
    run = RunDir(run_dir)
    dataset = run.dataset()
    paths = [str(dataset.absolute_path(i)) for i in range(len(dataset.images))]
    copies = [altered_copy(open_image(p), seed=i) for i, p in enumerate(paths)]
    labels = np.array([im.attribute for im in dataset.images])
    base = embed(pretrained, paths)
    rows = {"pretrained, L2": [copy_summary(copy_ranks(L2(), base, pretrained.embed_images(copies))) | {"tied": tied_fraction(L2(), base, labels)}]}
    for k in range(splits):
        model = SimilarityModel.load(run_dir, k)
        catalog, queries = embed(model.embedder_, paths), model.embed_images(copies)
        for name, distance in (("trained, learned distance", LearnedWeightedL2(model.ranker_)), ("trained, L2", L2())):
            rows.setdefault(name, []).append(copy_summary(copy_ranks(distance, catalog, queries)) | {"tied": tied_fraction(distance, catalog, labels)})
    return {name: {key: float(np.mean([r[key] for r in runs])) for key in runs[0]} for name, runs in rows.items()}


def unseen_test(dataset: Dataset, work: Path, splits: int, overrides: dict, jobs: int) -> list[dict]:
    runs = [(held_out, k) for held_out in dataset.attributes for k in range(splits)]

    def nested(i: int) -> dict:
        held_out, k = runs[i]
        cfg = load_config(None, overrides | {"data.seed": k})
        return unseen_attribute_test(dataset, held_out, work / f"without-{held_out}" / f"run-{k}", cfg, progress=False)

    # side by side as `lookalike run` does its splits; each run then reads back what it wrote (all up to date)
    run_tasks(nested, range(len(runs)), workers_for(jobs, len(runs), gpu=resolve_mode(load_config(None, overrides)) == "full"), desc="nested runs", progress=False)
    rows = []
    for i, (held_out, k) in enumerate(runs):
        r = nested(i)
        scores = {f"trained_model_{g}": v for g, v in r["learned"].items()} | {f"pretrained_{g}": v for g, v in r["pretrained"].items()}
        rows.append({"held_out": held_out, "split": k, "catalog": r["catalog"]} | scores)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=None, help="Where the runs go (default: a temporary folder).")
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--config", type=Path, default=None, help="A lookalike.toml for every run (default: the defaults).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")
    parser.add_argument("--jobs", type=int, default=0, help="Runs computed at once, one process each (0: one per core), as `lookalike run --jobs`.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        cfg = load_config(args.config)
        overrides = {f"{section}.{key}": value for section, values in cfg.model_dump().items() for key, value in values.items()}
        pretrained = ImageEmbedder(create_backbone("efficientnet-lite0"), configured_cache_dir(cfg.features.cache_dir))
        cfg.evaluate.unseen_attribute = False  # every attribute is held out below, not only the one the run would draw
        run_pipeline(args.data, work / "all", cfg, splits=args.splits, progress=False, jobs=args.jobs)
        copies = copy_test(work / "all", args.splits, pretrained)
        unseen = unseen_test(RunDir(work / "all").dataset(), work, args.splits, overrides, args.jobs)
    summary = {key: float(np.mean([r[key] for r in unseen])) for key in unseen[0] if key.startswith(("trained_model", "pretrained"))}
    if args.json:
        print(json.dumps({"data": str(args.data), "splits": args.splits, "copies": copies, "unseen": summary, "unseen_runs": unseen}, indent=2))
        return
    print(f"\nCopy test on {args.data.name} ({args.splits} split(s); catalog = every photo, query = its altered copy)")
    print(f"{'model, distance':32s} {'found first':>12s} {'top 5':>8s} {'mean rank':>10s} {'tied queries':>13s}")
    for name, r in copies.items():
        print(f"{name:32s} {r['found_first']:>11.1%} {r['top5']:>8.1%} {r['mean_rank']:>10.2f} {r['tied']:>12.1%}")
    print(f"\nAttributes never trained on: leave-one-out 1-NN label accuracy ({len(unseen)} runs: each attribute held out, {args.splits} split(s) each)")
    print(f"{'held out':12s} {'split':>5s} {'catalog':>8s} {'unseen: trained':>16s} {'pretrained':>11s} {'trained attr.: trained':>23s} {'pretrained':>11s}")
    for r in unseen + [{"held_out": "mean", "split": "", "catalog": ""} | summary]:
        print(f"{r['held_out']:12s} {r['split']!s:>5s} {r['catalog']!s:>8s} {r['trained_model_unseen']:>16.1%} {r['pretrained_unseen']:>11.1%} {r['trained_model_trained']:>23.1%} {r['pretrained_trained']:>11.1%}")


if __name__ == "__main__":
    try:
        main()
    except LookalikeError as e:  # bad data or config: the message says what to fix (e.g. fridgeObjects needs [data] near_duplicates = "resolve")
        raise SystemExit(f"error: {e}") from None
