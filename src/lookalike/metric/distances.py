"""Distances between unit embeddings, as small objects sharing one interface (lower = more alike)."""

from __future__ import annotations

import numpy as np

from .ranker import WeightedL2Ranker

#: How reports, tables and plots name each distance.
LABELS = {"random": "random", "l1": "L1", "l2": "L2", "cosine": "cosine", "weighted_l2": "weighted L2 (learned)"}


class Distance:
    name = "distance"

    def __call__(self, q: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Distances from one query (d,) to each row of X (n, d)."""
        raise NotImplementedError

    def matrix(self, Q: np.ndarray, X: np.ndarray) -> np.ndarray:
        """All distances between rows of Q and rows of X, (m, n)."""
        return np.stack([self(q, X) for q in Q]) if len(Q) else np.zeros((0, len(X)))


class L1(Distance):
    name = "l1"

    def __call__(self, q, X):
        return np.abs(np.asarray(X, np.float64) - q).sum(axis=1)


class L2(Distance):
    name = "l2"

    def __call__(self, q, X):
        return np.linalg.norm(np.asarray(X, np.float64) - q, axis=1)

    def matrix(self, Q, X):
        sq = (Q**2).sum(1)[:, None] + (X**2).sum(1)[None, :] - 2 * Q @ X.T
        return np.sqrt(np.maximum(sq, 0))


class Cosine(Distance):
    """1 - cosine similarity (not a metric, but a common ranking)."""

    name = "cosine"

    def __call__(self, q, X):
        X = np.asarray(X, np.float64)
        return 1 - (X @ q) / np.maximum(np.linalg.norm(X, axis=1) * np.linalg.norm(q), 1e-12)

    def matrix(self, Q, X):
        Qn = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-12)
        Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return 1 - Qn @ Xn.T


class RandomDistance(Distance):
    """Chance level: a random number per pair."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def __call__(self, q, X):
        return self.rng.random(len(X))


class LearnedWeightedL2(Distance):
    """-w . (q - x)^2 from a fitted WeightedL2Ranker."""

    name = "weighted_l2"

    def __init__(self, ranker: WeightedL2Ranker):
        self.ranker = ranker

    def __call__(self, q, X):
        return self.ranker.distance(q, X)

    def matrix(self, Q, X):
        w = self.ranker.weights_
        sq = ((Q**2) @ w)[:, None] + ((X**2) @ w)[None, :] - 2 * (Q * w) @ X.T
        return -sq


def standard_distances(ranker: WeightedL2Ranker | None, seed: int = 0) -> list[Distance]:
    """The tutorial's comparison: random, L1, L2, cosine, and the learned weighted L2 when available."""
    out: list[Distance] = [RandomDistance(seed), L1(), L2(), Cosine()]
    if ranker is not None:
        out.append(LearnedWeightedL2(ranker))
    return out
