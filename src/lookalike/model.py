"""A trained similarity model loaded from a run: backbone (refined if present) + learned weighted-L2 ranker."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .backbones import Backbone, Preprocessor
from .features import FeatureCache, default_cache_dir, embed_paths
from .features.extract import l2_normalize
from .metric import WeightedL2Ranker
from .rundir import RunDir


class SimilarityModel:
    """Embeds images and says how alike they are: a learned distance and a calibrated probability."""

    def __init__(self, backbone: Backbone, ranker: WeightedL2Ranker, cache_dir: str | os.PathLike | None = None):
        self.backbone = backbone
        self.ranker = ranker
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._pre = Preprocessor(backbone.config)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, split: int = 0) -> "SimilarityModel":
        from .pipeline import load_run_config, split_backbone

        run = RunDir(run_dir)
        cfg = load_run_config(run)
        ranker = WeightedL2Ranker.load(run.require(run.split_dir(split) / "metric.json", "train-metric"))
        backbone = split_backbone(run, cfg, split)
        cache = Path(cfg.features.cache_dir).expanduser() if cfg.features.cache_dir else None
        return cls(backbone, ranker, cache)

    @property
    def backbone_fingerprint(self) -> str:
        return self.backbone.fingerprint

    @property
    def embedding_dim(self) -> int:
        return self.backbone.config.embedding_dim

    def embed_paths(self, paths: Sequence[str | os.PathLike], progress: bool = True, batch_size: int = 32) -> tuple[np.ndarray, list[str], list[dict]]:
        """Unit-length embeddings of the readable files, their paths, and the skipped files with reasons."""
        with FeatureCache(self.cache_dir, self.backbone.fingerprint, self.embedding_dim) as cache:
            result = embed_paths(self.backbone, paths, batch_size, cache=cache, progress=progress)
        return l2_normalize(result.features), result.paths, result.skipped

    def embed_image(self, img: Image.Image) -> np.ndarray:
        """Unit-length embedding of an image already in memory (e.g. an upload)."""
        with torch.inference_mode():
            out = self.backbone(self._pre.tensor(img)[None]).float().numpy()
        return l2_normalize(out)[0]

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.ranker.distance(a, np.atleast_2d(b))

    def probability(self, distances) -> np.ndarray:
        return self.ranker.probability(distances)
