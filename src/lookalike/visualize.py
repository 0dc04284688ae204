"""Every plot and picture lookalike draws lives here (matplotlib for charts, Pillow for image grids)."""

from __future__ import annotations

import io
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont, ImageOps  # noqa: E402

from .errors import BadImageError  # noqa: E402
from .fileio import write_bytes  # noqa: E402
from .images import open_image  # noqa: E402

GREEN, RED, GREY = (40, 160, 60), (210, 40, 40), (150, 150, 150)


def _save_figure(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _save_image(img: Image.Image, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fmt = "PNG" if str(path).lower().endswith(".png") else "JPEG"
    img.save(buf, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    write_bytes(path, buf.getvalue())


#: Line style and marker of each curve, so that curves which run together stay apart (colours alone do not).
CURVE_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1)), "v"), ((0, (3, 1, 1, 1)), "x"))


def plot_calibration(ranker, scores: np.ndarray, labels: np.ndarray, path: str | os.PathLike) -> None:
    """SVM score -> calibrated probability, over histograms of the validation scores by class."""
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    lo, hi = float(np.min(scores)) - 0.5, float(np.max(scores)) + 0.5
    xs = np.linspace(lo, hi, 200)
    ax2 = ax.twinx()
    bins = np.linspace(lo, hi, 40)
    ax2.hist(scores[labels == 0], bins=bins, alpha=0.35, color="tab:red", label="different attribute", density=True)
    ax2.hist(scores[labels == 1], bins=bins, alpha=0.35, color="tab:green", label="same attribute", density=True)
    ax2.set_ylabel("density of validation pairs")
    ax.plot(xs, ranker.probability_from_score(xs), color="black", lw=2, label="Platt scaling")
    ax.set_xlabel("SVM score  (= SVM bias - learned distance)")
    ax.set_ylabel("P(same attribute)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_title(f"Calibration: P = sigmoid({ranker.platt_a_:.2f} * score {ranker.platt_b_:+.2f})")
    (curve, curve_label), (bars, bar_labels) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    # outside the axes (the constrained layout makes room), so the legend covers no bar, line or tick label
    fig.legend(curve + bars, curve_label + bar_labels, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    _save_figure(fig, path)


def plot_reliability(bins: Sequence[dict], path: str | os.PathLike) -> None:
    """Reliability diagram of test pairs: mean probability given against how often such pairs share an attribute."""
    fig, ax = plt.subplots(figsize=(5, 4.2), layout="constrained")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
    x = [b["probability"] for b in bins]
    y = [b["frequency"] for b in bins]
    # marker area ~ the bin's share of the pairs, so a bin of three pairs does not look like one of thousands
    sizes = [20 + 600 * b["share"] for b in bins]
    ax.plot(x, y, color="tab:blue", lw=1.5)
    ax.scatter(x, y, s=sizes, color="tab:blue", alpha=0.6, label="test pairs, by probability given (area: share of pairs)")
    ax.set_xlabel("P(same attribute) given")
    ax.set_ylabel("share of those pairs that share one")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_title("Calibration on test pairs")
    fig.legend(loc="outside lower center", ncols=1, fontsize=8, frameon=False)
    _save_figure(fig, path)


def rank_curves_figure(ranks_by_label: dict[str, np.ndarray], max_rank: int = 20):
    """Cumulative accuracy: fraction of queries whose positive is within the top k, per distance.

    Distances with the same curve share one line labelled with all their names (L2 and cosine always
    agree on unit-length features); the others differ in line style and marker as well as colour.
    Like every legend here, it sits outside the axes (the constrained layout makes room), covering no line.
    """
    ks = np.arange(1, max_rank + 1)
    labels_of: dict[tuple[float, ...], list[str]] = {}
    for label, ranks in ranks_by_label.items():
        ranks = np.asarray(ranks)
        labels_of.setdefault(tuple(float((ranks <= k).mean()) for k in ks), []).append(label)
    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    for (curve, labels), (line, marker) in zip(labels_of.items(), CURVE_STYLES * len(labels_of)):
        ax.plot(ks, curve, linestyle=line, marker=marker, ms=4, label=" = ".join(labels))
    ax.set_xlabel("k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("top-k accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    ax.set_title("Rank of the positive among its comparative set")
    return fig


def plot_rank_curves(ranks_by_label: dict[str, np.ndarray], path: str | os.PathLike, max_rank: int = 20) -> None:
    _save_figure(rank_curves_figure(ranks_by_label, max_rank), path)


def plot_training_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Train and test classification error per epoch (test is only reported, never used to choose)."""
    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_error", "train"), ("validation_error", "validation"), ("test_error", "test")):
        if any(key in h for h in history):
            ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("classification error")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    ax.set_title("Refinement")
    _save_figure(fig, path)


def _thumb(path: str | os.PathLike, size: int) -> Image.Image:
    try:
        img = open_image(path, draft_size=size)
    except BadImageError:
        img = Image.new("RGB", (size, size), GREY)
    return ImageOps.pad(img, (size, size), color=(255, 255, 255))


def _captioned(img: Image.Image, caption: str, frame: tuple[int, int, int] | None, border: int = 6) -> Image.Image:
    size = img.size[0]
    tile = Image.new("RGB", (size + 2 * border, size + 2 * border + 22), "white")
    if frame is not None:
        tile.paste(frame, (0, 0, size + 2 * border, size + 2 * border))
    tile.paste(img, (border, border))
    ImageDraw.Draw(tile).text((border, size + 2 * border + 3), caption[:38], fill=(0, 0, 0), font=ImageFont.load_default(size=14))
    return tile


def _row(tiles: list[Image.Image], gap: int = 8) -> Image.Image:
    w = sum(t.size[0] for t in tiles) + gap * (len(tiles) - 1)
    h = max(t.size[1] for t in tiles)
    out = Image.new("RGB", (w, h), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.size[0] + gap
    return out


def thumbnail(path: str | os.PathLike, dest: str | os.PathLike, size: int = 160) -> None:
    """One photo, padded to a white square, small enough for a report to show several side by side."""
    _save_image(_thumb(path, size), dest)


def query_picture(query: str, best: str, correct: str, is_right: bool, path: str | os.PathLike, rank: int, size: int = 200) -> None:
    """query | best match | correct match; the best match is framed green when it is the positive, red otherwise."""
    tiles = [
        _captioned(_thumb(query, size), "query", None),
        _captioned(_thumb(best, size), "best match", GREEN if is_right else RED),
        _captioned(_thumb(correct, size), f"correct match (rank {rank})", GREEN),
    ]
    _save_image(_row(tiles), path)


def retrieval_grid(query: str, results: Sequence[tuple[str, float, str]], path: str | os.PathLike, columns: int = 4, size: int = 200) -> None:
    """The query top-left, then the matches in order with their distance (and label, when known)."""
    tiles = [_captioned(_thumb(query, size), "query", (60, 60, 200))]
    for i, (p, dist, label) in enumerate(results, 1):
        tiles.append(_captioned(_thumb(p, size), f"{i}. {dist:.3f} {label}".strip(), None))
    rows = [_row(tiles[i : i + columns]) for i in range(0, len(tiles), columns)]
    w = max(r.size[0] for r in rows)
    out = Image.new("RGB", (w, sum(r.size[1] for r in rows) + 6 * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.size[1] + 6
    _save_image(out, path)
