"""`evaluate`: the rank test and lookalike search over random splits, as one call that returns typed results."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import LookalikeConfig, load_config
from .errors import ConfigError


@dataclass(frozen=True)
class DistanceScores:
    """How one distance ranks a query's positive among its negatives, averaged over splits (std beside)."""

    top1: float
    top5: float
    mean_rank: float
    median_rank: float
    top1_std: float = 0.0
    top5_std: float = 0.0
    mean_rank_std: float = 0.0
    median_rank_std: float = 0.0


@dataclass(frozen=True)
class Evaluation:
    """What `lookalike run` writes to metrics.json, typed: one entry per distance, gallery retrieval, lookalike search, calibration,
    and the photos behind the most misses."""

    dataset: str
    n_images: int
    attributes: list[str]
    backbone: str
    splits: int
    n_test_queries: int
    distances: dict[str, DistanceScores]
    gallery: dict[str, float] = field(default_factory=dict)
    lookalike_search: dict = field(default_factory=dict)
    calibration: dict | None = None
    misses: dict | None = None
    refined: bool = False
    run_dir: str | None = None
    report: str | None = None

    @property
    def learned(self) -> DistanceScores:
        """The learned weighted-L2 distance's scores (the model `fit` trains)."""
        return self.distances["weighted_l2"]

    @classmethod
    def from_metrics(cls, metrics: dict, run_dir: str | None = None) -> "Evaluation":
        return cls(
            dataset=metrics["dataset"],
            n_images=metrics["n_images"],
            attributes=list(metrics["attributes"]),
            backbone=metrics["backbone"],
            splits=metrics["splits"],
            n_test_queries=metrics["n_test_queries"],
            distances={name: DistanceScores(**scores) for name, scores in metrics["distances"].items()},
            gallery=dict(metrics.get("gallery", {})),
            lookalike_search=dict(metrics.get("lookalike_search", {})),
            calibration=metrics.get("calibration"),
            misses=metrics.get("misses"),
            refined=bool(metrics.get("refined", False)),
            run_dir=run_dir,
            report=str(Path(run_dir) / "report.html") if run_dir else None,
        )


def evaluate(
    data: str | os.PathLike,
    splits: int = 5,
    out: str | os.PathLike | None = None,
    config: str | os.PathLike | LookalikeConfig | None = None,
    progress: bool = True,
    jobs: int = 0,
    **sections: dict,
) -> Evaluation:
    """Train and test on `splits` random splits of `data` and report the rank test and lookalike search.

    Parameters
    ----------
    data : path
        A folder with one sub-folder per attribute value.
    splits : int
        How many random train/test splits to average over (60 test queries are noisy).
    out : path, optional
        The run folder (report.html, per-split files); rerunning skips finished work. Default: a temporary folder.
    config : path or LookalikeConfig, optional
        A lookalike.toml, or a configuration; `sections` (e.g. ``refine={"epochs": 10}``) override it.
    jobs : int
        Splits (and the unseen-attribute test) computed at once, each in a forked process with its share of the
        cores; 0 = one per core, 1 = one after another in this process.

    Returns
    -------
    Evaluation
        The same numbers as the run's metrics.json; ``run_dir`` and ``report`` are None for a temporary run.

    Examples
    --------
    >>> report = evaluate("data/", splits=5, out="runs/mine")   # doctest: +SKIP
    >>> report.learned.top1                                       # doctest: +SKIP
    0.71
    """
    from .pipeline import run_pipeline

    if splits < 1:
        raise ConfigError(f"splits = {splits}: evaluate needs at least 1 split")
    if isinstance(config, LookalikeConfig):
        base = config.model_dump()
        cfg = load_config(None, {name: base[name] | sections.get(name, {}) for name in base} | {k: v for k, v in sections.items() if k not in base})
    else:
        cfg = load_config(config, sections)
    if out is not None:
        return Evaluation.from_metrics(run_pipeline(data, out, cfg, splits=splits, progress=progress, jobs=jobs), str(Path(out).resolve()))
    with tempfile.TemporaryDirectory(prefix="lookalike-evaluate-") as tmp:
        return Evaluation.from_metrics(run_pipeline(data, tmp, cfg, splits=splits, progress=progress, jobs=jobs))
