"""Refinement on tiny generated textures: it learns, it saves and reloads exactly, its options do what they say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_dataset
from lookalike.backbones import Preprocessor, create_backbone, load_backbone
from lookalike.backbones.registry import save_backbone
from lookalike.config import LookalikeConfig, RefineConfig, load_config
from lookalike.errors import LookalikeError
from lookalike.images import open_image
from lookalike.pipeline import featurize, prepare
from lookalike.refine.stage import refine
from lookalike.refine.blocks import split_stages, trunk_stages
from lookalike.refine.trainer import epoch_order, learning_rate

TINY = {"data": {"train_ratio": 0.6, "validation_ratio": 0.25}, "features": {"resolution": 64, "batch_size": 16}}


def tiny_config(**refine) -> LookalikeConfig:
    base = {"epochs": 4, "lr_schedule": [[4, 0.01]], "batch_size": 8, "trainable_blocks": 2, "cached_views": 1, "resolution": 64}
    return LookalikeConfig.model_validate(TINY | {"refine": base | refine})


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "textures", per_attribute=8)


def prepared(textures: Path, run: Path, cfg: LookalikeConfig) -> Path:
    prepare(textures, run, cfg, split=0)
    return run


def test_refinement_lowers_the_training_loss_and_writes_its_outputs(textures, tmp_path):
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=6, lr_schedule=[[6, 0.02]]))
    record = refine(run, progress=False)
    losses = [h["train_loss"] for h in record["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert record["mode"] == "cached" and record["device"] == "cpu" and record["classes"] == ["checks", "dots", "stripes"]
    assert all({"train_error", "validation_error", "test_error", "lr"} <= set(h) for h in record["history"])
    out = run / "split-0" / "refined"
    for name in ("backbone.json", "backbone.safetensors", "history.json", "curves.png"):
        assert (out / name).exists(), name
    head = {"kind": "attribute-classifier", "in_features": 1280, "classes": ["checks", "dots", "stripes"], "output": "posterior"}
    assert json.loads((out / "backbone.json").read_text())["head"] == head
    # up to date: a second call does not train again
    before = (out / "backbone.safetensors").stat().st_mtime_ns
    refine(run, progress=False)
    assert (out / "backbone.safetensors").stat().st_mtime_ns == before
    # featurize embeds with the refined model: one probability per attribute, and the vectors refine stored
    # from its cached activations are the ones the model computes from the images
    features = featurize(run, progress=False)
    assert features.shape == (24, 3)
    model = load_backbone(out)
    meta = json.loads((run / "split-0" / "features.json").read_text())
    dataset = json.loads((run / "dataset.json").read_text())
    first = [str(Path(dataset["root"]) / dataset["images"][i]["path"]) for i in meta["rows"][:4]]
    pre = Preprocessor(model.config)
    with torch.inference_mode():
        direct = model(torch.stack([pre.tensor(open_image(p)) for p in first])).numpy()
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    assert np.allclose(direct, features[:4], atol=1e-4)


def test_saved_model_reloads_to_identical_outputs(textures, tmp_path):
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=1))
    refine(run, progress=False)
    a = load_backbone(run / "split-0" / "refined")
    save_backbone(a, tmp_path / "copy")
    b = load_backbone(tmp_path / "copy")
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
    assert a.fingerprint == b.fingerprint and a.config.embedding_dim == 3 and a.config.input_size == 64
    pretrained = create_backbone("efficientnet-lite0", resolution=64)
    changed = [k for k, v in pretrained.trunk.state_dict().items() if not k.startswith("_fc.") and not torch.equal(v, a.trunk.state_dict()[k])]
    assert changed and all(k.startswith(("_blocks.15.", "_conv_head", "_bn1")) for k in changed), "only the last 2 blocks learn"


def test_last_layer_only_keeps_the_trunk_and_resolution_is_applied(textures, tmp_path):
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=1, last_layer_only=True, resolution=96, embedding="pooled"))
    refine(run, progress=False)
    refined = load_backbone(run / "split-0" / "refined")
    pretrained = create_backbone("efficientnet-lite0")
    assert refined.config.input_size == 96 and refined.head is None and refined.config.embedding_dim == 1280
    for k, v in pretrained.trunk.state_dict().items():
        assert k.startswith("_fc.") or torch.equal(v, refined.trunk.state_dict()[k]), k


def test_zero_epochs_skips_and_removes_an_old_refined_model(textures, tmp_path):
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=1))
    refine(run, progress=False)
    prepared(textures, run, tiny_config(epochs=0))
    assert refine(run, progress=False) is None
    assert not (run / "split-0" / "refined").exists()


def test_full_mode_trains_every_block(textures, tmp_path):
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=1, mode="full", embedding="pooled"))
    record = refine(run, progress=False)
    assert record["mode"] == "full" and record["trained_blocks"] == "all"
    refined = load_backbone(run / "split-0" / "refined")
    pretrained = create_backbone("efficientnet-lite0", resolution=64)
    assert not torch.equal(pretrained.trunk._conv_stem.weight, refined.trunk._conv_stem.weight)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_stages_rebuild_the_feature_maps(arch, tmp_path):
    import torchvision.models as tvm

    weights = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in getattr(tvm, arch)(weights=None).state_dict().items()}, str(weights))
    backbone = create_backbone(arch, weights, resolution=64)
    frozen, trainable = split_stages(backbone, 3)
    assert len(trainable) == 3 and len(frozen) + 3 == len(trunk_stages(backbone))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(trainable(frozen(x)), backbone.feature_maps(x), atol=1e-5)


def test_efficientnet_stages_rebuild_the_feature_maps():
    backbone = create_backbone("efficientnet-lite0", resolution=64)
    frozen, trainable = split_stages(backbone, 6)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(trainable(frozen(x)), backbone.feature_maps(x), atol=1e-5)


def test_learning_rate_schedule_follows_the_tutorial():
    schedule = RefineConfig(lr_schedule=[[20, 0.01], [20, 0.001], [5, 0.0001]]).lr_schedule
    assert [learning_rate(schedule, e) for e in (0, 19, 20, 39, 40, 44, 60)] == [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001, 0.0001]
    with pytest.raises(LookalikeError):
        learning_rate([], 0)


def test_balancing_duplicates_the_smaller_attributes_and_the_cap_applies():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 5)
    rng = np.random.default_rng(0)
    order = epoch_order(labels, balance=True, cap=0, rng=rng)
    assert np.bincount(labels[order]).tolist() == [10, 10, 10]
    assert set(order[labels[order] == 1]) == {10, 11, 12}
    assert len(epoch_order(labels, balance=False, cap=0, rng=rng)) == 18
    assert len(epoch_order(labels, balance=True, cap=7, rng=rng)) == 7


def test_tutorial_parameters_are_reachable_from_the_config(tmp_path):
    p = tmp_path / "tutorial.toml"
    p.write_text(
        "[refine]\nepochs = 45\nlr_schedule = [[20, 0.01], [20, 0.001], [5, 0.0001]]\nmomentum = 0.9\nweight_decay = 0.0005\n"
        "batch_size = 16\ndropout = 0.5\nresolution = 1000\nmode = \"full\"\nembedding = \"pooled\"\n"
    )
    rc = load_config(p).refine
    assert rc.epochs == 45 and rc.batch_size == 16 and rc.resolution == 1000 and rc.lr_schedule[-1] == (5, 0.0001)


def test_refinement_repeats_exactly_with_the_same_seed(textures, tmp_path, monkeypatch):
    """Views are drawn in parallel threads; each must still depend only on (image, view number, seed)."""
    histories = []
    for attempt in range(2):
        monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / f"cache-{attempt}"))
        run = prepared(textures, tmp_path / f"run-{attempt}", tiny_config(epochs=3))
        histories.append([h["train_loss"] for h in refine(run, progress=False)["history"]])
    assert histories[0] == histories[1]
