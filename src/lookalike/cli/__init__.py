"""The `lookalike` command line: a thin layer over the library; nothing outside this package imports it."""

from .main import app, main

__all__ = ["app", "main"]
