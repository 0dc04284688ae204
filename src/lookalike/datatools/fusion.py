"""Combine rankers trained on different attribute families (texture, sleeve length, neck style...).

Each ranker's raw SVM scores live on their own scale: one ranker's 1.9 may mean "fairly likely"
while another's 0.7 means "almost certain". Averaging raw scores lets one loud ranker outvote the
others. Each ranker's Platt calibration maps its scores to probabilities of "same attribute",
which share one scale, so the (optionally weighted) average is taken in probability space.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import LookalikeError
from ..fileio import write_text

SCORE_COLUMNS = ("query", "reference", "probability")


def fuse_probabilities(
    probabilities: Sequence[Sequence[float] | np.ndarray | float] | np.ndarray | Mapping[str, Sequence[float] | np.ndarray | float],
    weights: Sequence[float] | np.ndarray | Mapping[str, float] | None = None,
) -> np.ndarray:
    """Weighted mean of calibrated probabilities over rankers.

    `probabilities` holds one entry per ranker — a sequence (first axis = rankers) or a mapping
    from ranker name to its values — each of the same shape (e.g. one value per reference image).
    `weights` (one per ranker, non-negative, not all zero; a mapping when `probabilities` is one)
    default to equal weights. Returns an array of that shape, each value in [0, 1].
    Values outside [0, 1] are refused: they are raw scores, which must be calibrated first.
    """
    if isinstance(probabilities, Mapping):
        names = [str(k) for k in probabilities]
        arrays = [np.asarray(v, dtype=np.float64) for v in probabilities.values()]
        if isinstance(weights, Mapping):
            unknown = sorted(set(map(str, weights)) - set(names))
            missing = [n for n in names if n not in weights]
            if unknown or missing:
                raise LookalikeError(f"weights must name exactly the rankers {names}" + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
            weights = [weights[n] for n in names]
    else:
        if isinstance(weights, Mapping):
            raise LookalikeError("weights can be a mapping only when the probabilities are a mapping of ranker name to values")
        try:
            arrays = [np.asarray(v, dtype=np.float64) for v in probabilities]
        except (TypeError, ValueError) as e:
            raise LookalikeError(f"probabilities must be numbers, one array per ranker ({e})") from None
        names = [f"ranker {i + 1}" for i in range(len(arrays))]
    if not arrays:
        raise LookalikeError("no rankers to combine: give the probabilities of at least one ranker")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        detail = ", ".join(f"{n}: {a.shape}" for n, a in zip(names, arrays))
        raise LookalikeError(f"every ranker must score the same pairs, but the shapes differ ({detail})")
    for name, a in zip(names, arrays):
        if not np.all(np.isfinite(a)):
            raise LookalikeError(f"{name} has missing or non-finite probabilities (NaN or inf)")
        bad = (a < 0) | (a > 1)
        if np.any(bad):
            value = a[bad].flat[0]
            raise LookalikeError(
                f"{name} has a value {value:g} outside [0, 1]. Combine calibrated probabilities (the Platt-scaled "
                "output of each ranker), never raw scores: raw scores of different rankers are on different scales"
            )
    stacked = np.stack(arrays)
    w = _check_weights(weights, len(arrays))
    fused = np.tensordot(w / w.sum(), stacked, axes=1)
    return np.clip(fused, 0.0, 1.0)


def _check_weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    try:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise LookalikeError(f"weights must be numbers, one per ranker ({n})") from None
    if w.shape != (n,):
        raise LookalikeError(f"got {w.size} weight(s) for {n} ranker(s); give one weight per ranker")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise LookalikeError(f"weights must be finite and non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise LookalikeError("at least one weight must be above zero")
    return w


# --------------------------------------------------------------------------- score files


def read_score_file(path: str | os.PathLike) -> dict[tuple[str, str], float]:
    """A ranker's CSV with columns query, reference, probability (others ignored) -> {(query, reference): p}."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = {(c or "").strip().lower(): c for c in reader.fieldnames or []}
            missing = [c for c in SCORE_COLUMNS if c not in columns]
            if missing:
                raise LookalikeError(f"{path} lacks the column(s) {', '.join(missing)}; a score file is a CSV with the header query,reference,probability")
            scores: dict[tuple[str, str], float] = {}
            for line, row in enumerate(reader, start=2):
                key = (row[columns["query"]].strip(), row[columns["reference"]].strip())
                raw = (row[columns["probability"]] or "").strip()
                try:
                    p = float(raw)
                except ValueError:
                    raise LookalikeError(f"{path}, line {line}: probability {raw!r} is not a number") from None
                if not math.isfinite(p) or not 0.0 <= p <= 1.0:
                    raise LookalikeError(
                        f"{path}, line {line}: probability {raw} is outside [0, 1]; score files must hold calibrated "
                        "probabilities, not raw scores (raw scores of different rankers are on different scales)"
                    )
                if key in scores:
                    raise LookalikeError(f"{path}, line {line}: the pair query={key[0]!r}, reference={key[1]!r} appears twice")
                scores[key] = p
    except FileNotFoundError:
        raise LookalikeError(f"score file {path} does not exist") from None
    except UnicodeDecodeError:
        raise LookalikeError(f"score file {path} is not UTF-8 text") from None
    if not scores:
        raise LookalikeError(f"score file {path} has no rows")
    return scores


