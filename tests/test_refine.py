"""Refinement on tiny generated textures: it learns, it saves and reloads exactly, its options do what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_dataset
from lookalike.backbones import Backbone, Preprocessor, create_backbone, load_backbone
from lookalike.backbones.registry import save_backbone
from lookalike.config import LookalikeConfig, RefineConfig, load_config
from lookalike.errors import ConfigError, LookalikeError
from lookalike.images import open_image
from lookalike.pipeline import featurize, prepare
from lookalike.refine.stage import refine
from lookalike.backbones.stages import channel_statistics, resolve_taps
from lookalike.refine.blocks import split_trunk
from lookalike.refine.cached import ActivationCache
from lookalike.backbones.heads import LookalikeHead, head_from_description
from lookalike.refine.objectives import LookalikeObjective
from lookalike.refine.trainer import RefineNet, epoch_order, learning_rate
from lookalike.refine.visual_part import MARGIN, SIGNIFICANCE, choose_visual_part, decide, sign_test

#: without CUDA refinement caches the frozen part's output; with it, mode "auto" trains every block
CUDA = torch.cuda.is_available()
AUTO_MODE, DEVICE = ("full", "cuda") if CUDA else ("cached", "cpu")
#: the default lookalike embedding: 4 attribute members of 64 numbers, then a 64-number visual part
EMBEDDING_DIM = 4 * 64 + 64

TINY = {"data": {"train_ratio": 0.6, "validation_ratio": 0.25}, "features": {"resolution": 64, "batch_size": 16}}


def tiny_config(resolution: int = 64, **refine) -> LookalikeConfig:
    # the held-out check that chooses the visual part has its own tests (here and on real photos in test_lookalike_search)
    base = {"epochs": 4, "lr_schedule": [[4, 0.003]], "batch_size": 8, "trainable_blocks": 2, "cached_views": 1, "visual_part": "learned"}
    return LookalikeConfig.model_validate(TINY | {"features": TINY["features"] | {"resolution": resolution}, "refine": base | refine})


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "textures", per_attribute=8)


def prepared(textures: Path, run: Path, cfg: LookalikeConfig) -> Path:
    prepare(textures, run, cfg, split=0)
    return run


def test_refinement_lowers_the_training_loss_and_writes_its_outputs(textures, tmp_path):
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=6, lr_schedule=[[6, 0.001]]))
    record = refine(run, progress=False)
    losses = [h["train_loss"] for h in record["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert record["mode"] == AUTO_MODE and record["device"] == DEVICE and record["classes"] == ["checks", "dots", "stripes"]
    assert all({"train_error", "validation_error", "test_error", "lr"} <= set(h) for h in record["history"])
    out = run / "split-0" / "refined"
    for name in ("backbone.json", "backbone.safetensors", "history.json", "curves.png"):
        assert (out / name).exists(), name
    # the head sees the mean and standard deviation of each channel of stages 10, 12, 14 and 16
    head = {
        "kind": "lookalike-embedding", "in_features": 2 * (112 + 192 + 192 + 320), "classes": ["checks", "dots", "stripes"],
        "attribute_dim": 64, "attribute_members": 4, "visual_dim": 64, "temperature": 0.1,
    }
    saved = json.loads((out / "backbone.json").read_text())
    assert saved["head"] == head and saved["taps"] == [10, 12, 14, 16]
    assert record["trained_stages"] == ("all" if CUDA else 2) and record["texture_stages"] == [10, 12, 14, 16]
    assert record["visual_part"] == {"chosen": "learned", "reason": "refine.visual_part = learned"}
    # up to date: a second call does not train again
    before = (out / "backbone.safetensors").stat().st_mtime_ns
    refine(run, progress=False)
    assert (out / "backbone.safetensors").stat().st_mtime_ns == before
    # featurize embeds with the refined model: [attribute part, visual part], and the vectors refine stored
    # from its cached activations are the ones the model computes from the images
    features = featurize(run, progress=False)
    assert features.shape == (24, EMBEDDING_DIM)
    model = load_backbone(out)
    meta = json.loads((run / "split-0" / "features.json").read_text())
    dataset = json.loads((run / "dataset.json").read_text())
    first = [str(Path(dataset["root"]) / dataset["images"][i]["path"]) for i in meta["rows"][:4]]
    pre = Preprocessor(model.config)
    with torch.inference_mode():
        direct = model(torch.from_numpy(np.stack([pre.array(open_image(p)) for p in first]))).numpy()
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
    assert a.fingerprint == b.fingerprint and a.config.embedding_dim == EMBEDDING_DIM and a.config.input_size == 64
    pretrained = create_backbone("efficientnet-lite0", resolution=64)
    changed = changed_parameters(pretrained.trunk, a.trunk)
    # weights, not only batch-norm running statistics (which move without any learning)
    assert any(k.endswith("conv.weight") for k in changed), changed
    if not CUDA:
        assert all(k.startswith(("_blocks.14.", "_blocks.15.")) for k in changed), "only the last 2 stages the descriptor needs learn"
    # the head standardises the descriptor with statistics of the training images
    assert not torch.equal(a.head.shift, torch.zeros_like(a.head.shift)) and bool((a.head.scale > 0).all())


def changed_parameters(before: torch.nn.Module, after: torch.nn.Module) -> list[str]:
    """Learnable parameters (not buffers) that differ between two copies of a trunk, its unused classifier aside."""
    now = dict(after.named_parameters())
    return [k for k, v in before.named_parameters() if not k.startswith(("_fc.", "fc.")) and not torch.equal(v, now[k])]


def test_last_layer_only_keeps_the_trunk_and_resolution_is_applied(textures, tmp_path):
    # the tutorial's design: no texture statistics, the last stage average-pooled
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=1, last_layer_only=True, resolution=96, embedding="pooled", texture_stages=[]))
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
    # two fresh random views of every photo per step, for the lookalike head's view term
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=1, mode="full"))
    record = refine(run, progress=False)
    assert record["mode"] == "full" and record["trained_stages"] == "all"
    refined = load_backbone(run / "split-0" / "refined")
    assert refined.config.embedding_dim == EMBEDDING_DIM
    pretrained = create_backbone("efficientnet-lite0", resolution=64)
    assert not torch.equal(pretrained.trunk._conv_stem.weight, refined.trunk._conv_stem.weight)


@pytest.mark.parametrize("arch", ["efficientnet-lite0", "resnet18", "resnet50"])
def test_stages_rebuild_the_trunk_and_the_cut_trunk_computes_the_descriptor(arch, tmp_path):
    if arch.startswith("resnet"):
        import torchvision.models as tvm

        weights = tmp_path / f"{arch}.safetensors"
        save_file({k: v.contiguous() for k, v in getattr(tvm, arch)(weights=None).state_dict().items()}, str(weights))
        backbone = create_backbone(arch, weights, resolution=64)
        reference = lambda x: torch.nn.Sequential(*list(backbone.trunk.children())[:-1])(x).flatten(1)  # noqa: E731 - up to the average pool
    else:
        backbone = create_backbone(arch, resolution=64)
        reference = lambda x: backbone.trunk.extract_features(x).mean((2, 3))  # noqa: E731
    x = torch.randn(2, 3, 64, 64)
    n = len(backbone.stages())
    textured = Backbone(backbone.trunk, replace(backbone.config, taps=resolve_taps([-8, -6, -4, -2], n)), backbone.fingerprint)
    with torch.inference_mode():
        assert torch.allclose(backbone.descriptor(x), reference(x), atol=1e-5)
        for model in (backbone, textured):
            whole = model.descriptor(x)
            for trained_stages in (0, 1, 3, -1):
                frozen, trained = split_trunk(model, trained_stages)
                assert torch.allclose(trained(frozen(x) if frozen is not None else x), whole, atol=1e-5), (model.config.taps, trained_stages)
                assert (frozen is None) == (trained_stages < 0)
                if frozen is not None:
                    assert len(trained.run.blocks) == trained_stages
    # stages past the last tap are never run: with taps the cached row holds statistics only
    frozen, _ = split_trunk(textured, 0)
    with torch.inference_mode():
        assert frozen(x).shape[1] == whole.shape[1] == sum(2 * b.shape[1] for b in _tapped_outputs(textured, x))


def _tapped_outputs(model: Backbone, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for i, stage in enumerate(model.stages()):
        x = stage(x)
        if i in model.config.taps:
            outs.append(x)
    return outs


def test_channel_statistics_and_stage_indices():
    x = torch.randn(3, 5, 7, 6)
    stats = channel_statistics(x)
    assert torch.allclose(stats[:, :5], x.mean((2, 3)), atol=1e-6)
    assert torch.allclose(stats[:, 5:], x.std((2, 3), unbiased=False), atol=1e-4)
    assert resolve_taps([-2, 3, -8, 3], 18) == (3, 10, 16)
    with pytest.raises(LookalikeError, match="18 stages"):
        resolve_taps([18], 18)


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
        "batch_size = 16\ndropout = 0.5\nmode = \"full\"\nembedding = \"pooled\"\noptimizer = \"sgd\"\n[features]\nresolution = 1000\n"
    )
    cfg = load_config(p)
    rc = cfg.refine
    assert rc.optimizer == "sgd" and rc.epochs == 45 and rc.batch_size == 16 and cfg.features.resolution == 1000 and rc.lr_schedule[-1] == (5, 0.0001)
    # one input size for refine and featurize: the old refine key says where it went
    p.write_text("[refine]\nresolution = 500\n")
    with pytest.raises(ConfigError, match="now features.resolution"):
        load_config(p)


def test_refinement_repeats_exactly_with_the_same_seed(textures, tmp_path, monkeypatch):
    """Views are drawn in parallel threads; each must still depend only on (image, view number, seed)."""
    histories = []
    for attempt in range(2):
        monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / f"cache-{attempt}"))
        run = prepared(textures, tmp_path / f"run-{attempt}", tiny_config(epochs=3))
        histories.append([h["train_loss"] for h in refine(run, progress=False)["history"]])
    assert histories[0] == histories[1]


def test_activation_cache_serves_views_from_memory_within_its_budget_and_the_same_values_after_eviction(tmp_path):
    rng = np.random.default_rng(0)
    stored = {(f"{i:064x}", v): rng.normal(size=(4, 8, 8)).astype(np.float32) for i in range(40) for v in range(2)}
    keys = list(stored)
    with ActivationCache(tmp_path, "k") as writer:
        writer.put_many(stored)
    expected = np.stack([stored[k] if k[1] == 0 else stored[k].astype(np.float16) for k in keys]).astype(np.float32)
    with ActivationCache(tmp_path, "k") as cache:
        assert np.array_equal(cache.get_many(keys), expected)
        cache._db.execute("DELETE FROM activations")  # a second read must not need the file
        cache._db.commit()
        assert np.array_equal(cache.get_many(keys[::-1] + keys[:3]), np.concatenate([expected[::-1], expected[:3]]))
        with pytest.raises(LookalikeError, match="lacks 1 view"):
            cache.get_many([("f" * 64, 0)])
    with ActivationCache(tmp_path, "k", memory_mb=0) as uncached:  # keeps nothing in memory, and still reads
        uncached.put_many(stored)
        assert np.array_equal(uncached.get_many(keys), expected) and uncached._read.currsize == 0
    small = ActivationCache(tmp_path, "k", memory_mb=20 * stored[keys[0]].nbytes / 2**20)  # room for 20 of the 80 views
    for _ in range(2):  # the rest are read from the file again
        assert np.array_equal(small.get_many(keys), expected)
    assert small._read.currsize <= small._read.maxsize
    small.close()


def test_cli_sets_the_descriptor_and_the_trained_stages(textures, tmp_path):
    def refine_cli(*args):
        return subprocess.run([sys.executable, "-m", "lookalike", "refine", "--run", str(run), *args], capture_output=True, text=True)

    run = prepared(textures, tmp_path / "run", tiny_config(epochs=1))
    result = refine_cli("--texture-stages", "none", "--trainable-blocks", "1")
    assert result.returncode == 0, result.stderr
    record = json.loads((run / "split-0" / "refined" / "history.json").read_text())
    assert record["texture_stages"] == [] and record["trained_stages"] == 1
    assert json.loads((run / "config.json").read_text())["refine"]["texture_stages"] == []
    result = refine_cli("--texture-stages", "-3,-1")
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "split-0" / "refined" / "backbone.json").read_text())["taps"] == [15, 17]
    for value, message in (("last", "comma-separated stage numbers"), ("-30", "18 stages")):
        bad = refine_cli("--texture-stages", value)
        assert bad.returncode == 2 and message in bad.stderr.replace("\n", " ") and "Traceback" not in bad.stderr
    assert json.loads((run / "config.json").read_text())["refine"]["texture_stages"] == [-3, -1], "a refused option leaves the config alone"


def test_refinement_works_with_a_torchvision_resnet(textures, tmp_path):
    import torchvision.models as tvm

    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in tvm.resnet18(weights=None).state_dict().items()}, str(weights))
    cfg = tiny_config(epochs=2)
    cfg.features.backbone, cfg.features.weights = "resnet18", str(weights)
    run = prepared(textures, tmp_path / "run", cfg)
    record = refine(run, progress=False)
    assert record["texture_stages"] == [1, 3, 5, 7] and record["trained_stages"] == 2
    refined = load_backbone(run / "split-0" / "refined")
    initial = tvm.resnet18(weights=None)
    initial.load_state_dict(load_file(str(weights)))
    changed = changed_parameters(initial, refined.trunk)
    assert changed and all(k.startswith(("layer3.1.", "layer4.0.")) or CUDA for k in changed), changed
    # the first block of each of layer1..layer4: 64, 128, 256 and 512 channels, mean and std each
    assert refined.config.name == "resnet18" and refined.head.in_features == 2 * (64 + 128 + 256 + 512)
    assert featurize(run, progress=False).shape == (24, EMBEDDING_DIM)


@pytest.mark.parametrize("embedding", ["posterior", "logits"])
def test_the_classifier_embeddings_stay_available(textures, tmp_path, embedding):
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=2, embedding=embedding, optimizer="sgd"))
    refine(run, progress=False)
    refined = load_backbone(run / "split-0" / "refined")
    assert refined.head.describe()["kind"] == "attribute-classifier" and refined.head.describe()["output"] == embedding
    assert refined.config.embedding_dim == 3
    with torch.inference_mode():
        x = torch.randn(4, 3, 64, 64)
        out, logits = refined(x), refined.head.logits(refined.descriptor(x))
    # the posterior is the softmax of the classifier's logits; the logits embedding is those logits themselves
    assert torch.allclose(out, logits.softmax(-1) if embedding == "posterior" else logits, atol=1e-6)
    features = featurize(run, progress=False)
    assert features.shape == (24, 3) and np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    assert (features.min() < 0) == (embedding == "logits"), "only logits can be negative"


def test_new_layers_learn_at_their_multiple_of_the_scheduled_rate(textures, tmp_path, monkeypatch):
    import lookalike.refine.trainer as trainer

    seen: list[list[float]] = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(trainer.torch.optim, "AdamW", RecordingAdamW)
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=2, lr_schedule=[[1, 0.002], [1, 0.0005]], new_layer_lr_multiplier=10))
    refine(run, progress=False)
    steps_per_epoch = len(seen) // 2
    assert len(seen) == 2 * steps_per_epoch > 0
    # group 0 is the new head, group 1 the pretrained blocks being refined
    assert seen[0] == pytest.approx([0.02, 0.002]) and seen[-1] == pytest.approx([0.005, 0.0005])


def test_label_smoothing_reaches_both_objectives():
    from lookalike.backbones.heads import AttributeHead, LookalikeHead
    from lookalike.refine.objectives import objective_for

    torch.manual_seed(0)
    classes = ["a", "b", "c"]
    target = torch.tensor([0, 1, 2, 1])
    descriptors = [torch.randn(4, 10), torch.randn(4, 10)]
    head = AttributeHead(10, classes)
    logits = head.logits(descriptors[0])
    eps = 0.2
    # (1 - eps) x cross-entropy + eps x the mean negative log-probability over the classes
    expected = (1 - eps) * torch.nn.functional.cross_entropy(logits, target) - eps * logits.log_softmax(-1).mean()
    loss, _ = objective_for(head, 1.0, 0.1, eps)(head, descriptors, target)
    assert torch.allclose(loss, expected, atol=1e-6)
    lookalike = LookalikeHead(10, classes, attribute_dim=4, visual_dim=4)
    plain, _ = objective_for(lookalike, 0.0, 0.1, 0.0)(lookalike, descriptors, target)
    smoothed, _ = objective_for(lookalike, 0.0, 0.1, eps)(lookalike, descriptors, target)
    parts = [lookalike.parts(d) for d in descriptors]
    scores = [lookalike.proxy_logits(part, proxies) for a, v in parts for part, proxies in ((a, lookalike.attribute_proxies), (v, lookalike.visual_proxies))]
    assert torch.allclose(smoothed, sum((1 - eps) * torch.nn.functional.cross_entropy(z, target) - eps * z.log_softmax(-1).mean() for z in scores), atol=1e-5)
    assert not torch.allclose(plain, smoothed)


def test_attribute_members_are_an_ensemble_whose_distances_average():
    from lookalike.refine.objectives import objective_for

    torch.manual_seed(0)
    classes = ["a", "b", "c"]
    head = LookalikeHead(10, classes, attribute_dim=4, visual_dim=3, attribute_members=3).eval()
    x = torch.randn(5, 10)
    embedding = head(x)
    assert embedding.shape == (5, 15) and torch.allclose(embedding.norm(dim=1), torch.ones(5))
    # each member is its own unit vector, and the attribute part's squared distance is the members' mean
    members = torch.nn.functional.normalize(head.attribute(head.standardized(x)).view(5, 3, 4), dim=2)
    attribute = embedding[:, :12] * 2**0.5
    assert torch.allclose(((attribute[0] - attribute[1]) ** 2).sum(), ((members[0] - members[1]) ** 2).sum(1).mean(), atol=1e-6)
    # each member scores the attributes against its own proxies; the head's logits are their mean
    proxies = torch.nn.functional.normalize(head.attribute_proxies.view(3, 3, 4), dim=2)
    own = torch.stack([members[:, m] @ proxies[m].T / head.temperature for m in range(3)])
    assert torch.allclose(head.member_logits(head.parts(x)[0]), own, atol=1e-5) and torch.allclose(head.logits(x), own.mean(0), atol=1e-5)
    # training pulls every member to its own proxies: the loss is the members' mean cross-entropy, plus the visual part's
    target = torch.tensor([0, 1, 2, 1, 0])
    views = [x, torch.randn(5, 10)]
    loss, first = objective_for(head, 0.0, 0.1, 0.0)(head, views, target)
    ce = torch.nn.functional.cross_entropy
    expected = sum(
        sum(ce(m, target) for m in head.member_logits(a)) / 3 + ce(head.proxy_logits(v, head.visual_proxies), target) for a, v in (head.parts(d) for d in views)
    )
    assert torch.allclose(loss, expected, atol=1e-5) and torch.allclose(first, head.logits(x), atol=1e-5)
    # saved and rebuilt from its description: the same embedding
    again = head_from_description(head.describe())
    again.load_state_dict(head.state_dict())
    assert head.describe()["attribute_members"] == 3 and torch.equal(again.eval()(x), embedding)
    # a model saved before members existed describes one projection, with the same weight shapes as then
    old = {k: v for k, v in LookalikeHead(10, classes, 4, 3).describe().items() if k != "attribute_members"}
    single = head_from_description(old)
    assert single.attribute_members == 1 and single.attribute_proxies.shape == (3, 4) and single.attribute.weight.shape == (4, 10)


def test_a_pretrained_visual_part_is_the_untouched_pooled_features_and_the_attribute_part_shrinks_where_members_doubt(textures, tmp_path):
    run = prepared(textures, tmp_path / "run", tiny_config(epochs=3, lr_schedule=[[3, 0.003]], visual_part="pretrained", trainable_blocks=0))
    record = refine(run, progress=False)
    out = run / "split-0" / "refined"
    saved = json.loads((out / "backbone.json").read_text())
    # the descriptor ends with a second pass: the pooled features (1280) of the image at 224 px, the network's own size
    assert saved["taps"] == [10, 12, 14, 16] and saved["pooled_size"] == 224 and saved["head"]["pretrained_dim"] == 1280
    # [attribute part, the length it lost, pooled features]
    assert saved["head"]["in_features"] == 2 * (112 + 192 + 192 + 320) and saved["embedding_dim"] == 4 * 64 + 1 + 1280
    assert record["visual_part"]["chosen"] == "pretrained" and record["visual_part"]["reason"] == "refine.visual_part = pretrained"
    # the gate's reference is the median confidence of photos the head was not trained on
    assert record["visual_part"]["gate_reference"]["median_confidence_of"] == "validation" and saved["head"]["gate_power"] == 1
    model = load_backbone(out)
    assert float(model.head.gate_reference) == pytest.approx(record["visual_part"]["gate_reference"]["value"], abs=1e-4)
    pretrained = create_backbone("efficientnet-lite0", resolution=64)
    x = torch.from_numpy(np.stack([Preprocessor(model.config).array(open_image(p)) for p in sorted(textures.rglob("*.png"))[:12]]))
    with torch.inference_mode():
        embedding = model(x)
        attribute, rest, visual = embedding[:, :256] * 2**0.5, embedding[:, 256] * 2**0.5, embedding[:, 257:] * 2**0.5
        resized = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        reference = torch.nn.functional.normalize(create_backbone("efficientnet-lite0", resolution=224)(resized), dim=1)
    # the pooled features of the pretrained network at its own input size, untouched by refinement
    assert not changed_parameters(pretrained.trunk, model.trunk)
    assert torch.allclose(visual, reference, atol=1e-5)
    norms = attribute.norm(dim=1)
    # a photo the members doubt more than the validation photos' median has its attribute part shrunk, never grown
    assert bool((norms <= 1 + 1e-5).all()) and float(norms.min()) < 0.99
    with torch.inference_mode():
        gate = (model.head.attribute_confidence(model.head.parts(model.descriptor(x))[0]) / model.head.gate_reference).clamp(0, 1)
    assert torch.allclose(norms, gate, atol=1e-5)
    # a model saved before the gate's power was recorded squared the ratio, and still does
    old = {k: v for k, v in saved["head"].items() if k != "gate_power"}
    assert head_from_description(old).gate_power == 2
    # unit length by construction, so scaling embeddings to unit length (every consumer does) changes nothing
    assert torch.allclose(norms.square() + rest.square(), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    # featurize (ONNX Runtime where installed) gives the vectors the model computes
    features = featurize(run, progress=False)
    assert features.shape == (24, 4 * 64 + 1 + 1280)
    meta = json.loads((run / "split-0" / "features.json").read_text())
    dataset = json.loads((run / "dataset.json").read_text())
    first = [str(Path(dataset["root"]) / dataset["images"][i]["path"]) for i in meta["rows"][:4]]
    with torch.inference_mode():
        direct = model(torch.from_numpy(np.stack([Preprocessor(model.config).array(open_image(p)) for p in first]))).numpy()
    assert np.allclose(direct, features[:4], atol=1e-4)


class _Descriptors:
    """Views over fixed descriptors: training views add a little noise, the centre view is the row itself."""

    def __init__(self, rows: np.ndarray):
        self.rows = torch.from_numpy(rows.astype(np.float32))

    def train(self, items, epoch, rng, n=1):
        return [self.rows[list(items)] + 0.05 * torch.from_numpy(rng.standard_normal((len(items), self.rows.shape[1])).astype(np.float32)) for _ in range(n)]

    def eval(self, items):
        return self.rows[list(items)]


@pytest.mark.parametrize("informative", ["texture", "pooled"])
def test_the_held_out_check_keeps_the_learned_visual_part_unless_the_pooled_features_find_unseen_attributes_better(informative):
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c", "d"], 25)
    centres = {which: rng.standard_normal((4, 24)) * 3 for which in ("texture", "pooled")}
    klass = np.searchsorted(["a", "b", "c", "d"], labels)
    # where the attributes show, each photo sits near its attribute's centre; elsewhere photos are scattered
    part = {w: (centres[w][klass] if w == informative else 0) + rng.standard_normal((100, 24)) for w in ("texture", "pooled")}
    pooled = torch.nn.functional.normalize(torch.from_numpy(part["pooled"]).float(), dim=1)
    config = RefineConfig(epochs=20, lr_schedule=[[20, 0.01]], batch_size=16, dropout=0.0)
    make_net = lambda classes: RefineNet(torch.nn.Identity(), torch.nn.Identity(), LookalikeHead(24, classes, 8, 8, 0.1, attribute_members=2))  # noqa: E731
    choice = choose_visual_part(make_net, _Descriptors(part["texture"]), labels.tolist(), config, LookalikeObjective(), 0, 0.5, lambda: pooled)
    assert sorted(choice["held_out"]) == ["a", "b", "c", "d"] and all(f["photos"] == 25 for f in choice["held_out"].values())
    learned = np.mean([f["learned"] for f in choice["held_out"].values()])
    pretrained = np.mean([f["pretrained"] for f in choice["held_out"].values()])
    if informative == "texture":
        assert choice["chosen"] == "learned" and learned > 0.8 and pretrained < 0.5, choice
    else:
        assert choice["chosen"] == "pretrained" and pretrained > 0.9 and learned < 0.6, choice
    assert choice["mean_gap"] == pytest.approx(learned - pretrained)
    # the decision rests on the photos only one of the two finds, tested for chance
    if informative == "pooled":
        assert choice["only_pretrained"] > choice["only_learned"]
    else:
        assert choice["only_pretrained"] < choice["only_learned"]
    assert (choice["p_value"] < 0.01) == (informative == "pooled")


def test_the_sign_test_is_one_sided_at_the_conventional_level():
    # photos only the learned / only the pretrained part found, as on fridgeObjects' nested runs (3 known classes)
    assert sign_test(4, 12) == pytest.approx(0.0384, abs=1e-4) and sign_test(4, 12) < SIGNIFICANCE  # gap -12.9 points: pretrained
    assert sign_test(6, 9) > SIGNIFICANCE  # gap -4.8 points: learned (the margin alone would keep it too)
    # a texture set's 8-point gap resting on 3 photos decides nothing
    assert sign_test(0, 3) > SIGNIFICANCE
    # the learned part finding more is never evidence for the pretrained one
    assert sign_test(12, 4) > 0.9 and sign_test(0, 0) == 1.0


def test_a_gap_the_sign_test_cannot_tell_from_chance_keeps_the_learned_part_and_says_what_to_compare():
    # a gap like those of checks trained on 2 object classes (down to -13 points), resting on 6 + 11 photos only one part found: p = 0.17
    chosen, verdict = decide(-0.13, sign_test(6, 11))
    assert chosen == "learned" and 'compare with refine.visual_part = "pretrained"' in verdict and "chance" in verdict
    assert decide(-0.13, sign_test(4, 12)) == ("pretrained", f": more than {MARGIN:.0%} less, and clearly so")
    # within the margin, or the learned part ahead: nothing to say, however clear
    assert decide(-MARGIN / 2, 0.001) == ("learned", "") and decide(0.05, 1.0) == ("learned", "")


@pytest.mark.parametrize("informative", ["texture", "pooled"])
def test_with_two_attributes_the_check_splits_the_other_one_into_groups_to_train_on(informative):
    rng = np.random.default_rng(1)
    labels = np.repeat(["a", "b"], 30)
    klass = (labels == "b").astype(int)
    centres = {which: rng.standard_normal((2, 24)) * 3 for which in ("texture", "pooled")}
    part = {w: (centres[w][klass] if w == informative else 0) + rng.standard_normal((60, 24)) for w in ("texture", "pooled")}
    pooled = torch.nn.functional.normalize(torch.from_numpy(part["pooled"]).float(), dim=1)
    config = RefineConfig(epochs=20, lr_schedule=[[20, 0.01]], batch_size=16, dropout=0.0)
    heads = []

    def make_net(classes):
        heads.append(classes)
        return RefineNet(torch.nn.Identity(), torch.nn.Identity(), LookalikeHead(24, classes, 8, 8, 0.1, attribute_members=2))

    choice = choose_visual_part(make_net, _Descriptors(part["texture"]), labels.tolist(), config, LookalikeObjective(), 0, 0.5, lambda: pooled)
    # each attribute held out in turn, and the head learned two groups of the other one's photos, not one attribute
    assert sorted(choice["held_out"]) == ["a", "b"] and all(f["photos"] == 30 for f in choice["held_out"].values())
    assert [c for c in heads if len(c) > 1] == [["group 1", "group 2"]] * 2 and "split into 2 groups" in choice["reason"]
    assert choice["chosen"] == ("learned" if informative == "texture" else "pretrained"), choice


def test_the_held_out_check_needs_two_attributes_and_photos_to_split():
    never = lambda: pytest.fail("no check, no features")  # noqa: E731
    choice = choose_visual_part(None, None, ["a", "a", "a", "a"], RefineConfig(), None, 0, 0.5, never)
    assert choice["chosen"] == "learned" and "2 or more attributes" in choice["reason"]
    # 3 photos of the other attribute cannot make 2 groups of 2
    choice = choose_visual_part(None, None, ["a", "a", "a", "b", "b", "b"], RefineConfig(), None, 0, 0.5, never)
    assert choice["chosen"] == "learned" and "the others with 4 or more" in choice["reason"]
