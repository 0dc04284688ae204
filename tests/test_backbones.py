import numpy as np
import pytest
import torch

from conftest import texture
from lookalike.backbones import Preprocessor, create_backbone, list_backbones, load_backbone
from lookalike.backbones.registry import pretrained_fingerprint, save_backbone
from lookalike.errors import LookalikeError


def test_registry_lists_the_documented_backbones():
    assert {"efficientnet-lite0", "resnet18", "resnet34", "resnet50"} <= set(list_backbones())


def test_default_backbone_loads_offline_and_embeds():
    b = create_backbone()
    assert b.config.embedding_dim == 1280 and b.config.input_size == 224
    x = torch.from_numpy(np.stack([Preprocessor(b.config).array(texture("dots", 100, s)) for s in range(2)]))
    with torch.inference_mode():
        out = b(x)
    assert out.shape == (2, 1280) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_resnet_weights_from_torchvision_cache(tmp_path, monkeypatch):
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(LookalikeError) as e:
        create_backbone("resnet18")
    assert "no pretrained weights" in str(e.value) and str(tmp_path) in str(e.value)
    # a state dict where torchvision would cache it is found without any network
    torch.manual_seed(0)
    state = tvm.resnet18().state_dict()
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    b = create_backbone("resnet18", resolution=64)
    assert b.config.embedding_dim == 512 and b.config.normalization == "imagenet"
    assert torch.equal(b.trunk.conv1.weight, state["conv1.weight"])
    with torch.inference_mode():
        assert b(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def test_explicit_weights_file_safetensors_and_mismatch(tmp_path):
    import torchvision.models as tvm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = tvm.resnet34().state_dict()
    p = tmp_path / "r34.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(p))
    b = create_backbone("resnet34", weights=p)
    assert torch.equal(b.trunk.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    with pytest.raises(LookalikeError, match="do not match backbone 'resnet18'"):
        create_backbone("resnet18", weights=p)
    with pytest.raises(LookalikeError, match="does not exist"):
        create_backbone("resnet18", weights=tmp_path / "missing.pth")


def test_fingerprint_tracks_weights_resolution_and_normalisation():
    a = create_backbone()
    assert a.fingerprint == create_backbone().fingerprint
    assert a.fingerprint != create_backbone(resolution=256).fingerprint
    assert a.fingerprint != create_backbone(normalization="imagenet").fingerprint


def test_pretrained_fingerprint_is_create_backbones_without_the_network():
    for kwargs in ({}, {"resolution": 320}, {"normalization": "imagenet", "resolution": 256}):
        assert pretrained_fingerprint(**kwargs) == create_backbone(**kwargs).fingerprint
    with pytest.raises(LookalikeError, match="unknown normalization"):
        pretrained_fingerprint(normalization="sepia")


def test_saved_backbone_reloads_to_identical_outputs(tmp_path):
    b = create_backbone(resolution=96)
    save_backbone(b, tmp_path / "saved")
    b2 = load_backbone(tmp_path / "saved")
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.equal(b(x), b2(x))
    assert b2.config == b.config


def test_preprocessor_shapes_and_normalisation():
    b = create_backbone(resolution=64)
    arr = Preprocessor(b.config).array(texture("stripes", 200, 0).resize((200, 100)))
    assert arr.shape == (3, 64, 64) and arr.dtype == np.float32
    assert -1.01 <= arr.min() and arr.max() <= 1.01  # inception scaling keeps pixels in [-1, 1]


def test_describe_backbones_says_where_weights_are(tmp_path, monkeypatch):
    from lookalike.backbones.registry import describe_backbones

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    found = {b["name"]: b for b in describe_backbones()}
    assert found["efficientnet-lite0"]["weights"].endswith(".pth") and found["efficientnet-lite0"]["embedding_dim"] == 1280
    assert found["resnet18"]["weights"] is None and found["resnet50"]["embedding_dim"] == 2048
