"""Hard-negative mining: find different-attribute pairs the current ranker wrongly calls alike."""

from __future__ import annotations

import numpy as np

from .pairs import pair_features


class HardNegativeMiner:
    """Each round samples random different-attribute pairs; those scoring above -1 (inside the margin) are kept.

    `iterations` refits, at most `max_per_iteration` new negatives each, from up to `sampling_rounds`
    random draws of `pairs_per_round` pairs.
    """

    def __init__(self, iterations: int = 0, max_per_iteration: int = 5000, sampling_rounds: int = 10, pairs_per_round: int = 20000, seed: int = 0):
        self.iterations = iterations
        self.max_per_iteration = max_per_iteration
        self.sampling_rounds = sampling_rounds
        self.pairs_per_round = pairs_per_round
        self.seed = seed

    def fit_ranker(self, ranker, X, y, features: np.ndarray, labels: np.ndarray, X_calibration=None, y_calibration=None, log=print):
        """Fit `ranker`, then alternately mine hard negatives and refit; returns the ranker."""
        rng = np.random.default_rng(self.seed)
        ranker.fit(X, y, X_calibration, y_calibration)
        for it in range(self.iterations):
            hard = self.mine(ranker, features, labels, rng)
            log(f"hard-negative mining iteration {it + 1}/{self.iterations}: {len(hard)} new negatives")
            if len(hard) == 0:
                break
            X = np.vstack([X, hard])
            y = np.concatenate([y, np.zeros(len(hard), dtype=y.dtype)])
            ranker.fit(X, y, X_calibration, y_calibration)
        return ranker

    def mine(self, ranker, features: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(features)
        found, scores = [], []
        for _ in range(self.sampling_rounds):
            a = rng.integers(n, size=self.pairs_per_round)
            b = rng.integers(n, size=self.pairs_per_round)
            keep = labels[a] != labels[b]
            diffs = pair_features(features[a[keep]], features[b[keep]])
            s = ranker.decision_function(diffs)
            hard = s > -1.0
            found.append(diffs[hard])
            scores.append(s[hard])
            if sum(len(f) for f in found) >= self.max_per_iteration:
                break
        if not found:
            return np.zeros((0, features.shape[1]), np.float32)
        diffs, s = np.vstack(found), np.concatenate(scores)
        return diffs[np.argsort(-s)[: self.max_per_iteration]]
