"""Whether P(same attribute) means what it says, on pairs of test photos the model never saw.

Platt scaling is fit as if unalike pairs were `negative_ratio` times as many as alike ones (a catalog's share,
not whatever share a test set happens to have), so the observed frequencies here weigh the unalike pairs to
that ratio too: a probability of 0.3 is right when 30% of such pairs share an attribute at that prior.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: Equal-width probability bins of the reliability table.
BINS = 10


def reliability(probabilities, same, negative_ratio: float, bins: int = BINS) -> dict | None:
    """Expected calibration error, Brier score and the per-bin table of `probabilities` against `same`.

    ECE: the weighted gap between the mean probability and the observed frequency in each bin, weighted by the
    bin's share of the pairs. None when the pairs are all alike or all unalike (no frequency to compare with).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    if y.all() or not y.any():
        return None
    weight = np.where(y, 1.0, negative_ratio * y.sum() / (~y).sum())
    which = np.minimum((p * bins).astype(int), bins - 1)
    table = []
    for b in range(bins):
        member = which == b
        if member.any():
            w = weight[member]
            table.append({
                "low": b / bins, "high": (b + 1) / bins, "pairs": int(member.sum()), "share": float(w.sum() / weight.sum()),
                "probability": float(np.average(p[member], weights=w)), "frequency": float(np.average(y[member], weights=w)),
            })
    return {
        "pairs": int(len(p)),
        "alike": int(y.sum()),
        "negative_ratio": float(negative_ratio),
        "ece": float(sum(abs(row["probability"] - row["frequency"]) * row["share"] for row in table)),
        "brier": float(np.average((p - y) ** 2, weights=weight)),
        "bins": table,
    }


def pooled_bins(results: Sequence[dict]) -> list[dict]:
    """The splits' reliability tables as one, each split counting equally (shares averaged, means share-weighted)."""
    by_bin: dict[float, list[dict]] = {}
    for result in results:
        for row in result["bins"]:
            by_bin.setdefault(row["low"], []).append(row)
    pooled = []
    for low, rows in sorted(by_bin.items()):
        share = np.array([r["share"] for r in rows])
        pooled.append({
            "low": low, "high": rows[0]["high"], "pairs": sum(r["pairs"] for r in rows), "share": float(share.sum() / len(results)),
            "probability": float(np.average([r["probability"] for r in rows], weights=share)),
            "frequency": float(np.average([r["frequency"] for r in rows], weights=share)),
        })
    return pooled
