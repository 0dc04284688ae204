"""The refine stage of a run: fine-tune the backbone on one split's training images, save it for featurize.

Writes RUN_DIR/split-k/refined/: backbone.safetensors + backbone.json (the refined model, which featurize
then uses), history.json (per-epoch loss and errors) and curves.png. Only the split's training images are
trained on; validation and test errors are measured after each epoch and never used to choose anything.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import visualize
from ..backbones import Backbone, create_backbone, load_backbone
from ..backbones.heads import AttributeHead, Head, LookalikeHead
from ..backbones.config import PRETRAINED_INPUT_SIZE
from ..backbones.registry import save_backbone
from ..backbones.stages import pooled_features, resolve_taps
from ..config import LookalikeConfig, RefineConfig
from ..data import Dataset, Split
from ..errors import ConfigError, LookalikeError
from ..features import FeatureCache, configured_cache_dir, create_engine
from ..features.extract import batch_for, embed_scanned
from ..fileio import read_json, write_json
from ..rundir import RunDir, fingerprint, up_to_date
from .augment import AugmentParams, ViewMaker
from .cached import ActivationCache, fill_cache, frozen_runner
from .blocks import split_trunk
from .objectives import objective_for
from .trainer import CachedViews, OnlineViews, RefineNet, Refiner, Views, centre_view_batches
from .visual_part import choose_visual_part

CACHE_FORMAT = 3


def resolve_mode(cfg: LookalikeConfig) -> str:
    """'full' (every block trained on fresh augmentations) on a CUDA GPU, else 'cached' (CPU), unless set."""
    if cfg.refine.mode != "auto":
        return cfg.refine.mode
    return "full" if torch.cuda.is_available() else "cached"


def base_backbone(cfg: LookalikeConfig) -> Backbone:
    """The pretrained backbone refinement starts from, at the input size featurize will embed with."""
    f = cfg.features
    backbone = create_backbone(f.backbone, f.weights or None, f.resolution, f.normalization)
    try:
        taps = resolve_taps(cfg.refine.texture_stages, len(backbone.stages()))
    except LookalikeError as e:
        raise ConfigError(f"refine.texture_stages of {f.backbone}: {e}") from None
    return Backbone(backbone.trunk, replace(backbone.config, taps=taps), backbone.fingerprint)


def refine(run_dir: str | os.PathLike, split: int = 0, force: bool = False, progress: bool = True) -> dict | None:
    """Fine-tune on split `split`'s training images; returns the history record, or None when refinement is off."""
    run = RunDir(run_dir)
    cfg = run.config()
    rc = cfg.refine
    out = run.split_dir(split) / "refined"
    if rc.epochs == 0:
        if out.exists():
            shutil.rmtree(out)
            run.log(f"split {split}: refine.epochs = 0, removed the earlier refined model; featurize uses the pretrained backbone")
        return None
    mode = resolve_mode(cfg)
    seed = cfg.data.seed + split
    fp = _fingerprint(run, cfg, split, mode)
    record_path = out / "history.json"
    if not force and _done(out, fp):
        return read_json(record_path)

    dataset = run.dataset()
    backbone = base_backbone(cfg)
    taps = backbone.config.taps
    visual_setting = rc.visual_part if rc.embedding == "lookalike" else "learned"
    frozen, trained = split_trunk(backbone, _trained_blocks(rc, mode))
    trained_stages = "all" if frozen is None else len(trained.run.blocks)
    if frozen is None:
        mode = "full"  # every stage is trained, so there is nothing frozen to cache
    augment = _augment_params(rc)
    parts = _parts(run.split(split))
    digests = {p: [dataset.images[i].sha256 for i in idx] for p, idx in parts.items()}
    labels = {p: [dataset.images[i].attribute for i in idx] for p, idx in parts.items()}
    start = time.perf_counter()
    run.log(
        f"split {split}: refining {backbone.config.name} at {backbone.config.input_size} px on {len(parts['train'])} training images, "
        f"{mode} mode ({_trained_part(trained_stages)}), {rc.epochs} epochs; the {rc.embedding} head sees {_descriptor_name(backbone.config.taps)}"
    )
    cache = None
    if mode == "cached":
        cache, computed, wanted = _cached_views(cfg, backbone, frozen, augment, dataset, [parts], progress, lambda m: run.log(f"split {split}: {m}"))
        run.log(f"split {split}: {computed} new view(s) of the frozen blocks cached, {wanted - computed} reused ({time.perf_counter() - start:.0f}s)")
        views = {p: CachedViews(cache, digests[p], rc.cached_views) for p in parts}
        net_frozen: nn.Module = nn.Identity()
    else:
        maker = ViewMaker(backbone.config, augment)
        views = {p: OnlineViews(maker, [str(dataset.absolute_path(i)) for i in parts[p]], digests[p]) for p in parts}
        net_frozen = frozen if frozen is not None else nn.Identity()
    dim = descriptor_dim(frozen, trained, backbone.config.input_size)
    head = make_head(rc, dim, dataset.attributes)
    net = RefineNet(net_frozen, trained, head)
    monitor = {p: (views[p], labels[p]) for p in ("validation", "test") if p in parts}
    objective = objective_for(head, rc.view_weight, rc.view_temperature, rc.label_smoothing)
    # texture statistics of several stages differ in scale by orders of magnitude; pooled features do not
    standardize = bool(taps)
    try:
        if visual_setting == "auto":
            train_paths = [str(dataset.absolute_path(i)) for i in parts["train"]]
            choice = choose_visual_part(
                lambda classes: RefineNet(net_frozen, copy.deepcopy(trained), make_head(rc, dim, classes)),
                views["train"], labels["train"], rc, objective, seed, cfg.metric.visual_weight,
                lambda: _pretrained_features(cfg, train_paths, digests["train"], progress), standardize,
            )
        else:
            choice = {"chosen": visual_setting, "reason": f"refine.visual_part = {rc.visual_part}"}
        if rc.embedding == "lookalike":
            run.log(f"split {split}: {choice['chosen']} visual part ({choice['reason']})", style="yellow" if choice.get("unclear") else "")
        refiner = Refiner(rc, objective, seed=seed, standardize=standardize, progress=progress, log=run.log)
        refiner.fit(net, views["train"], labels["train"], monitor)
        pooled_size = 0
        if choice["chosen"] == "pretrained":
            # the trunk's own pooled features, of the image at the size it was trained at (a second pass)
            pooled_size = PRETRAINED_INPUT_SIZE
            # photos the head was not trained on, whose confidence is not inflated by fitting them
            reference_part = "validation" if "validation" in parts else "train"
            reference = _median_confidence(net, views[reference_part], len(labels[reference_part]))
            head.keep_pretrained_visual(_pooled_dim(backbone), reference)
            choice["gate_reference"] = {"median_confidence_of": reference_part, "value": round(reference, 4)}
        embedding_dim = head.embedding_dim if rc.embedding != "pooled" else dim
        refined = Backbone(
            backbone.trunk.eval(), replace(backbone.config, embedding_dim=embedding_dim, pooled_size=pooled_size), "", head.eval() if rc.embedding != "pooled" else None
        )
        save_backbone(refined, out)
        if cache is not None and not pooled_size:  # the cached views hold no second pass; featurize makes those
            _store_embeddings(cfg, out, net, views, digests)
    finally:
        if cache is not None:
            cache.close()
        for part_views in views.values():
            if isinstance(part_views, OnlineViews):
                part_views.close()
    record = {
        "fingerprint": fp,
        "mode": mode,
        "device": str(refiner.device_),
        "trained_stages": trained_stages,
        "texture_stages": list(taps),
        "visual_part": choice if rc.embedding == "lookalike" else None,
        "classes": refiner.classes_,
        "seconds": round(time.perf_counter() - start, 1),
        "history": refiner.history_,
    }
    visualize.plot_training_curves(refiner.history_, out / "curves.png")
    write_json(record_path, record)
    last = refiner.history_[-1]
    run.log(
        f"split {split}: refined in {record['seconds']:.0f}s; final train error {last['train_error']:.1%}"
        + (f", validation {last['validation_error']:.1%}" if "validation_error" in last else "")
        + (f", test {last['test_error']:.1%}" if "test_error" in last else "")
    )
    return record


