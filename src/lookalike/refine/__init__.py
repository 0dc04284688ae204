"""Refinement: fine-tune the backbone on the dataset's attributes before featurize (docs/refine.md)."""

from .stage import refine, resolve_mode

__all__ = ["refine", "resolve_mode"]
