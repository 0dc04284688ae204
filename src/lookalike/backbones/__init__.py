"""One front door for image encoders: `create_backbone(name)`; each comes with its own config."""

from .registry import Backbone, BackboneConfig, create_backbone, list_backbones, load_backbone
from .preprocess import Preprocessor

__all__ = ["Backbone", "BackboneConfig", "create_backbone", "list_backbones", "load_backbone", "Preprocessor"]