def prefill(run_dir: str | os.PathLike, splits: Sequence[int], force: bool = False, progress: bool = True) -> None:
    """Cache, with every core, the frozen-block views and pretrained features that refining `splits` will read.

    For splits refined side by side in processes of their own (`run_pipeline`'s jobs): each then finds its
    inputs made, instead of making views the others make too, on its share of the cores. Splits refined already
    (up to date) and CPU-less modes ("full", or no frozen blocks) need nothing.
    """
    run = RunDir(run_dir)
    cfg = run.config()
    rc = cfg.refine
    mode = resolve_mode(cfg)
    if rc.epochs == 0 or mode != "cached":
        return
    stale = [k for k in splits if force or not _done(run.split_dir(k) / "refined", _fingerprint(run, cfg, k, mode))]
    if not stale:
        return
    backbone = base_backbone(cfg)
    frozen, _ = split_trunk(backbone, _trained_blocks(rc, mode))
    if frozen is None:
        return
    start, dataset = time.perf_counter(), run.dataset()
    parts = [_parts(run.split(k)) for k in stale]
    label = f"split{'s' if len(stale) > 1 else ''} {', '.join(map(str, stale))}"
    cache, computed, wanted = _cached_views(cfg, backbone, frozen, _augment_params(rc), dataset, parts, progress, lambda m: run.log(f"{label}: {m}"))
    cache.close()
    if rc.embedding == "lookalike" and rc.visual_part == "auto":  # the held-out check compares with the pretrained features
        train = sorted({i for p in parts for i in p["train"]})
        _pretrained_features(cfg, [str(dataset.absolute_path(i)) for i in train], [dataset.images[i].sha256 for i in train], progress)
    run.log(f"{label}: {computed} new view(s) of the frozen blocks cached, {wanted - computed} reused ({time.perf_counter() - start:.0f}s)")


