"""Embed image files with a backbone: parallel decode overlapped with batched inference, bad files skipped."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..backbones import Backbone, Preprocessor
from ..errors import BadImageError
from ..fileio import sha256_file
from .cache import FeatureCache


@dataclass
class EmbeddingResult:
    """Raw (un-normalised) pooled embeddings for the files that could be read, in input order."""

    features: np.ndarray
    paths: list[str]
    digests: list[str]
    skipped: list[dict] = field(default_factory=list)


def embed_paths(
    backbone: Backbone,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    cache: FeatureCache | None = None,
    digests: Sequence[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> EmbeddingResult:
    """Embed `paths`; files already in `cache` (by content hash) are not decoded again."""
    paths = [str(p) for p in paths]
    skipped: list[dict] = []
    if digests is None:
        digests = []
        readable = []
        for p in paths:
            try:
                digests.append(sha256_file(p))
                readable.append(p)
            except OSError as e:
                skipped.append({"path": p, "reason": f"cannot read file ({e.strerror or e})"})
        paths = readable
    digests = list(digests)
    known = cache.get_many(list(set(digests))) if cache is not None else {}
    todo = [i for i, d in enumerate(digests) if d not in known]
    computed: dict[str, np.ndarray] = {}
    if todo:
        pre = Preprocessor(backbone.config)
        bar = tqdm(total=len(todo), desc=f"Embedding ({backbone.config.name})", unit="img", disable=not progress)
        for batch_idx, arrays, bad in _decoded_batches(pre, [paths[i] for i in todo], batch_size, workers):
            skipped.extend(bad)
            if arrays:
                with torch.inference_mode():
                    out = backbone(torch.from_numpy(np.stack(arrays))).float().numpy()
                for j, vec in zip(batch_idx, out):
                    computed[digests[todo[j]]] = vec
            bar.update(len(batch_idx) + len(bad))
        bar.close()
        if cache is not None and computed:
            cache.put_many(computed)
    known.update(computed)
    keep = [i for i, d in enumerate(digests) if d in known]
    dim = backbone.config.embedding_dim
    features = np.stack([known[digests[i]] for i in keep]).astype(np.float32) if keep else np.zeros((0, dim), np.float32)
    return EmbeddingResult(features, [paths[i] for i in keep], [digests[i] for i in keep], skipped)


def _decoded_batches(pre: Preprocessor, paths: list[str], batch_size: int, workers: int | None) -> Iterator[tuple[list[int], list[np.ndarray], list[dict]]]:
    """Yield (indices, arrays, skipped) per batch, decoding the next batch while the caller runs the model."""

    def decode(i: int):
        try:
            return i, pre.load(paths[i]), None
        except BadImageError as e:
            return i, None, {"path": paths[i], "reason": e.reason}

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        batches = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
        pending = [pool.map(decode, b) for b in batches[:2]]
        for n in range(len(batches)):
            results = list(pending.pop(0))
            if n + 2 < len(batches):
                pending.append(pool.map(decode, batches[n + 2]))
            ok = [(i, a) for i, a, err in results if err is None]
            yield [i for i, _ in ok], [a for _, a in ok], [err for _, _, err in results if err is not None]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (the tutorial's first step before any distance)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
