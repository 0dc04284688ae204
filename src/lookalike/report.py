"""One self-contained HTML report per run: what each figure means, the tables, example queries, and per-split detail."""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable

from jinja2 import Environment, PackageLoader, select_autoescape

from .evaluation import example_queries
from .evaluation.lookalike import unseen_shortfall_warning
from .fileio import read_json, write_text
from .metric import LABELS
from .rundir import RunDir

#: Example queries shown above the per-split detail, drawn from all splits' pictures.
EXAMPLES_SHOWN = 8


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
    pictures = [p | {"split": s["k"]} for s in splits for p in s["eval"]["pictures"]]
    shown = example_queries([p["attribute"] for p in pictures], [p["rank"] for p in pictures], EXAMPLES_SHOWN, metrics["config"]["data"]["seed"])
    env = Environment(loader=PackageLoader("lookalike", "templates"), autoescape=select_autoescape(["html"]))
    html = env.get_template("report.html").render(
        m=metrics, splits=splits, labels=LABELS, best=best_rows(metrics), negatives=negatives_text(metrics), examples=[pictures[i] for i in shown],
        visual_parts=visual_part_summary([s["refine"].get("visual_part") for s in splits if s["refine"]]),
        unseen_warning=unseen_shortfall_warning(unseen, refined=bool(metrics.get("refined"))) if (unseen := (metrics.get("lookalike_search") or {}).get("unseen")) else None,
    )
    write_text(run.report, html)
    return str(run.report)


def visual_part_summary(choices: list[dict | None]) -> str | None:
    """Which visual part the splits' models keep, e.g. "learned on 3 of 5 splits, pretrained on 2", and on how many the check
    leaned toward the pretrained part without clear evidence (None without a lookalike head)."""
    chosen = Counter(c["chosen"] for c in choices if c)
    if not chosen:
        return None
    n = sum(chosen.values())
    summary = ", ".join(f"{part} on {count} of {n} split{'s' if n > 1 else ''}" if i == 0 else f"{part} on {count}" for i, (part, count) in enumerate(chosen.most_common()))
    unclear = sum(1 for c in choices if c and c.get("unclear"))
    return summary + (f"; on {unclear} the check found the learned part weaker on attributes it never saw, but not clearly enough to switch" if unclear else "")


def best_rows(metrics: dict) -> dict[str, set[str]]:
    """Per table, the distances to highlight: the best on its headline figure, whichever distance that is."""
    search = metrics.get("lookalike_search") or {}
    searched = {name: {"found_first": search.get("copies", {}).get(name, {}).get("found_first", 0.0), "ties": search.get("ties", {}).get(name, 0.0)} for name in ("l2", "weighted_l2")}
    return {
        "rank": _best(metrics["distances"], lambda d: (d["top1"], -d["mean_rank"])),
        "gallery": _best(metrics.get("gallery_by_distance") or {}, lambda g: (g["map"], g["recall_at_1"])),
        "search": _best(searched, lambda s: (s["found_first"], -s["ties"])) if search else set(),
        "unseen": _best({key: unseen[key] for key in ("learned", "pretrained")}, lambda r: (r["unseen"], r["trained"])) if (unseen := search.get("unseen")) else set(),
    }


def _best(rows: dict[str, dict], score: Callable[[dict], tuple]) -> set[str]:
    """Names of the rows with the highest score; several when they tie (L2 and cosine often do)."""
    scores = {name: score(row) for name, row in rows.items()}
    return {name for name, s in scores.items() if s == max(scores.values())}


def negatives_text(metrics: dict) -> str:
    """How many negatives each query really had: the configured number is only an upper bound."""
    n = metrics["negatives_per_query"]
    asked = metrics["config"]["data"]["negatives_per_query"]
    used = f"{n['min']}" if n["min"] == n["max"] else f"{n['min']}–{n['max']} (mean {n['mean']:.1f})"
    if n["max"] < asked:
        return f"{used} negatives (every test photo of another attribute; data.negatives_per_query allows up to {asked})"
    return f"{used} negatives"


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