def _fingerprint(run: RunDir, cfg: LookalikeConfig, split: int, mode: str) -> str:
    split_fp = read_json(run.require(run.split_dir(split) / "split.json", "prepare"))["fingerprint"]
    return fingerprint(split_fp, cfg.features.model_dump(include={"backbone", "weights", "resolution", "normalization"}), cfg.refine.model_dump(), mode, cfg.data.seed + split)


def _done(out: Path, fp: str) -> bool:
    """Whether the refined model in `out` was made from inputs with fingerprint `fp`."""
    return up_to_date(out / "history.json", fp) and (out / "backbone.safetensors").exists()


def _trained_blocks(rc: RefineConfig, mode: str) -> int:
    return 0 if rc.last_layer_only else (-1 if mode == "full" else rc.trainable_blocks)


def _augment_params(rc: RefineConfig) -> AugmentParams:
    return AugmentParams(rc.crop_scale_min, rc.hflip, rc.vflip, rc.color_jitter, rc.hue_jitter, rc.degrade)


def _parts(s: Split) -> dict[str, list[int]]:
    return {p: s.parts[p] for p in ("train", "validation", "test") if s.parts.get(p)}


def _cached_views(
    cfg: LookalikeConfig, backbone: Backbone, frozen: nn.Module, augment: AugmentParams, dataset: Dataset, parts: list[dict[str, list[int]]], progress: bool,
    log: Callable[[str], None],
) -> tuple[ActivationCache, int, int]:
    """The activation cache, with every view these splits' parts need computed: training images' centre and random
    views, the others' centre view. Returns (open cache, views computed now, views wanted).

    `log` says what is about to be computed: on a pipe, where no progress bar shows, the longest quiet stretch of a run.
    """
    rc = cfg.refine
    cache_dir = configured_cache_dir(cfg.features.cache_dir)
    key = fingerprint(backbone.fingerprint, backbone.config.taps, len(frozen.run.blocks), asdict(augment), CACHE_FORMAT)
    cache = ActivationCache(cache_dir, key)
    paths = {dataset.images[i].sha256: str(dataset.absolute_path(i)) for split_parts in parts for idx in split_parts.values() for i in idx}
    wanted: dict[tuple[str, int], None] = {}
    for split_parts in parts:
        wanted.update(((dataset.images[i].sha256, v), None) for i in split_parts["train"] for v in range(rc.cached_views + 1))
        wanted.update(((dataset.images[i].sha256, 0), None) for p in ("validation", "test") for i in split_parts.get(p, []))
    todo = cache.missing(list(wanted))
    computed = 0
    if todo:  # the runner is an ONNX export and the view maker imports torchvision: neither is needed otherwise
        log(f"computing {len(todo)} view(s) of the frozen stages ({len(wanted) - len(todo)} cached already); later splits and runs reuse them")
        runner = frozen_runner(frozen, backbone.config.input_size, cache_dir, key)
        computed = fill_cache(cache, runner, ViewMaker(backbone.config, augment), paths, todo, batch_for(cfg.features.batch_size, backbone.config.input_size), progress=progress)
    return cache, computed, len(wanted)


