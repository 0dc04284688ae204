"""One front door for image encoders: `create_backbone(name)`; each comes with its own config.

The PyTorch parts (`Backbone`, `create_backbone`, `load_backbone`, `list_backbones`) are imported on first
use, so what a warm command needs (`BackboneConfig`, `SavedBackbone`, `Preprocessor`) loads no torch.
"""

from importlib import import_module

from .config import BackboneConfig, SavedBackbone
from .preprocess import Preprocessor

_TORCH_PARTS = {"Backbone", "create_backbone", "list_backbones", "load_backbone"}

__all__ = ["Backbone", "BackboneConfig", "SavedBackbone", "create_backbone", "list_backbones", "load_backbone", "Preprocessor"]


def __getattr__(name: str):
    if name in _TORCH_PARTS:
        return getattr(import_module(".registry", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
