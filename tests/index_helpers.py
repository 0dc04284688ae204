"""Small stand-ins shared by the index tests (also imported by the subprocesses they start)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lookalike.images import open_image


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
