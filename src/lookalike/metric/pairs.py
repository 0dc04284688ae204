"""Image pairs as the learned distance sees them: the per-element squared difference of unit vectors."""

from __future__ import annotations

import numpy as np

from ..data.splits import ComparativeSet


def pair_features(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b)^2 element-wise, for rows of L2-normalised features."""
    d = np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)
    return d * d


def pairs_from_sets(sets: list[ComparativeSet], row_of: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten comparative sets into (first rows, second rows, labels): 1 for the positive, 0 for negatives.

    `row_of` maps a dataset image index to its row in the feature matrix.
    """
    first, second, labels = [], [], []
    for s in sets:
        q = row_of[s.query]
        first.append(q)
        second.append(row_of[s.positive])
        labels.append(1)
        for n in s.negatives:
            first.append(q)
            second.append(row_of[n])
            labels.append(0)
    return np.asarray(first, np.int64), np.asarray(second, np.int64), np.asarray(labels, np.int64)
