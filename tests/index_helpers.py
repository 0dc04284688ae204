"""Small stand-ins shared by the index tests (also imported by the subprocesses they start)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lookalike.images import open_image
from lookalike.index import IndexMetric, NewImage


class PixelEmbedder:
    """Embeds an image as its 8x8 RGB thumbnail, unit length: real pixels, deterministic, instant."""

    fingerprint = "pixels-8x8"
    dim = 192

    def __init__(self):
        self.calls: list[str] = []

    def embed(self, paths):
        feats, ok, skipped = [], [], []
        for p in paths:
            self.calls.append(str(p))
            try:
                img = open_image(p).resize((8, 8), Image.BILINEAR)
            except Exception as e:  # noqa: BLE001 - mirror the real embedder: unreadable files are skipped
                skipped.append({"path": str(p), "reason": str(e)})
                continue
            v = np.asarray(img, dtype=np.float32).ravel() + 1.0
            feats.append(v / np.linalg.norm(v))
            ok.append(str(p))
        return (np.stack(feats) if feats else np.zeros((0, self.dim), np.float32)), ok, skipped


def clustered_vectors(n: int, dim: int, seed: int = 0, clusters: int = 40, intrinsic: int = 12) -> np.ndarray:
    """Unit vectors with low intrinsic dimension (like real embeddings), so approximate search is meaningful."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((intrinsic, dim))
    centers = rng.standard_normal((clusters, intrinsic)) * 2
    z = centers[rng.integers(0, clusters, n)] + rng.standard_normal((n, intrinsic))
    x = np.abs(z @ basis + 0.05 * rng.standard_normal((n, dim)))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def mixed_weights(dim: int, seed: int = 0) -> np.ndarray:
    """SVM-like weights: mostly negative (alike pairs have small squared differences), some positive, some zero."""
    rng = np.random.default_rng(seed)
    w = -np.abs(rng.normal(0.5, 0.4, dim))
    w[rng.random(dim) < 0.25] *= -0.6
    w[rng.random(dim) < 0.05] = 0.0
    return w


def images(n: int, start: int = 0) -> list[NewImage]:
    """Catalog entries for ids start.. (path /img/<i>.jpg, attributes a, b, c in turn)."""
    return [NewImage(f"/img/{i}.jpg", ("a", "b", "c")[i % 3], f"{i:064x}", 100 + i, 1.5) for i in range(start, start + n)]


def brute_force(metric: IndexMetric, q: np.ndarray, X: np.ndarray, k: int, alive=None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the k nearest rows of X (ties by row) and their distances; rows not `alive` are left out."""
    d = metric.distance(q, X)
    if alive is not None:
        d = np.where(alive, d, np.inf)
    order = np.lexsort((np.arange(len(d)), d))[:k]
    return order, d[order]
