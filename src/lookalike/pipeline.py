"""The stages, in order: prepare -> refine -> featurize -> train-metric -> evaluate, repeated over K random splits.

Each stage reads the previous stage's outputs from the run directory, records a fingerprint of its
inputs, and skips its work when that fingerprint is unchanged (unless forced).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np

from . import visualize
from .backbones.config import describe_config
from .backbones.heads import pretrained_visual, visual_dims
from .backbones.registry import check_backbone, create_backbone, pretrained_fingerprint
from .config import LookalikeConfig
from .data import Dataset, Split, make_fit_split, make_split, scan_dataset
from .data.splits import NearDuplicateLeak, mislabelled_near_duplicates
from .errors import LookalikeError
from .evaluation import example_queries, gallery_metrics, negatives_above, positive_ranks, rank_summary
from .evaluation.calibration import pooled_bins, reliability
from .evaluation.lookalike import nearest_neighbour_accuracy, tied_fraction, unseen_shortfall_warning
from .evaluation.misses import misses_of, photos_behind_misses
from .features import configured_cache_dir, create_engine
from .features.extract import embed_images, embed_scanned
from .fileio import load_npy, read_json, save_npy, write_json
from .images import iter_image_files
from .metric import L2, LABELS, HardNegativeMiner, LearnedWeightedL2, WeightedL2Ranker, pair_features, pairs_from_sets, standard_distances
from .rundir import RunDir, fingerprint, log_scope, split_fingerprint, up_to_date

DISTANCE_ORDER = ("random", "l1", "l2", "cosine", "weighted_l2")
#: Part of evaluate's fingerprint: raise it when evaluation.json gains content, so runs evaluated before are redone.
EVALUATION_FORMAT = 4  # 2: example pictures drawn across attributes, misses included, each with its attribute; 3: calibration on test pairs; 4: the misses


def check_inputs(data: str | os.PathLike | Dataset, cfg: LookalikeConfig, run_dir: str | os.PathLike | None = None) -> None:
    """Refuse, before any folder is made or any work done, a dataset folder that is not there, a run folder
    inside it (the next scan would read the run's pictures as photos of an attribute), or a backbone that is not there."""
    if not isinstance(data, Dataset):
        folder = Path(data).expanduser()
        if not folder.is_dir():
            what = "is a file" if folder.exists() else "does not exist"
            raise LookalikeError(f"dataset folder {folder} {what}; give a folder with one sub-folder per attribute", param="data")
        if run_dir is not None:
            inside = Path(run_dir).expanduser().resolve()
            try:
                parts = inside.relative_to(folder.resolve()).parts
            except ValueError:
                parts = None
            if parts is not None and not any(p.startswith(".") for p in parts):  # hidden folders are never scanned
                taken_for = f"an attribute '{parts[0]}'" if parts else "its attributes"
                raise LookalikeError(
                    f"the run folder {run_dir} is inside the dataset folder {folder}: its report pictures would be scanned as photos "
                    f"of {taken_for}. Choose a run folder outside {folder}",
                    param="run_dir",
                )
    check_backbone(cfg.features.backbone, cfg.features.weights or None)


# ---------------------------------------------------------------- prepare
def prepare(data_dir: str | os.PathLike, run_dir: str | os.PathLike, cfg: LookalikeConfig, split: int = 0, force: bool = False, rescan: bool | None = None) -> Split:
    """Scan the dataset (once per run), then split it and draw the comparative sets for split `split`.

    `force` redoes the split; the scan is redone when the folder changed, or when `rescan` (default: `force`).
    """
    check_inputs(data_dir, cfg, run_dir)
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(cfg)
    scan_fp = _scan(run, data_dir, force if rescan is None else rescan, cfg.data.near_duplicate_max_distance)
    dataset = run.dataset()
    split_path = run.split_dir(split) / "split.json"
    seed = cfg.data.seed + split
    fp = split_fingerprint(scan_fp, cfg, split)
    if not force and up_to_date(split_path, fp):
        return run.split(split)
    report = run.split_dir(split) / "near_duplicates.json"
    try:
        s = make_split(dataset, cfg.data, seed)
    except NearDuplicateLeak as e:
        write_json(report, {"action": "refused", "pairs": e.pairs})
        raise LookalikeError(f"{e} (report: {report})") from None
    check_split_sizes(s, cfg, dataset)
    if unmeasured := sorted({im.attribute for im in dataset.images} - {dataset.images[q.query].attribute for q in s.sets["test"]}):
        run.log(
            f"warning: split {split}: no test query for {', '.join(unmeasured)} (a query and its positive need 2 of its test photos): "
            "the rank test says nothing about it; add photos, or lower data.train_ratio",
            style="yellow",
        )
    if s.near_duplicates:
        write_json(report, {"action": "resolved", "pairs": s.near_duplicates})
        run.log(f"split {split}: moved {len(s.near_duplicates)} near-duplicate(s) to their twin's part (report: {report})", style="yellow")
    write_json(split_path, s.to_dict() | {"fingerprint": fp})
    sizes = ", ".join(f"{p} {len(v)} images / {len(s.sets[p])} queries" for p, v in s.parts.items())
    run.log(f"split {split} (seed {seed}): {sizes}; train, validation and test share no image (checked by path and content hash)")
    return s


def _scan(run: RunDir, data: str | os.PathLike | Dataset, rescan: bool, max_distance: int) -> str:
    """Write RUN_DIR/dataset.json from a folder (scanned again only when it changed) or a given Dataset; its fingerprint.

    A fresh scan logs the files it skipped and near-duplicates filed under two attributes (in any part of any split).
    """
    if isinstance(data, Dataset):
        scan_fp = fingerprint(data.to_dict())
        if not up_to_date(run.dataset_file, scan_fp):
            write_json(run.dataset_file, data.to_dict() | {"fingerprint": scan_fp})
        return scan_fp
    data_dir = str(Path(data).expanduser().resolve())
    scan_fp = fingerprint(data_dir, _listing_signature(data_dir))
    if rescan or not up_to_date(run.dataset_file, scan_fp):
        run.log(f"Scanning {data_dir}")
        dataset = scan_dataset(data_dir)
        write_json(run.dataset_file, dataset.to_dict() | {"fingerprint": scan_fp})
        counts = {a: sum(im.attribute == a for im in dataset.images) for a in dataset.attributes}
        run.log(f"{len(dataset.images)} images in {len(counts)} attributes: " + ", ".join(f"{a} {n}" for a, n in counts.items()))
        for s in dataset.skipped:
            run.log(f"skipped {s['path']}: {s['reason']}", style="yellow")
        if mislabelled := mislabelled_near_duplicates(dataset, max_distance):
            shown = "; ".join(f"{a} ~ {b}" for a, b in mislabelled[:5])
            run.log(
                f"warning: {len(mislabelled)} near-duplicate pair(s) are filed under different attributes, so one copy of each is mislabelled: "
                f"{shown}{' ...' if len(mislabelled) > 5 else ''}. Move or delete the wrong copy (`lookalike dedup` lists them)",
                style="yellow",
            )
    return scan_fp


def check_split_sizes(s: Split, cfg: LookalikeConfig, dataset: Dataset) -> None:
    """Refuse, before any training, a split whose test part cannot form one query with its positive.

    Each attribute keeps at least one image out of training; a query needs a second one of its attribute in the
    test part. A larger test share (a lower data.train_ratio) or more images per attribute gives it that.
    """
    if s.sets["test"]:
        return
    per_attribute = {a: sum(dataset.images[i].attribute == a for i in s.parts["test"]) for a in dataset.attributes}
    moved = len({p["index_b"] for p in s.near_duplicates if p["part_b"] == "test"})
    why = (
        f" ({moved} test image(s) were moved next to their near-duplicate twins, as data.near_duplicates = \"resolve\" does: "
        "`lookalike dedup` lists the pairs)"
        if moved
        else ""
    )
    raise LookalikeError(
        f"the test part holds only {', '.join(f'{n} {a}' for a, n in per_attribute.items())} image(s){why}: no attribute has the 2 test "
        f"images a query and its positive need. Add images (8 or more per attribute) or lower data.train_ratio (now {cfg.data.train_ratio}) "
        "so that more of each attribute is kept for testing"
    )


def _listing_signature(root: str) -> str:
    """Name, size and time of every file the scan sees (linked folders included): a change means scan again."""
    passed_over: list[tuple[Path, str]] = []
    entries = []
    for path in [*iter_image_files(root, passed_over), *(p for p, _ in passed_over)]:
        try:
            st = os.stat(path)
        except OSError:
            continue
        entries.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return fingerprint(sorted(entries))


# ---------------------------------------------------------------- featurize
def featurize(run_dir: str | os.PathLike, split: int = 0, force: bool = False, progress: bool = True) -> np.ndarray:
    """Embed every image of the split (cached by content hash + backbone fingerprint); rows follow dataset order."""
    run = RunDir(run_dir)
    cfg = run.config()
    dataset = run.dataset()
    s = run.split(split)
    out = run.split_dir(split) / "features.npy"
    meta_path = run.split_dir(split) / "features.json"
    backbone = run.backbone(split, cfg)
    members = sorted(set().union(*s.parts.values()))
    paths = [str(dataset.absolute_path(i)) for i in members]
    digests = [dataset.images[i].sha256 for i in members]
    cache_dir = configured_cache_dir(cfg.features.cache_dir)

    def make_engine():
        return create_engine(backbone, cfg.features.engine, cfg.features.quantize, cache_dir, calibration_paths=paths, report=run.log)

    # The float engines share the backbone's vectors; only the INT8 model needs building to know its fingerprint.
    engine = make_engine() if cfg.features.quantize else None
    embedding_fp = engine.fingerprint if engine else backbone.fingerprint
    fp = fingerprint(embedding_fp, read_json(run.split_dir(split) / "split.json")["fingerprint"])
    if not force and up_to_date(meta_path, fp) and out.exists():
        return load_npy(out)
    engine = engine or make_engine()
    start = time.perf_counter()
    features = embed_scanned(engine, paths, digests, cache_dir, cfg.features.batch_size, progress)
    save_npy(out, features)
    described = describe_config(backbone.config) | ({"head": backbone.head_description} if backbone.head_description is not None else {})
    meta = {"fingerprint": fp, "backbone": described, "backbone_fingerprint": backbone.fingerprint, "embedding_fingerprint": engine.fingerprint, "engine": engine.name}
    write_json(meta_path, meta | {"rows": members})
    run.log(f"split {split}: {len(members)} embeddings ({backbone.config.name}, {backbone.config.embedding_dim}-d, {engine.name}) in {time.perf_counter() - start:.1f}s")
    return features


# ---------------------------------------------------------------- train-metric
def train_metric(run_dir: str | os.PathLike, split: int = 0, force: bool = False) -> WeightedL2Ranker:
    """Fit the weighted-L2 SVM on train pairs (optionally mining hard negatives), calibrate on validation pairs."""
    run = RunDir(run_dir)
    cfg = run.config()
    sdir = run.split_dir(split)
    model_path = sdir / "metric.json"
    summary_path = sdir / "train_metric.json"
    fp = fingerprint(read_json(run.require(sdir / "features.json", "featurize"))["fingerprint"], cfg.metric.model_dump())
    if not force and up_to_date(summary_path, fp) and model_path.exists():
        return WeightedL2Ranker.load(model_path)
    dataset = run.dataset()
    s = run.split(split)
    features, row_of = run.features(split)
    a, b, y = pairs_from_sets(s.sets["train"], row_of)
    X = pair_features(features[a], features[b])
    calib_part = "validation" if s.sets.get("validation") else "train"
    if calib_part == "train":
        run.log(f"no validation pairs: {_why_no_validation(cfg, s)}; calibrating on training pairs", style="yellow")
    va, vb, vy = pairs_from_sets(s.sets[calib_part], row_of)
    Xv = pair_features(features[va], features[vb])
    m = cfg.metric
    head = read_json(sdir / "features.json")["backbone"].get("head")
    visual, visual_weight = visual_dims(head), m.pretrained_visual_weight if pretrained_visual(head) else m.visual_weight
    train_rows = [row_of[i] for i in s.parts["train"]]
    labels = np.array([dataset.images[i].attribute for i in s.parts["train"]])

    def fit(C: float) -> WeightedL2Ranker:
        miner = HardNegativeMiner(m.hard_negative_iterations, m.hard_negative_max_per_iteration, m.hard_negative_sampling_rounds, seed=cfg.data.seed + split)
        ranker = WeightedL2Ranker(
            C=C, class_weight=m.class_weight, max_iter=m.max_iter, platt_negative_ratio=m.platt_negative_ratio, visual_dims=visual, visual_weight=visual_weight
        )
        return miner.fit_ranker(ranker, X, y, features[train_rows], labels, Xv, vy, log=run.log)

    selection = []
    if m.C_candidates and s.sets.get("validation"):
        for C in m.C_candidates:
            candidate = fit(C)
            score = rank_summary(positive_ranks(LearnedWeightedL2(candidate), features, row_of, s.sets["validation"]))
            selection.append({"C": C, "validation_top1": score["top1"], "validation_mean_rank": score["mean_rank"], "ranker": candidate})
        best = min(selection, key=lambda c: (-c["validation_top1"], c["validation_mean_rank"]))
        ranker = best["ranker"]
        run.log(f"split {split}: chose C = {ranker.C} on validation (" + ", ".join(f"C={c['C']}: top-1 {c['validation_top1']:.1%}, mean rank {c['validation_mean_rank']:.2f}" for c in selection) + ")")
    else:
        ranker = fit(m.C)
    ranker.save(model_path)
    summary = {
        "fingerprint": fp,
        "C": ranker.C,
        "C_selection": [{k: v for k, v in c.items() if k != "ranker"} for c in selection],
        "train_pairs": int(len(y)),
        "calibration_pairs": int(len(vy)),
        "calibrated_on": calib_part,
        "train": _pair_accuracy(ranker, X, y),
        calib_part: _pair_accuracy(ranker, Xv, vy),
    }
    write_json(summary_path, summary)
    visualize.plot_calibration(ranker, ranker.decision_function(Xv), vy, sdir / "calibration.png")
    parts = dict.fromkeys(["train", calib_part])  # once when calibrated on the training pairs themselves
    run.log(f"split {split}: SVM pair accuracy " + ", ".join(f"{p} {summary[p]['accuracy']:.1%} (balanced {summary[p]['balanced_accuracy']:.1%})" for p in parts))
    return ranker


def _why_no_validation(cfg: LookalikeConfig, s: Split) -> str:
    if cfg.data.validation_ratio == 0:
        return "data.validation_ratio = 0"
    return (
        f"the validation part holds {len(s.parts.get('validation', []))} image(s), fewer than 2 of any one attribute "
        f"(data.validation_ratio = {cfg.data.validation_ratio}); add images or raise data.validation_ratio"
    )


def _pair_accuracy(ranker: WeightedL2Ranker, X: np.ndarray, y: np.ndarray) -> dict:
    pred = ranker.predict(X)
    pos, neg = y == 1, y == 0
    return {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float((np.mean(pred[pos] == 1) + np.mean(pred[neg] == 0)) / 2),
    }


# ---------------------------------------------------------------- evaluate
def evaluate(run_dir: str | os.PathLike, split: int = 0, force: bool = False) -> dict:
    """Rank each test query's positive among its negatives under every distance; gallery recall and mAP."""
    run = RunDir(run_dir)
    cfg = run.config()
    sdir = run.split_dir(split)
    out = sdir / "evaluation.json"
    fp = fingerprint(read_json(run.require(sdir / "train_metric.json", "train-metric"))["fingerprint"], cfg.evaluate.model_dump(), EVALUATION_FORMAT)
    if not force and up_to_date(out, fp):
        return read_json(out)
    dataset = run.dataset()
    s = run.split(split)
    features, row_of = run.features(split)
    ranker = WeightedL2Ranker.load(sdir / "metric.json")
    check_split_sizes(s, cfg, dataset)
    test_sets = s.sets["test"]
    distances = standard_distances(ranker, seed=cfg.data.seed + split)
    ranks = {d.name: positive_ranks(d, features, row_of, test_sets) for d in distances}
    test_rows = [row_of[i] for i in s.parts["test"]]
    labels = np.array([dataset.images[i].attribute for i in s.parts["test"]])
    gallery = {d.name: gallery_metrics(d, features[test_rows], labels) for d in distances if d.name != "random"} if cfg.evaluate.gallery else {}
    searched = {d.name: d for d in distances if d.name in ("l2", "weighted_l2")}
    ties = {name: tied_fraction(d, features[test_rows], labels) for name, d in searched.items()}
    copies = _copy_test(run, cfg, split, dataset, s.parts["test"], features[test_rows], searched) if cfg.evaluate.copy_test else {}
    # every pair of test photos: how often pairs given probability p share an attribute
    pairs = np.triu_indices(len(test_rows), 1)
    probabilities = ranker.probability(LearnedWeightedL2(ranker).matrix(features[test_rows], features[test_rows])[pairs])
    calibration = reliability(probabilities, labels[pairs[0]] == labels[pairs[1]], ranker.platt_negative_ratio)
    result = {
        "fingerprint": fp,
        "split": split,
        "n_queries": len(test_sets),
        "distances": {name: rank_summary(r) for name, r in ranks.items()},
        "gallery": gallery,
        "copies": copies,
        "ties": ties,
        "calibration": calibration,
        "ranks": {name: r.tolist() for name, r in ranks.items()},
        "misses": misses_of(test_sets, negatives_above(searched["weighted_l2"], features, row_of, test_sets)),
        "pictures": _query_pictures(dataset, test_sets, ranks["weighted_l2"], features, row_of, ranker, sdir, cfg.evaluate.query_pictures, cfg.data.seed + split),
    }
    visualize.plot_rank_curves({LABELS[name]: r for name, r in ranks.items()}, sdir / "ranks.png")
    write_json(out, result)
    return result


def _copy_test(run: RunDir, cfg: LookalikeConfig, split: int, dataset: Dataset, members: list[int], catalog: np.ndarray, distances: dict) -> dict:
    """An altered copy of each test image (crop, shrink, brighten, JPEG) searched among the test images."""
    from .evaluation.lookalike import altered_copy, copy_ranks, copy_summary
    from .images import open_image

    engine = create_engine(run.backbone(split, cfg), cfg.features.engine, cfg.features.quantize, configured_cache_dir(cfg.features.cache_dir))
    copies = embed_images(engine, [altered_copy(open_image(dataset.absolute_path(i)), seed=i) for i in members], cfg.features.batch_size)
    return {name: copy_summary(copy_ranks(d, catalog, copies)) for name, d in distances.items()}


def _query_pictures(dataset: Dataset, sets, ranks, features, row_of, ranker, sdir: Path, limit: int, seed: int) -> list[dict]:
    """Pictures of `limit` example queries, drawn at random across attributes with their misses (`example_queries`)."""
    pictures = []
    attributes = [dataset.images[cset.query].attribute for cset in sets]
    for n, i in enumerate(example_queries(attributes, ranks, limit, seed)):
        cset, rank = sets[i], ranks[i]
        refs = [cset.positive, *cset.negatives]
        d = ranker.distance(features[row_of[cset.query]], features[[row_of[r] for r in refs]])
        best = refs[int(np.argmin(d))]
        path = sdir / "queries" / f"query-{n:03d}.jpg"
        visualize.query_picture(
            str(dataset.absolute_path(cset.query)), str(dataset.absolute_path(best)), str(dataset.absolute_path(cset.positive)), best == cset.positive, path, int(rank)
        )
        pictures.append({"file": path.relative_to(sdir.parent).as_posix(), "query": dataset.images[cset.query].path, "attribute": attributes[i], "rank": int(rank)})
    return pictures


# ---------------------------------------------------------------- unseen attribute
#: Part of the unseen test's fingerprint: raise it when unseen.json gains content, so tests made before are redone.
UNSEEN_FORMAT = 1


def held_out_attribute(attributes: list[str], seed: int) -> str | None:
    """The attribute a run's unseen test holds out, drawn with the run's seed (no name is preferred).

    None below 3 attributes: the model trained without it needs 2 to learn what separates attributes.
    """
    if len(attributes) < 3:
        return None
    ordered = sorted(attributes)
    return ordered[int(np.random.default_rng(seed).integers(len(ordered)))]


def unseen_attribute_test(dataset: Dataset, held_out: str, run_dir: str | os.PathLike, cfg: LookalikeConfig, force: bool = False, progress: bool = True) -> dict:
    """Do photos of an attribute the model never saw still find each other? Train without it, then search.

    A run of one split in `run_dir` (prepare -> train-metric, seed data.seed; no evaluation) learns from every
    attribute of `dataset` but `held_out`. Its catalog is that split's test photos plus the same share of
    `held_out`'s photos, drawn with data.seed; every catalog photo searches the others (leave-one-out), and the
    share whose nearest match has its attribute is given for the held-out ("unseen") photos and the trained
    ones, under the learned distance and, as the reference, on the pretrained backbone's pooled features with
    L2. Writes run_dir/unseen.json; skipped when up to date.
    """
    from .refine.stage import refine

    if held_out not in dataset.attributes:
        raise LookalikeError(f"cannot hold out {held_out!r}: it is not one of the dataset's attributes ({', '.join(dataset.attributes)})")
    trained_on = Dataset(dataset.root, [im for im in dataset.images if im.attribute != held_out])
    if len(trained_on.attributes) < 2:
        raise LookalikeError(f"cannot hold out {held_out!r}: the model trained without it needs 2 other attributes, the dataset has {', '.join(dataset.attributes)}")
    run = RunDir(run_dir)
    with log_scope(f"unseen test without {held_out}"):  # its "split 0" and its check are not the parent run's
        prepare(trained_on, run_dir, cfg, force=force)
        refine(run_dir, force=force, progress=progress)
        featurize(run_dir, force=force, progress=progress)
        train_metric(run_dir, force=force)
    unseen = [i for i, im in enumerate(dataset.images) if im.attribute == held_out]
    pretrained_model = functools.cache(lambda: create_backbone(cfg.features.backbone, cfg.features.weights or None))  # built once, and only if needed
    # weights still to download: only the built model knows its fingerprint
    reference_fp = pretrained_fingerprint(cfg.features.backbone, cfg.features.weights or None) or pretrained_model().fingerprint
    out = run.root / "unseen.json"
    trained_fp = read_json(run.split_dir(0) / "train_metric.json")["fingerprint"]
    fp = fingerprint(trained_fp, [dataset.images[i].sha256 for i in unseen], reference_fp, cfg.data.seed, UNSEEN_FORMAT)
    if not force and up_to_date(out, fp):
        return read_json(out)
    reference = pretrained_model()
    nested, test = run.dataset(), run.split(0).parts["test"]
    share = len(test) / len(nested.images)
    drawn = np.random.default_rng(cfg.data.seed).choice(unseen, size=min(len(unseen), max(2, round(share * len(unseen)))), replace=False)
    catalog = [nested.images[i] for i in test] + [dataset.images[i] for i in sorted(drawn.tolist())]
    paths = [str(Path(dataset.root) / im.path) for im in catalog]
    digests = [im.sha256 for im in catalog]
    labels = np.array([im.attribute for im in catalog])
    groups = {"unseen": labels == held_out, "trained": labels != held_out}
    cache_dir = configured_cache_dir(cfg.features.cache_dir)
    model = create_engine(run.backbone(0, cfg), cfg.features.engine, cfg.features.quantize, cache_dir, calibration_paths=paths)
    learned = LearnedWeightedL2(WeightedL2Ranker.load(run.split_dir(0) / "metric.json"))
    pretrained = create_engine(reference, cfg.features.engine, False, cache_dir)
    result = {
        "fingerprint": fp,
        "held_out": held_out,
        "trained_on": trained_on.attributes,
        "catalog": len(catalog),
        "unseen_in_catalog": int(groups["unseen"].sum()),
        "learned": nearest_neighbour_accuracy(learned, embed_scanned(model, paths, digests, cache_dir, cfg.features.batch_size, progress), labels, groups),
        "pretrained": nearest_neighbour_accuracy(L2(), embed_scanned(pretrained, paths, digests, cache_dir, cfg.features.batch_size, progress), labels, groups),
        "reference": f"pretrained {reference.config.name}, {reference.config.input_size} px, pooled features, L2",
    }
    write_json(out, result)
    return result


def _unseen_stage(run: RunDir, cfg: LookalikeConfig, force: bool, progress: bool) -> None:
    """The unseen test of a run, once (not per split): one attribute, drawn with data.seed, held out in RUN_DIR/unseen/."""
    dataset = run.dataset()
    held_out = held_out_attribute(dataset.attributes, cfg.data.seed)
    if held_out is None:
        run.log(
            f"unseen-attribute test skipped: it holds one attribute out and trains on the others, so it needs 3 attributes and this dataset has "
            f"{len(dataset.attributes)} ({', '.join(dataset.attributes)}); set evaluate.unseen_attribute = false to leave this note out"
        )
        return
    others = ", ".join(a for a in dataset.attributes if a != held_out)
    run.log(f"unseen-attribute test: {held_out} held out, a model trained on {others} only ({run.unseen_dir})", style="bold")
    try:
        r = unseen_attribute_test(dataset, held_out, run.unseen_dir, cfg, force=force, progress=progress)
    except LookalikeError as e:
        # the splits are evaluated already: a dataset too small for this extra test loses only the test, and says why
        run.unseen_dir.mkdir(parents=True, exist_ok=True)
        write_json(run.unseen_dir / "unseen.json", {"held_out": held_out, "skipped": str(e)})
        run.log(
            f"warning: unseen-attribute test skipped, as a run without {held_out} cannot be evaluated: {e} "
            "(set evaluate.unseen_attribute = false to leave this note out)",
            style="yellow",
        )
        return
    run.log(
        f"unseen attribute {held_out}: 1-NN accuracy {r['learned']['unseen']:.1%} (pretrained {r['pretrained']['unseen']:.1%}), "
        f"trained attributes {r['learned']['trained']:.1%} (pretrained {r['pretrained']['trained']:.1%}); "
        f"catalog of {r['catalog']} photos, {r['unseen_in_catalog']} of them {held_out}"
    )
    if warning := unseen_shortfall_warning(r, refined=cfg.refine.epochs > 0):
        run.log(f"warning: {warning}", style="yellow")


# ---------------------------------------------------------------- whole run
#: The unseen-attribute test's task number among a run's tasks (the splits are 0, 1, ...).
UNSEEN_TASK = -1


def run_pipeline(data_dir, run_dir, cfg: LookalikeConfig, splits: int = 1, force: bool = False, progress: bool = True, jobs: int = 0) -> dict:
    """prepare every split, then refine -> featurize -> train-metric -> evaluate for each and the unseen-attribute test
    once, then the summary and report.

    The splits and the unseen test are independent: with `jobs` processes (0: one per core) they run side by side
    (parallel.py), after the inputs they share are cached with every core (`prefill`).
    """
    from .parallel import run_tasks, threads_per_worker, workers_for
    from .refine.stage import prefill, resolve_mode
    from .report import write_report

    check_inputs(data_dir, cfg, run_dir)
    run = RunDir(run_dir)
    start = time.perf_counter()
    for k in range(splits):
        prepare(data_dir, run_dir, cfg, split=k, force=force, rescan=force and k == 0)
    tasks = list(range(splits)) + ([UNSEEN_TASK] if cfg.evaluate.unseen_attribute else [])
    workers = workers_for(jobs, len(tasks), gpu=resolve_mode(cfg) == "full")
    if workers > 1:
        prefill(run_dir, range(splits), force=force, progress=progress)
        tasks = tasks[-1:] + tasks[:-1] if tasks[-1] == UNSEEN_TASK else tasks  # the longest task first
        run.log(f"{len(tasks)} tasks ({splits} split(s){' and the unseen-attribute test' if UNSEEN_TASK in tasks else ''}) in {workers} processes of {threads_per_worker(workers)} thread(s) each")

    def task(k: int) -> None:
        if k == UNSEEN_TASK:
            _unseen_stage(run, cfg, force, progress and workers == 1)
        else:
            _split_stages(run, cfg, k, splits, force, progress and workers == 1)

    run_tasks(task, tasks, workers, desc="splits", progress=progress)
    metrics = summarize(run_dir, splits=list(range(splits)))
    write_report(run_dir)
    run.log(f"done in {time.perf_counter() - start:.0f}s")
    return metrics


def _split_stages(run: RunDir, cfg: LookalikeConfig, k: int, splits: int, force: bool, progress: bool) -> None:
    """refine -> featurize -> train-metric -> evaluate of prepared split k."""
    from .refine.stage import refine

    run.log(f"split {k} (of splits 0-{splits - 1})" if splits > 1 else f"split {k}", style="bold")
    refine(run.root, split=k, force=force, progress=progress)
    featurize(run.root, split=k, force=force, progress=progress)
    train_metric(run.root, split=k, force=force)
    evaluate(run.root, split=k, force=force)


def train_on_all(data: str | os.PathLike | Dataset, run_dir: str | os.PathLike, cfg: LookalikeConfig, force: bool = False, progress: bool = True) -> RunDir:
    """refine -> featurize -> train-metric on every labelled image but a validation slice (calibration, choices).

    The run has one split (0) with no test part: this trains the model to deploy, and `run_pipeline`'s
    report on random splits is its evaluation.
    """
    from .refine.stage import refine

    check_inputs(data, cfg, run_dir)
    run = RunDir(run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    run.save_config(cfg)
    scan_fp = _scan(run, data, force, cfg.data.near_duplicate_max_distance)
    split_path = run.split_dir(0) / "split.json"
    fp = split_fingerprint(scan_fp, cfg, None)
    if force or not up_to_date(split_path, fp):
        s = make_fit_split(run.dataset(), cfg.data, cfg.data.seed)
        write_json(split_path, s.to_dict() | {"fingerprint": fp})
        run.log(f"training on {len(s.parts['train'])} images, {len(s.parts['validation'])} kept for calibration (data.validation_ratio = {cfg.data.validation_ratio})")
    refine(run_dir, split=0, force=force, progress=progress)
    featurize(run_dir, split=0, force=force, progress=progress)
    train_metric(run_dir, split=0, force=force)
    return run


def summarize(run_dir, splits: list[int] | None = None) -> dict:
    """Average every evaluated split into RUN_DIR/metrics.json (the contract other tools read)."""
    run = RunDir(run_dir)
    cfg = run.config()
    dataset = run.dataset()
    splits = [k for k in (splits if splits is not None else _current_splits(run, cfg)) if (run.split_dir(k) / "evaluation.json").exists()]
    if not splits:
        raise LookalikeError(f"no evaluated split in {run.root}; run `lookalike evaluate` first")
    evals = [read_json(run.split_dir(k) / "evaluation.json") for k in splits]
    distances = {}
    for name in DISTANCE_ORDER:
        rows = [e["distances"][name] for e in evals if name in e["distances"]]
        if not rows:
            continue
        entry = {key: float(np.mean([r[key] for r in rows])) for key in ("top1", "top5", "mean_rank", "median_rank")}
        entry |= {f"{key}_std": float(np.std([r[key] for r in rows])) for key in ("top1", "top5", "mean_rank", "median_rank")}
        distances[name] = entry
    gallery_by = {}
    for name in DISTANCE_ORDER:
        rows = [e["gallery"][name] for e in evals if name in e.get("gallery", {})]
        if rows:
            gallery_by[name] = _mean_of(rows)
    search = {}
    for part in ("copies", "ties"):
        rows = [e[part] for e in evals if e.get(part)]
        if rows:
            search[part] = {name: _mean_of(r[name] for r in rows) for name in rows[0]}
    calibrations = [e["calibration"] for e in evals if e.get("calibration")]
    calibration = None
    if calibrations:
        calibration = {key: float(np.mean([c[key] for c in calibrations])) for key in ("ece", "brier", "pairs")}
        calibration |= {f"{key}_std": float(np.std([c[key] for c in calibrations])) for key in ("ece", "brier")}
        calibration |= {"splits": len(calibrations), "negative_ratio": calibrations[0]["negative_ratio"], "bins": pooled_bins(calibrations)}
        visualize.plot_reliability(calibration["bins"], run.reliability_plot)
    unseen = _unseen_result(run, cfg, dataset)
    if unseen:
        search["unseen_skipped" if "skipped" in unseen else "unseen"] = unseen.get("skipped", unseen)
    misses = _photos_behind_misses(run, dataset, evals)
    backbone = read_json(run.split_dir(splits[0]) / "features.json")["backbone"]["name"]
    negatives = [len(cset.negatives) for k in splits for cset in run.split(k).sets["test"]]
    metrics = {
        "dataset": dataset.root,
        "n_images": len(dataset.images),
        "attributes": dataset.attributes,
        "backbone": backbone,
        "splits": len(splits),
        "n_test_queries": int(np.mean([e["n_queries"] for e in evals])),
        "negatives_per_query": {"min": min(negatives), "max": max(negatives), "mean": float(np.mean(negatives))},
        "distances": distances,
        "gallery": gallery_by.get("weighted_l2", {}),
        "gallery_by_distance": gallery_by,
        "lookalike_search": search,
        "calibration": calibration,
        "misses": misses,
        "refined": any((run.split_dir(k) / "refined" / "backbone.json").exists() for k in splits),
        "config": cfg.model_dump(),
    }
    write_json(run.metrics, metrics)
    return metrics


def _current_splits(run: RunDir, cfg: LookalikeConfig) -> list[int]:
    """The run's split folders made from the dataset and [data] settings it has now; a folder left by an earlier run
    of more splits over another dataset is logged and left out, since its numbers and image indices are not this run's."""
    scan_fp = read_json(run.dataset_file).get("fingerprint")
    current, stale = [], []
    for k in run.splits():
        (current if run.split_is_current(k, cfg, scan_fp) else stale).append(k)
    if stale:
        run.log(
            f"warning: left out split(s) {', '.join(map(str, stale))}: made from another version of the dataset or of the [data] settings; "
            f"`lookalike run --splits {max(stale) + 1}` makes them again, or delete their folders",
            style="yellow",
        )
    return current


def _photos_behind_misses(run: RunDir, dataset: Dataset, evals: list[dict]) -> dict | None:
    """The photos most of the learned distance's misses come back to, over every split, each pictured in RUN_DIR/misses/."""
    for old in run.misses_dir.glob("photo-*.jpg"):
        old.unlink()
    if earlier := [e["split"] for e in evals if "misses" not in e]:
        run.log(
            f"split(s) {', '.join(map(str, earlier))} were evaluated by an earlier version, which kept no misses: "
            "`lookalike evaluate --split K` on each lists the photos behind the misses",
            style="yellow",
        )
        return None
    found = photos_behind_misses([e["misses"] for e in evals], dataset.images) | {"queries": sum(e["n_queries"] for e in evals), "splits": len(evals)}
    for n, photo in enumerate(found["photos"]):
        photo["file"] = f"{run.misses_dir.name}/photo-{n:02d}.jpg"
        visualize.thumbnail(dataset.absolute_path(photo["image"]), run.root / photo["file"])
    return found


def _unseen_result(run: RunDir, cfg: LookalikeConfig, dataset: Dataset) -> dict | None:
    """The run's unseen-attribute test, when it is on and was made for the attribute the run's seed holds out
    ({"held_out", "skipped": why} when the dataset was too small for it)."""
    path = run.unseen_dir / "unseen.json"
    held_out = held_out_attribute(dataset.attributes, cfg.data.seed)
    if not cfg.evaluate.unseen_attribute or held_out is None or not path.exists():
        return None
    result = read_json(path)
    return {key: value for key, value in result.items() if key != "fingerprint"} if result["held_out"] == held_out else None


def _mean_of(values) -> float | dict:
    """Mean over splits of a number, or of each number in a dict of them."""
    values = list(values)
    if isinstance(values[0], dict):
        return {key: float(np.mean([v[key] for v in values])) for key in values[0]}
    return float(np.mean(values))
