"""What is known of a backbone without building it (no torch import): its config, its fingerprint, a saved one's files.

A warm command (one `retrieve`, `serve` starting) finds the exported ONNX model in the cache by the
fingerprint alone, so it never needs PyTorch; `registry.load_backbone` builds the network only for the
first export or the PyTorch engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import LookalikeError
from ..fileio import atomic_path, sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on pixels scaled as (x - 127) / 128.
INCEPTION_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
INCEPTION_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD)}

SAVED_FILES = ("backbone.json", "backbone.safetensors")
#: the input size the registered backbones were trained at, and their pretrained features are taken at
PRETRAINED_INPUT_SIZE = 224


@dataclass(frozen=True)
class BackboneConfig:
    """What a caller needs to feed a backbone and use its output."""

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int
    normalization: str
    taps: tuple[int, ...] = ()  # stages whose channel statistics form the descriptor; () = the last stage, average-pooled
    pooled_size: int = 0  # > 0: the descriptor ends with the trunk's pooled features of the image resized to this size


def describe_config(config: BackboneConfig) -> dict:
    """The config as JSON; `pooled_size` only when set, so configs from before it keep their fingerprints."""
    out = asdict(config)
    if not out["pooled_size"]:
        del out["pooled_size"]
    return out


def backbone_fingerprint(config: BackboneConfig, weights_source: str) -> str:
    """Names a backbone's vectors: its config and its weights (a file's SHA-256, or where they came from)."""
    payload = json.dumps({"config": describe_config(config), "weights": weights_source}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def config_from_saved(meta: dict) -> BackboneConfig:
    """The BackboneConfig a saved `backbone.json` describes."""
    return BackboneConfig(
        meta["name"],
        meta["input_size"],
        tuple(meta["mean"]),
        tuple(meta["std"]),
        meta["embedding_dim"],
        meta["normalization"],
        tuple(meta.get("taps", ())),
        meta.get("pooled_size", 0),
    )


class SavedBackbone:
    """A backbone saved by `save_backbone` (a refined model, a model folder), known by its config and fingerprint.

    Reading it costs a JSON file and a hash of the weights; `registry.load_backbone(saved)` builds the network.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path, weights_path = (self.directory / name for name in SAVED_FILES)
        if not meta_path.is_file() or not weights_path.is_file():
            raise LookalikeError(f"{self.directory} does not hold a saved backbone (expected backbone.json and backbone.safetensors)")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.config = config_from_saved(self.meta)
        except (ValueError, KeyError, TypeError) as e:
            raise LookalikeError(f"{meta_path} is not a backbone description ({type(e).__name__}: {e}); save the model again") from None
        self.fingerprint = backbone_fingerprint(self.config, sha256_file(weights_path))

    @property
    def head_description(self) -> dict | None:
        """The saved head's description (`Head.describe()`), or None for pooled features."""
        return self.meta.get("head")

    def copy_to(self, directory: str | os.PathLike) -> None:
        """Copy the saved files byte for byte, so the copy has the same fingerprint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in SAVED_FILES:
            with atomic_path(directory / name) as tmp:
                shutil.copyfile(self.directory / name, tmp)

    def __repr__(self) -> str:
        return f"SavedBackbone({str(self.directory)!r}, {self.config.name}, {self.fingerprint})"

