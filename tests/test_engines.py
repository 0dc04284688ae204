"""Inference engines: ONNX Runtime reproduces PyTorch, bad files are reported, INT8 runs, exports are cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lookalike.backbones import create_backbone
from lookalike.backbones.registry import Backbone
from lookalike.config import load_config
from lookalike.errors import ConfigError, LookalikeError
from lookalike.features import FeatureCache, create_engine, embed_paths
from lookalike.features import engines
from lookalike.features.extract import batch_for, l2_normalize

from conftest import REAL_DATA

pytestmark = pytest.mark.slow
# A smaller input keeps the exports and forward passes quick; every check holds at any size.
SIZE = 128


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(resolution=SIZE)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    """One export per module: the ONNX cache is keyed by fingerprint, so tests may share it."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def photos():
    paths = [p for attribute in ("dotted", "leopard", "striped") for p in sorted((REAL_DATA / attribute).glob("*.jpg"))[:4]]
    assert len(paths) == 12
    return paths


def test_onnx_matches_torch_on_real_photos(backbone, onnx_dir, photos):
    torch_engine = create_engine(backbone, "torch")
    onnx_engine = create_engine(backbone, "onnx", cache_dir=onnx_dir)
    assert onnx_engine.name == "onnx-cpu" and torch_engine.name == "torch-cpu"
    # Same vectors, so both engines share the backbone's fingerprint and feature cache.
    assert onnx_engine.fingerprint == torch_engine.fingerprint == backbone.fingerprint
    a = embed_paths(torch_engine, photos, batch_size=5, progress=False)
    b = embed_paths(onnx_engine, photos, batch_size=5, progress=False)
    assert a.paths == b.paths == [str(p) for p in photos]
    assert a.features.shape == (12, backbone.config.embedding_dim)
    np.testing.assert_allclose(b.features, a.features, atol=1e-4, rtol=0)
    assert np.abs(a.features).max() > 0.5  # real activations, not an all-zero output


def test_auto_uses_onnx_and_reuses_the_export(backbone, onnx_dir, monkeypatch):
    create_engine(backbone, "onnx", cache_dir=onnx_dir)
    path = engines.onnx_path(backbone, onnx_dir)
    stamp = path.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("the cached export should have been reused")

    monkeypatch.setattr(engines, "export_onnx", no_export)
    messages = []
    engine = create_engine(backbone, "auto", cache_dir=onnx_dir, report=messages.append)
    assert engine.name == "onnx-cpu" and path.stat().st_mtime_ns == stamp
    assert messages and "onnx-cpu" in messages[0]
    # another lookalike version exports the same weights again: its head's forward may differ
    monkeypatch.setattr(engines, "__version__", "0.0.0-other")
    assert engines.onnx_path(backbone, onnx_dir) != path


