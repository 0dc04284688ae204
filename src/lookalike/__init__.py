"""lookalike: train, evaluate and serve image similarity rankers on your own photos.

    from lookalike import SimilarityModel, ImageIndex, evaluate
    model = SimilarityModel().fit("data/")
    index = ImageIndex.build("catalog/", model, "catalog.index")
    index.search("query.jpg", k=15)

The names below load their modules on first use, so `import lookalike` stays quick.
"""

from __future__ import annotations

import importlib

from .errors import BadImageError, ConfigError, LookalikeError

from .version import __version__

_LAZY = {
    "SimilarityModel": "lookalike.model",
    "Comparison": "lookalike.model",
    "ImageIndex": "lookalike.index.api",
    "Match": "lookalike.results",
    "IngestReport": "lookalike.index.ingest",
    "evaluate": "lookalike.api",
    "Evaluation": "lookalike.api",
    "DistanceScores": "lookalike.api",
    "load_config": "lookalike.config",
    "LookalikeConfig": "lookalike.config",
}

__all__ = ["BadImageError", "ConfigError", "LookalikeError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lookalike' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