def _pooled_dim(backbone: Backbone) -> int:
    """Length of the trunk's pooled features, from one small image."""
    with torch.no_grad():
        return pooled_features(backbone.stages(), torch.zeros(1, 3, 64, 64), 64).shape[1]


def _pretrained_features(cfg: LookalikeConfig, paths: list[str], digests: list[str], progress: bool) -> torch.Tensor:
    """The pretrained backbone's unit pooled features of these images at its own input size, through the feature cache."""
    f, cache_dir = cfg.features, configured_cache_dir(cfg.features.cache_dir)
    engine = create_engine(create_backbone(f.backbone, f.weights or None, PRETRAINED_INPUT_SIZE, f.normalization), f.engine, False, cache_dir)
    return torch.from_numpy(embed_scanned(engine, paths, digests, cache_dir, f.batch_size, progress))


def _median_confidence(net: RefineNet, views: Views, n: int) -> float:
    """The attribute members' median confidence over `n` photos' centre views: the gate's reference."""
    net.eval()
    with torch.inference_mode():
        confidence = [net.head.attribute_confidence(net.head.parts(net.descriptor(batch))[0]) for _, batch in centre_view_batches(views, range(n))]
    return float(torch.cat(confidence).median())


def make_head(rc: RefineConfig, in_features: int, classes: list[str]) -> Head:
    """The head `refine.embedding` asks for ("pooled" trains a classifier and then drops it)."""
    if rc.embedding == "lookalike":
        return LookalikeHead(in_features, classes, rc.attribute_dim, rc.visual_dim, rc.temperature, rc.dropout, rc.attribute_members)
    return AttributeHead(in_features, classes, "logits" if rc.embedding == "pooled" else rc.embedding, rc.dropout)


def _trained_part(trained_stages: int | str) -> str:
    if trained_stages == "all":
        return "every stage + new head"
    return f"last {trained_stages} stage(s) + new head" if trained_stages else "new head on cached descriptors"


def _descriptor_name(taps: tuple[int, ...]) -> str:
    if not taps:
        return "the last stage's average-pooled features"
    return "the channel mean and standard deviation of stages " + ", ".join(map(str, taps))


def descriptor_dim(frozen: nn.Module | None, trained: nn.Module, input_size: int) -> int:
    """The descriptor's length, from one small image through the (eval-mode) pretrained parts."""
    with torch.no_grad():
        x = torch.zeros(1, 3, input_size, input_size)
        return trained(frozen(x) if frozen is not None else x).shape[1]


def _store_embeddings(cfg: LookalikeConfig, out: Path, net: RefineNet, views: dict[str, CachedViews], digests: dict[str, list[str]]) -> None:
    """Put the refined model's embeddings of the split's images into the feature cache, from the cached centre views.

    The centre view's frozen-block activations are kept in float32, so these are the vectors featurize would
    compute from the images; featurize then finds them all in the cache instead of running the whole trunk again.
    """
    saved = load_backbone(out)
    cache_dir = configured_cache_dir(cfg.features.cache_dir)
    net.eval()
    vectors: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for part, part_views in views.items():
            for items, batch in centre_view_batches(part_views, range(len(digests[part]))):
                descriptor = net.descriptor(batch)
                emb = saved.head(descriptor) if saved.head is not None else descriptor
                vectors.update(zip((digests[part][i] for i in items), emb.numpy()))
    with FeatureCache(cache_dir, saved.fingerprint, saved.config.embedding_dim) as cache:
        cache.put_many(vectors)
