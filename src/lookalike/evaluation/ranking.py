"""Where does the one positive land among its negatives, and how well does the gallery rank overall."""

from __future__ import annotations

from itertools import zip_longest
from typing import Sequence

import numpy as np

from ..data.splits import ComparativeSet
from ..metric.distances import Distance


def positive_ranks(distance: Distance, features: np.ndarray, row_of: dict[int, int], sets: list[ComparativeSet]) -> np.ndarray:
    """Rank (1 = best) of each set's positive among positive + negatives; ties count against it."""
    return np.asarray([1 + len(above) for above in negatives_above(distance, features, row_of, sets)], dtype=np.int64)


def negatives_above(distance: Distance, features: np.ndarray, row_of: dict[int, int], sets: list[ComparativeSet]) -> list[list[int]]:
    """Per set, its negatives at least as close to the query as the positive (empty when the positive comes first)."""
    above = []
    for s in sets:
        refs = features[[row_of[s.positive]] + [row_of[n] for n in s.negatives]]
        d = distance(features[row_of[s.query]], refs)
        above.append([n for n, dn in zip(s.negatives, d[1:]) if dn <= d[0]])
    return above


def rank_summary(ranks: np.ndarray) -> dict[str, float]:
    """The tutorial's table row: top-1 and top-5 accuracy (fractions), mean and median rank."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_rank": float("nan"), "median_rank": float("nan")}
    return {
        "top1": float(np.mean(ranks <= 1)),
        "top5": float(np.mean(ranks <= 5)),
        "mean_rank": float(np.mean(ranks)),
        "median_rank": float(np.median(ranks)),
    }


def gallery_metrics(distance: Distance, features: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Each image queries all the others: recall@k (a same-attribute image in the top k) and mean average precision."""
    labels = np.asarray(labels)
    D = distance.matrix(features, features).astype(np.float64)
    np.fill_diagonal(D, np.inf)
    hits = {k: [] for k in ks}
    aps = []
    for i in range(len(features)):
        relevant = labels == labels[i]
        relevant[i] = False
        if not relevant.any():
            continue
        others = np.arange(len(features)) != i
        order = np.argsort(D[i], kind="stable")
        for k in ks:
            hits[k].append(bool(relevant[order[:k]].any()))
        aps.append(average_precision(relevant[others], D[i][others]))
    out = {f"recall_at_{k}": float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    out["map"] = float(np.mean(aps)) if aps else float("nan")
    return out


def average_precision(relevant: np.ndarray, distances: np.ndarray) -> float:
    """Average precision of ranking by ascending distance, equal distances taken as one step (as scikit-learn's
    `average_precision_score` of the negated distances does); a gallery asks for one per photo, and this is
    a hundred times faster than scikit-learn's per-call input checks."""
    order = np.argsort(distances, kind="stable")
    found = np.cumsum(relevant[order])
    ends = np.flatnonzero(np.append(np.diff(distances[order]) != 0, True))
    found_at = found[ends]
    return float(np.sum(np.diff(found_at, prepend=0) * found_at / (ends + 1)) / found_at[-1])


def example_queries(attributes: Sequence[str], ranks: Sequence[int], limit: int, seed: int) -> list[int]:
    """Up to `limit` query indices drawn at random (seeded) to show as examples.

    Attributes take turns, and within one attribute misses (positive not ranked first) and hits take
    turns, so that every attribute and its failures are shown rather than the first queries of one.
    """
    rng = np.random.default_rng(seed)
    turns = []
    for attribute in sorted(set(attributes)):
        drawn = rng.permutation([i for i, a in enumerate(attributes) if a == attribute]).tolist()
        misses, hits = [i for i in drawn if ranks[i] > 1], [i for i in drawn if ranks[i] <= 1]
        turns.append(_alternate(misses, hits))
    return _alternate(*turns)[:limit]


def _alternate(*queues: list[int]) -> list[int]:
    """One item of each queue in turn until all are empty: ([1, 2, 3], [7]) -> [1, 7, 2, 3]."""
    return [item for group in zip_longest(*queues) for item in group if item is not None]
