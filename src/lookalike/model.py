"""Embedding images with a backbone, and the trained similarity model of a run: backbone (refined if present) + learned weighted-L2 ranker."""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .backbones import Backbone
from .features import Engine, FeatureCache, configured_cache_dir, create_engine, default_cache_dir, embed_paths
from .features.extract import EmbeddingResult, embed_images, l2_normalize
from .metric import WeightedL2Ranker
from .rundir import RunDir


class ImageEmbedder:
    """Images -> unit-length embeddings with one backbone: its engine (ONNX / INT8 / PyTorch) and its feature cache."""

    def __init__(self, backbone: Backbone, cache_dir: str | os.PathLike | None = None, engine: str = "auto", quantize: bool = False):
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.engine_kind = engine
        self.quantize = quantize
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    def engine(self, calibration_paths: Sequence[str | os.PathLike] = ()) -> Engine:
        """The inference engine, built on first use (ONNX export and INT8 calibration are cached on disk)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = create_engine(self.backbone, self.engine_kind, self.quantize, self.cache_dir, calibration_paths)
            return self._engine

    @property
    def backbone_fingerprint(self) -> str:
        """Names the vectors this model makes: the backbone's, plus an INT8 suffix when quantised."""
        return self.engine().fingerprint if self.quantize else self.backbone.fingerprint

    @property
    def embedding_dim(self) -> int:
        return self.backbone.config.embedding_dim

    def embed(self, paths: Sequence[str | os.PathLike], progress: bool = True, batch_size: int = 32) -> EmbeddingResult:
        """Unit-length embeddings of the readable files, with their paths, content hashes and the skipped files."""
        engine = self.engine(calibration_paths=paths)
        with FeatureCache(self.cache_dir, engine.fingerprint, self.embedding_dim) as cache:
            result = embed_paths(engine, paths, batch_size, cache=cache, progress=progress)
        return replace(result, features=l2_normalize(result.features))

    def embed_paths(self, paths: Sequence[str | os.PathLike], progress: bool = True, batch_size: int = 32) -> tuple[np.ndarray, list[str], list[dict]]:
        """Unit-length embeddings of the readable files, their paths, and the skipped files with reasons."""
        result = self.embed(paths, progress, batch_size)
        return result.features, result.paths, result.skipped

    def embed_image(self, img: Image.Image) -> np.ndarray:
        """Unit-length embedding of an image already in memory (e.g. an upload)."""
        return self.embed_images([img])[0]

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Unit-length embeddings of images already in memory, a batch at a time."""
        return embed_images(self.engine(), images, batch_size)


class SimilarityModel(ImageEmbedder):
    """Embeds images and says how alike they are: a learned distance and a calibrated probability."""

    def __init__(
        self,
        backbone: Backbone,
        ranker: WeightedL2Ranker,
        cache_dir: str | os.PathLike | None = None,
        engine: str = "auto",
        quantize: bool = False,
    ):
        super().__init__(backbone, cache_dir, engine, quantize)
        self.ranker = ranker

    @classmethod
    def load(cls, run_dir: str | os.PathLike, split: int = 0) -> "SimilarityModel":
        from .pipeline import load_run_config, split_backbone

        run = RunDir(run_dir)
        cfg = load_run_config(run)
        ranker = WeightedL2Ranker.load(run.require(run.split_dir(split) / "metric.json", "train-metric"))
        backbone = split_backbone(run, cfg, split)
        return cls(backbone, ranker, configured_cache_dir(cfg.features.cache_dir), cfg.features.engine, cfg.features.quantize)

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.ranker.distance(a, np.atleast_2d(b))

    def probability(self, distances) -> np.ndarray:
        return self.ranker.probability(distances)
