"""One self-contained HTML report per run: the tables, the plots, and the per-query pictures."""

from __future__ import annotations

import os

from jinja2 import Environment, PackageLoader, select_autoescape

from .fileio import read_json, write_text
from .rundir import RunDir

LABELS = {"random": "random", "l1": "L1", "l2": "L2", "cosine": "cosine", "weighted_l2": "weighted L2 (learned)"}


def write_report(run_dir: str | os.PathLike) -> str:
    run = RunDir(run_dir)
    metrics = read_json(run.metrics)
    splits = []
    for k in run.splits():
        sdir = run.split_dir(k)
        if not (sdir / "evaluation.json").exists():
            continue
        ev = read_json(sdir / "evaluation.json")
        tm = read_json(sdir / "train_metric.json") if (sdir / "train_metric.json").exists() else {}
        refine = read_json(sdir / "refined" / "history.json") if (sdir / "refined" / "history.json").exists() else None
        splits.append({"k": k, "eval": ev, "train": tm, "refine": refine, "has_refine_plot": (sdir / "refined" / "curves.png").exists()})
    env = Environment(loader=PackageLoader("lookalike", "templates"), autoescape=select_autoescape(["html"]))
    html = env.get_template("report.html").render(m=metrics, splits=splits, labels=LABELS)
    write_text(run.report, html)
    return str(run.report)


def format_table(metrics: dict) -> list[tuple[str, str, str, str, str]]:
    """Rows of the tutorial's table: distance, top-1, top-5, mean rank, median rank (with ± over splits)."""
    rows = []
    for name, d in metrics["distances"].items():
        pm = metrics["splits"] > 1
        rows.append((
            LABELS.get(name, name),
            f"{d['top1']:.1%}" + (f" ± {d['top1_std']:.1%}" if pm else ""),
            f"{d['top5']:.1%}" + (f" ± {d['top5_std']:.1%}" if pm else ""),
            f"{d['mean_rank']:.2f}" + (f" ± {d['mean_rank_std']:.2f}" if pm else ""),
            f"{d['median_rank']:.1f}",
        ))
    return rows
