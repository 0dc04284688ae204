"""Lookalike search, measured: does an altered copy find its original, do unseen patterns keep apart, any ties?

The rank test only asks whether photos of one attribute come before photos of another. A search user also
needs the photo itself (a shopper's snapshot of a product) to come first, photos within an attribute to be
ordered by how alike they look, and patterns the model was never taught to stay apart. These three checks
say so; `lookalike run` reports all three (the unseen test for one attribute, `pipeline.unseen_attribute_test`),
`benchmarks/lookalike_search.py` holds every attribute out in turn.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageEnhance

from ..metric.distances import Distance


#: How far the trained model's 1-NN accuracy on the held-out attribute may fall below the pretrained backbone's
#: before a run warns: the test holds a handful of photos of that attribute, so smaller gaps are its noise.
UNSEEN_SHORTFALL = 0.10


def unseen_shortfall_warning(unseen: dict, refined: bool = True) -> str | None:
    """A warning when the trained model keeps the held-out attribute apart clearly worse than the pretrained backbone
    (an `unseen_attribute_test` result), else None: it then serves the trained attributes, not lookalikes at large.
    `refined`: whether the model refined the backbone (the advice differs: drop refinement, or the learned distance)."""
    learned, pretrained = unseen["learned"]["unseen"], unseen["pretrained"]["unseen"]
    if learned >= pretrained - UNSEEN_SHORTFALL:
        return None
    fix = 'compare with refine.epochs = 0 (the pretrained features), or with refine.visual_part = "pretrained" where the run log says the learned visual part was kept,' if refined else "compare with plain L2 (`index build --distance l2`)"
    return (
        f"the trained model keeps {unseen['held_out']}, an attribute it never saw, apart worse than the pretrained backbone "
        f"(1-NN {learned:.1%} against {pretrained:.1%}): it serves the trained attributes, not photos beyond them. "
        f"To search catalogs with other kinds of photos, {fix} or label photos of more attributes"
    )


def altered_copy(img: Image.Image, seed: int) -> Image.Image:
    """What a re-photographed or re-posted copy looks like: cropped to 70-85% of the area at a random place,
    shrunk to 60%, brightened by 10%, saved as JPEG at quality 50. The same seed gives the same copy."""
    rng = random.Random(seed)
    img = img.convert("RGB")
    w, h = img.size
    area, aspect = rng.uniform(0.70, 0.85), rng.uniform(0.8, 1.25)
    cw, ch = min(w, round(w * (area * aspect) ** 0.5)), min(h, round(h * (area / aspect) ** 0.5))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((left, top, left + cw, top + ch))
    img = img.resize((max(1, round(cw * 0.6)), max(1, round(ch * 0.6))), Image.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(1.1)
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=50)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def copy_ranks(distance: Distance, catalog: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Rank (1 = found first) of catalog row i for copies[i]; another photo at the same distance counts against it."""
    D = distance.matrix(np.asarray(copies, np.float64), np.asarray(catalog, np.float64))
    own = D[np.arange(len(copies)), np.arange(len(copies))]
    return (D <= own[:, None]).sum(1)  # the original itself is counted once


def copy_summary(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks)
    return {"found_first": float(np.mean(ranks == 1)), "top5": float(np.mean(ranks <= 5)), "mean_rank": float(np.mean(ranks)), "n": int(ranks.size)}


def nearest_neighbour_accuracy(distance: Distance, vectors: np.ndarray, labels, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """Leave-one-out 1-NN label accuracy over `vectors`, averaged within each group (a boolean mask over the rows)."""
    labels = np.asarray(labels)
    D = distance.matrix(np.asarray(vectors, np.float64), np.asarray(vectors, np.float64))
    np.fill_diagonal(D, np.inf)
    predicted = labels[np.argmin(D, axis=1)]
    return {name: float(np.mean(predicted[mask] == labels[mask])) if mask.any() else float("nan") for name, mask in groups.items()}


def tied_fraction(distance: Distance, vectors: np.ndarray, labels, k: int = 15, tolerance: float = 1e-9) -> float:
    """Share of the queries (each row against all others) whose k nearest same-attribute matches hold two distances
    closer than `tolerance` times the range of all distances: an order left to rounding."""
    labels = np.asarray(labels)
    D = distance.matrix(np.asarray(vectors, np.float64), np.asarray(vectors, np.float64))
    off_diagonal = ~np.eye(len(D), dtype=bool)
    if not off_diagonal.any():
        return float("nan")
    resolution = tolerance * float(np.ptp(D[off_diagonal]))
    tied = 0
    for i in range(len(D)):
        same = np.flatnonzero((labels == labels[i]) & off_diagonal[i])
        top = np.sort(D[i, same])[:k]
        tied += bool(len(top) > 1 and np.min(np.diff(top)) <= resolution)
    return tied / len(D)