def test_auto_falls_back_to_torch_and_says_why(backbone, tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(engines, "export_onnx", broken_export)
    messages = []
    engine = create_engine(backbone, "auto", cache_dir=tmp_path, report=messages.append)
    assert engine.name == "torch-cpu" and "unsupported operator" in messages[0]
    with pytest.raises(LookalikeError, match="cannot export.*features.engine"):
        create_engine(backbone, "onnx", cache_dir=tmp_path)
    monkeypatch.setattr(engines, "onnx_available", lambda: False)
    assert create_engine(backbone, "auto", cache_dir=tmp_path, report=messages.append).name == "torch-cpu"
    with pytest.raises(LookalikeError, match="needs onnxruntime"):
        create_engine(backbone, "onnx", cache_dir=tmp_path)


class NoisyBackbone(Backbone):
    """A forward pass no export can reproduce (fresh noise each call)."""

    def forward(self, x):
        return super().forward(x) + torch.rand(1)


def test_export_that_does_not_match_torch_is_refused(backbone, tmp_path):
    noisy = NoisyBackbone(backbone.trunk, backbone.config, "noisy-test")
    messages = []
    assert create_engine(noisy, "auto", cache_dir=tmp_path, report=messages.append).name == "torch-cpu"
    assert "differs from PyTorch" in messages[0]
    assert not any(tmp_path.rglob("*.onnx"))


def test_bad_files_are_skipped_and_reported(backbone, onnx_dir, photos, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "cut.jpg").write_bytes(photos[0].read_bytes()[:300])
    bad = [tmp_path / "empty.jpg", tmp_path / "notes.jpg", tmp_path / "cut.jpg"]
    mixed = [photos[0], bad[0], photos[1], bad[1], bad[2], photos[2]]
    engine = create_engine(backbone, "onnx", cache_dir=onnx_dir)
    result = embed_paths(engine, mixed, batch_size=2, progress=False)
    assert result.paths == [str(p) for p in photos[:3]] and len(result.features) == 3
    reasons = {s["path"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {str(p) for p in bad}
    assert "empty" in reasons[str(bad[0])] and "not a recognised image" in reasons[str(bad[1])]
    assert "truncated" in reasons[str(bad[2])]


def test_quantized_engine_is_close_and_has_its_own_fingerprint(backbone, onnx_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "CALIBRATION_IMAGES", 6)
    engine = create_engine(backbone, "auto", quantize=True, cache_dir=onnx_dir, calibration_paths=photos)
    assert engine.name == "onnx-int8-cpu"
    assert engine.fingerprint.startswith(backbone.fingerprint + "-int8-")
    float_vectors = l2_normalize(embed_paths(create_engine(backbone, "onnx", cache_dir=onnx_dir), photos, progress=False).features)
    with FeatureCache(tmp_path, engine.fingerprint, backbone.config.embedding_dim) as cache:
        int8_vectors = l2_normalize(embed_paths(engine, photos, cache=cache, progress=False).features)
    cosine = np.sum(float_vectors * int8_vectors, axis=1)
    assert cosine.min() > 0.9, cosine
    # A second engine finds the calibrated model on disk: no images needed, same fingerprint.
    assert create_engine(backbone, "onnx", quantize=True, cache_dir=onnx_dir).fingerprint == engine.fingerprint
    with pytest.raises(LookalikeError, match="needs the ONNX engine"):
        create_engine(backbone, "torch", quantize=True, cache_dir=onnx_dir)


def test_cache_of_another_model_is_refused(backbone, onnx_dir, photos, tmp_path):
    engine = create_engine(backbone, "onnx", cache_dir=onnx_dir)
    with FeatureCache(tmp_path, "some-other-model", backbone.config.embedding_dim) as cache:
        with pytest.raises(LookalikeError, match="belongs to model some-other-model"):
            embed_paths(engine, photos[:1], cache=cache, progress=False)


class BatchOfTheTrace(torch.nn.Module):
    """A head whose reshape takes the batch size from `len()`: tracing turns it into the export's constant."""

    def forward(self, x):
        return x.view(len(x), 2, -1).sum(1)


def test_export_that_only_runs_on_the_traced_batch_is_refused(backbone, tmp_path):
    frozen = Backbone(backbone.trunk, backbone.config, "frozen-batch-test", BatchOfTheTrace())
    messages = []
    assert create_engine(frozen, "auto", cache_dir=tmp_path, report=messages.append).name == "torch-cpu"
    assert "ONNX export failed" in messages[0]
    assert not any(tmp_path.rglob("*.onnx"))


def test_export_includes_the_learned_head_and_keeps_module_modes(backbone, tmp_path):
    """A stand-in for refinement's learned head (Linear + BatchNorm on the pooled features)."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(backbone.config.embedding_dim, 32), torch.nn.BatchNorm1d(32))
    with torch.no_grad():
        head[1].running_mean.uniform_(-1, 1)
        head[1].running_var.uniform_(0.5, 2)
    refined = Backbone(backbone.trunk, backbone.config, "refined-test", head)
    refined.train()
    modes = [m.training for m in refined.modules()]
    engine = create_engine(refined, "onnx", cache_dir=tmp_path)
    assert [m.training for m in refined.modules()] == modes
    x = np.random.default_rng(0).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    out = engine(x)
    assert out.shape == (3, 32)
    np.testing.assert_allclose(out, create_engine(refined, "torch")(x), atol=1e-4, rtol=0)
    assert [m.training for m in refined.modules()] == modes


def test_engine_settings_are_validated(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[features]\nengine = "tensorrt"\n')
    with pytest.raises(ConfigError, match="features.engine"):
        load_config(p)
    assert load_config(overrides={"features.engine": "onnx", "features.quantize": True}).features.quantize is True


def test_batches_shrink_with_the_square_of_the_resolution():
    assert [batch_for(32, s) for s in (64, 224, 320, 448, 1000)] == [32, 32, 16, 8, 2]
    assert batch_for(1, 1000) == 1
