"""The distance an index ranks by, and its exact rewrite as plain L2 so FAISS can search it.

Three distances: Euclidean ("l2"), cosine ("cosine", 1 - cos) and the run's learned weighted L2
("learned"). The learned one is d(q, x) = -sum_k w_k (q_k - x_k)^2 with SVM weights w. A ranker trained
now has w <= 0, a plain weighted L2; one trained before may have a few w > 0, which no index can search
directly. Either way it can be rewritten exactly. With v = -w (the weights of the distance itself), P = {k: v_k > 0}, N = {k: v_k < 0}:

    data  x -> z(x) = [ sqrt|v| * x ,  sqrt(M - 2 sum_N |v_k| x_k^2) ]
    query q -> r(q) = [ sign * sqrt|v| * q ,  0 ]          (sign = -1 on N, +1 elsewhere)

    |r(q) - z(x)|^2 = d(q, x) + 2 sum_N |v_k| q_k^2 + M

The right-hand side differs from d(q, x) only by a term that is constant for a given query, so
ascending L2 between r(q) and z(x) is ascending learned distance, for any signs of w. This is the
maximum-inner-product reduction (store [x, sum w x^2], query with [-2 w*q, 1]) followed by the
usual MIPS-to-L2 step, with the weights split evenly between data and query so that, when most
weights point the same way, z(x) is simply x in the learned metric's own coordinates and
approximate indexes (PCA, HNSW, IVF-PQ) see well-shaped data. M = 2 max_N |v_k| R^2 keeps the
square root real for every vector of norm <= R (R = 1 for the L2-normalised embeddings).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..errors import LookalikeError
from ..metric.distances import L2, Cosine
from ..metric.ranker import platt_probability, weighted_l2_distance

METRICS = ("learned", "l2", "cosine")


class IndexMetric:
    """A distance between embeddings, with its L2 search-space transform and optional calibration."""

    def __init__(
        self,
        kind: str = "learned",
        weights=None,
        bias: float = 0.0,
        platt_a: float | None = None,
        platt_b: float | None = None,
        norm_bound: float = 1.0,
    ):
        if kind not in METRICS:
            raise LookalikeError(f"unknown distance '{kind}'; choose one of: {', '.join(METRICS)}", param="distance")
        if kind == "learned" and weights is None:
            raise LookalikeError("the learned distance needs the SVM weights of a trained run")
        self.kind = kind
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
        self.bias = float(bias)
        self.platt_a = platt_a
        self.platt_b = platt_b
        self.norm_bound = float(norm_bound)
        if self.kind == "learned":
            v = -self.weights
            self._scale = np.sqrt(np.abs(v))
            self._sign = np.where(v < 0, -1.0, 1.0)
            self._negative = np.where(v < 0, -v, 0.0)
            self._headroom = 2.0 * float(self._negative.max(initial=0.0)) * self.norm_bound**2

    @classmethod
    def from_ranker(cls, ranker, kind: str = "learned") -> "IndexMetric":
        """The learned distance (or a plain one, still calibrated if kind is learned) of a fitted WeightedL2Ranker."""
        if kind != "learned":
            return cls(kind)
        return cls(kind, ranker.weights_, ranker.bias_, getattr(ranker, "platt_a_", None), getattr(ranker, "platt_b_", None))

    @property
    def search_dim_extra(self) -> int:
        """How many coordinates the search space adds to the embedding (1 for the learned distance)."""
        return 1 if self.kind == "learned" else 0

    @property
    def calibrated(self) -> bool:
        return self.kind == "learned" and self.platt_a is not None and self.platt_b is not None

    def distance(self, q, X) -> np.ndarray:
        """Exact distance from query q (d,) to each row of X (n, d), in float64; lower means more alike."""
        q = np.asarray(q, dtype=np.float64)
        X = np.asarray(X, dtype=np.float64)
        if self.kind == "learned":
            return weighted_l2_distance(q, X, self.weights)
        return (L2() if self.kind == "l2" else Cosine())(q, X)

    def probability(self, distances) -> np.ndarray | None:
        """Calibrated P(same attribute) for learned distances; None for uncalibrated distances."""
        if not self.calibrated:
            return None
        return platt_probability(self.bias - np.asarray(distances, dtype=np.float64), self.platt_a, self.platt_b)

    def data_space(self, X) -> np.ndarray:
        """Rows mapped into the L2 search space (float32, C-contiguous, as FAISS wants them)."""
        X = np.asarray(X, dtype=np.float64)
        if self.kind == "l2":
            return np.ascontiguousarray(X, dtype=np.float32)
        if self.kind == "cosine":
            return np.ascontiguousarray(X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12), dtype=np.float32)
        slack = self._headroom - 2.0 * (X * X) @ self._negative
        if slack.min(initial=0.0) < -1e-6 * max(self._headroom, 1.0):
            worst = float(np.linalg.norm(X, axis=1).max())
            raise LookalikeError(
                f"a vector of norm {worst:.3f} is longer than this index allows ({self.norm_bound:.3f}); "
                "embeddings must be L2-normalised, or rebuild the index with the longer vectors included"
            )
        out = np.empty((X.shape[0], X.shape[1] + 1), dtype=np.float32)
        out[:, :-1] = X * self._scale
        out[:, -1] = np.sqrt(np.maximum(slack, 0.0))
        return out

    def query_space(self, Q) -> np.ndarray:
        """Queries (n, d) mapped so that L2 to `data_space` rows ranks exactly by this distance."""
        Q = np.atleast_2d(np.asarray(Q, dtype=np.float64))
        if self.kind != "learned":
            return self.data_space(Q)
        out = np.zeros((Q.shape[0], Q.shape[1] + 1), dtype=np.float32)
        out[:, :-1] = Q * (self._sign * self._scale)
        return out

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "weights": None if self.weights is None else self.weights.tolist(),
            "bias": self.bias,
            "platt_a": self.platt_a,
            "platt_b": self.platt_b,
            "norm_bound": self.norm_bound,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "IndexMetric":
        return cls(d["kind"], d.get("weights"), d.get("bias", 0.0), d.get("platt_a"), d.get("platt_b"), d.get("norm_bound", 1.0))

    def fingerprint(self) -> str:
        """Identifies the distance (kind and learned parameters), so an index never mixes two of them."""
        payload = json.dumps({"kind": self.kind, "weights": None if self.weights is None else self.weights.round(10).tolist(), "bias": round(self.bias, 10)})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> str:
        if self.kind == "learned":
            n_neg = int((self.weights < 0).sum())
            return f"learned weighted L2 ({self.weights.size} weights, {n_neg} negative)"
        return {"l2": "Euclidean (L2)", "cosine": "cosine (1 - cos)"}[self.kind]
