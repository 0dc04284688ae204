"""The installed package's version (from its metadata, so pyproject.toml is the one place it is written)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lookalike")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