@dataclass(frozen=True)
class FusedPair:
    query: str
    reference: str
    rank: int  # 1 = most similar reference for this query
    probability: float
    per_ranker: tuple[float, ...]


def combine_score_files(paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None) -> tuple[list[str], list[FusedPair]]:
    """Fuse several rankers' score files; returns (ranker names, pairs).

    Every file must score the same (query, reference) pairs. Pairs are grouped by query (in the
    order queries first appear) and sorted by fused probability, highest first, within each query.
    """
    if not paths:
        raise LookalikeError("give at least one score file")
    names = ranker_names(paths)
    tables = [read_score_file(p) for p in paths]
    keys = list(tables[0])
    reference_set = set(keys)
    for name, table, path in zip(names, tables, paths):
        if set(table) != reference_set:
            only_first = sorted(reference_set - set(table))[:3]
            only_here = sorted(set(table) - reference_set)[:3]
            raise LookalikeError(
                f"{path} does not score the same pairs as {paths[0]}: every ranker must score every (query, reference) pair"
                + (f"; missing e.g. {only_first}" if only_first else "")
                + (f"; extra e.g. {only_here}" if only_here else "")
            )
    matrix = np.array([[t[k] for k in keys] for t in tables])
    fused = fuse_probabilities(matrix, weights)
    query_order = {q: i for i, q in enumerate(dict.fromkeys(k[0] for k in keys))}
    order = sorted(range(len(keys)), key=lambda i: (query_order[keys[i][0]], -fused[i], keys[i][1]))
    pairs, rank, previous = [], 0, None
    for i in order:
        q, r = keys[i]
        rank = rank + 1 if q == previous else 1
        previous = q
        pairs.append(FusedPair(q, r, rank, float(fused[i]), tuple(float(x) for x in matrix[:, i])))
    return names, pairs


def ranker_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """File stems, made unique with a numeric suffix."""
    names: list[str] = []
    for p in paths:
        base = Path(p).stem or "ranker"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def format_fused(names: Sequence[str], pairs: Sequence[FusedPair]) -> str:
    """CSV text: query, reference, rank, probability (fused), then one probability column per ranker."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query", "reference", "rank", "probability", *[f"probability_{n}" for n in names]])
    for p in pairs:
        writer.writerow([p.query, p.reference, p.rank, f"{p.probability:.6f}", *[f"{x:.6f}" for x in p.per_ranker]])
    return buf.getvalue()


def write_fused(path: str | os.PathLike, names: Sequence[str], pairs: Sequence[FusedPair]) -> None:
    """Write format_fused's CSV atomically."""
    write_text(path, format_fused(names, pairs))
