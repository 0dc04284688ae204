"""Embed image files with a backbone: parallel decode overlapped with batched inference (PyTorch or ONNX Runtime), bad files skipped."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from PIL import Image

from ..backbones import Preprocessor
from ..errors import BadImageError, LookalikeError
from ..fileio import sha256_file
from ..images import Skipped, skipped_file
from ..prefetch import prefetch_map
from ..progress import tqdm
from .cache import FeatureCache
from .engines import Engine, OnnxEngine, TorchEngine, cpu_threads, create_engine

if TYPE_CHECKING:
    from ..backbones import Backbone, SavedBackbone


@dataclass
class EmbeddingResult:
    """Raw (un-normalised) pooled embeddings for the files that could be read, in input order."""

    features: np.ndarray
    paths: list[str]
    digests: list[str]
    skipped: list[Skipped] = field(default_factory=list)


def batch_for(batch_size: int, input_size: int) -> int:
    """How many `input_size` images hold about the activation memory of `batch_size` at 224 px (never more images)."""
    return max(1, round(batch_size * (224 / input_size) ** 2)) if input_size > 224 else batch_size


def embed_paths(
    model: "Backbone | SavedBackbone | Engine",
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    cache: FeatureCache | None = None,
    digests: Sequence[str] | None = None,
    progress: bool = True,
    workers: int | None = None,
    engine: str = "auto",
) -> EmbeddingResult:
    """Embed `paths`; files already in `cache` (by content hash) are not decoded again.

    `model` is an engine from `create_engine`, or a backbone to run with the `engine` kind
    ("auto": ONNX Runtime when available, else PyTorch; both give the same vectors).
    """
    paths = [str(p) for p in paths]
    skipped: list[Skipped] = []
    if digests is None:
        digests = []
        readable = []
        for p in paths:
            try:
                digests.append(sha256_file(p))
                readable.append(p)
            except OSError as e:
                skipped.append(skipped_file(p, e))
        paths = readable
    digests = list(digests)
    fingerprint = model.fingerprint
    if cache is not None and cache.fingerprint != fingerprint:
        raise LookalikeError(f"feature cache {cache.path} belongs to model {cache.fingerprint}, not {fingerprint}; open it with engine.fingerprint")
    known = cache.get_many(list(set(digests))) if cache is not None else {}
    todo = [i for i, d in enumerate(digests) if d not in known]
    computed: dict[str, np.ndarray] = {}
    if todo:
        if not isinstance(model, (OnnxEngine, TorchEngine)):
            cache_dir = cache.path.parent if cache is not None else None
            model = create_engine(model, engine, cache_dir=cache_dir)
        pre = Preprocessor(model.config)
        batch_size = batch_for(batch_size, model.config.input_size)
        bar = tqdm(total=len(todo), desc=f"Embedding ({model.config.name}, {model.name})", unit="img", disable=not progress)
        for batch_idx, batch, bad in _decoded_batches(pre, [paths[i] for i in todo], batch_size, workers):
            skipped.extend(bad)
            if batch_idx:
                out = model(batch)
                for j, vec in zip(batch_idx, out):
                    computed[digests[todo[j]]] = vec
            bar.update(len(batch_idx) + len(bad))
        bar.close()
        if cache is not None and computed:
            cache.put_many(computed)
    known.update(computed)
    keep = [i for i, d in enumerate(digests) if d in known]
    dim = model.config.embedding_dim
    features = np.stack([known[digests[i]] for i in keep]).astype(np.float32) if keep else np.zeros((0, dim), np.float32)
    return EmbeddingResult(features, [paths[i] for i in keep], [digests[i] for i in keep], skipped)


def embed_scanned(engine: Engine, paths: list[str], digests: list[str], cache_dir: str | os.PathLike, batch_size: int, progress: bool) -> np.ndarray:
    """Unit-length embeddings of images a dataset scan accepted (their content hashes known), through the feature cache."""
    with FeatureCache(cache_dir, engine.fingerprint, engine.config.embedding_dim) as cache:
        result = embed_paths(engine, paths, batch_size, cache=cache, digests=digests, progress=progress)
    if result.skipped:
        bad = ", ".join(f"{x['path']} ({x['reason']})" for x in result.skipped)
        raise LookalikeError(f"could not embed {len(result.skipped)} image(s) that passed the scan: {bad}; prepare the run again, forced (its images changed after the scan)")
    return l2_normalize(result.features)


def embed_images(engine: Engine, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
    """Unit-length embeddings of images already in memory (uploads, altered copies), a batch at a time."""
    pre = Preprocessor(engine.config)
    parts = [engine(np.stack([pre.array(img) for img in images[s : s + batch_size]])) for s in range(0, len(images), batch_size)]
    return l2_normalize(np.concatenate(parts)) if parts else np.zeros((0, engine.config.embedding_dim), np.float32)


def _decoded_batches(pre: Preprocessor, paths: list[str], batch_size: int, workers: int | None) -> Iterator[tuple[list[int], np.ndarray, list[dict]]]:
    """Yield (indices, stacked batch, skipped) per batch, decoding the next batches while the caller runs the model.

    Threads suffice: Pillow releases the GIL while decoding and resizing.
    """

    def decode(i: int):
        try:
            return i, pre.load(paths[i]), None
        except BadImageError as e:
            return i, None, skipped_file(paths[i], e)

    batches = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    for results in prefetch_map(decode, batches, workers or cpu_threads()):
        ok = [(i, a) for i, a, err in results if err is None]
        batch = np.stack([a for _, a in ok]) if ok else np.zeros((0, 3, pre.size, pre.size), np.float32)
        yield [i for i, _ in ok], batch, [err for _, _, err in results if err is not None]


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (the tutorial's first step before any distance)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
