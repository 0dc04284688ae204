"""The `lookalike` command line: one sub-command per stage, plus `run` for all of them."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError, LookalikeError
from .console import EXIT_FAILURE, EXIT_PARTIAL, EXIT_USAGE, attach_log, err, error_message, out, print_matches, search_answer

app = typer.Typer(
    name="lookalike",
    help=(
        "Train, evaluate and serve image similarity rankers on your own photos.\n\n"
        "Bring a folder with one sub-folder per attribute value (e.g. data/dotted/*.jpg, data/striped/*.jpg) and run:\n\n"
        "  lookalike run --data data --out runs/mine --splits 5\n\n"
        "Stages can also be run one at a time: prepare, refine, featurize, train-metric, evaluate.\n\n"
        "Then search a catalog (lookalike index build / search) or serve it (lookalike serve)."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from ..version import __version__

        out.print(f"lookalike {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Say more (-v: debug messages)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors; no progress bars."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (they are off anyway when stderr is not a terminal)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """Options for every command; give them before the command: `lookalike -q run ...`."""
    from .. import progress

    attach_log(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    progress.enable(not (quiet or no_progress))

DataOpt = typer.Option(..., "--data", "-d", help="Dataset folder: one sub-folder of images per attribute value.")
RunOutOpt = typer.Option(..., "--out", "-o", help="Run directory to create or update.")
ConfigOpt = typer.Option(None, "--config", "-c", help="A lookalike.toml; its values override the defaults, CLI flags override it.", exists=False)
RunOpt = typer.Option(..., "--run", "-r", help="The run directory written by `lookalike prepare` / `lookalike run`.")
ModelOpt = typer.Option(..., "--model", "-m", "--run", "-r", help="Model folder (`lookalike fit`) or run folder (`lookalike run`; --split picks the split).")
SplitOpt = typer.Option(0, "--split", help="Which random split of the run to work on (0 .. K-1).")
ForceOpt = typer.Option(False, "--force", help="Redo the stage even if its outputs are up to date.")


def _config(config: Optional[Path], **overrides):
    from ..config import load_config

    return load_config(config, {k: v for k, v in overrides.items() if v is not None})


@app.command()
def prepare(
    data: Path = DataOpt,
    run: Path = RunOutOpt,
    config: Optional[Path] = ConfigOpt,
    seed: Optional[int] = typer.Option(None, help="Random seed for the split (data.seed)."),
    split: int = SplitOpt,
    by_subfolder: Optional[bool] = typer.Option(None, "--by-subfolder/--by-file", help="Assign whole sub-folders (e.g. one product's photos) to train or test, instead of single files."),
    force: bool = ForceOpt,
):
    """Scan the dataset, split it into train / validation / test and draw the comparative sets.

    Skipped files (corrupt, not images, duplicates) are listed in RUN_DIR/log.txt.
    """
    from ..pipeline import prepare as _prepare

    cfg = _config(config, **{"data.seed": seed, "data.split_by_subfolder": by_subfolder})
    s = _prepare(data, run, cfg, split=split, force=force)
    out.print(f"split {split}: " + ", ".join(f"{p}: {len(v)} images, {len(s.sets[p])} queries" for p, v in s.parts.items()))


@app.command()
def featurize(run: Path = RunOpt, split: int = SplitOpt, force: bool = ForceOpt):
    """Embed the split's images with the run's backbone (the refined one when present). Cached by content hash."""
    from ..pipeline import featurize as _featurize

    feats = _featurize(run, split=split, force=force)
    out.print(f"{feats.shape[0]} embeddings of dimension {feats.shape[1]}")


@app.command("train-metric")
def train_metric(run: Path = RunOpt, split: int = SplitOpt, force: bool = ForceOpt):
    """Learn the weighted L2 distance (linear SVM on squared differences) and calibrate it on validation pairs."""
    from ..pipeline import train_metric as _train

    _train(run, split=split, force=force)


@app.command()
def evaluate(run: Path = RunOpt, split: int = SplitOpt, force: bool = ForceOpt):
    """Rank each test query's positive among its negatives for random, L1, L2, cosine and the learned distance."""
    from ..pipeline import evaluate as _evaluate, summarize
    from ..report import write_report

    _evaluate(run, split=split, force=force)
    metrics = summarize(run)
    report = write_report(run)
    _print_table(metrics, report)


@app.command("run")
def run_all(
    data: Path = DataOpt,
    run: Path = RunOutOpt,
    splits: int = typer.Option(1, "--splits", "-k", min=1, help="Repeat over K random splits and report mean ± std (60 test queries are noisy)."),
    config: Optional[Path] = ConfigOpt,
    backbone: Optional[str] = typer.Option(None, help="Backbone name (features.backbone); see `lookalike backbones`."),
    weights: Optional[Path] = typer.Option(None, help="Pretrained weights file for the backbone (features.weights)."),
    resolution: Optional[int] = typer.Option(None, help="Input resolution in pixels (features.resolution)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the first split (data.seed); split k uses seed + k."),
    by_subfolder: Optional[bool] = typer.Option(None, "--by-subfolder/--by-file", help="Assign whole sub-folders (e.g. one product's photos) to train or test, instead of single files (data.split_by_subfolder)."),
    jobs: int = typer.Option(
        0, "--jobs", "-j", min=0,
        help="Splits (and the unseen-attribute test) computed at once, each in a process of its own with its share of the cores; 0 = one per core. "
        "Training on a CUDA GPU, and where processes cannot fork (not Linux), they run one at a time.",
    ),
    force: bool = ForceOpt,
):
    """Run every stage for each split, then print the evaluation table and write RUN_DIR/report.html.

    The report also pictures the photos behind the most misses: one photo filed in the wrong folder, or one the model places with another attribute, can cost many queries, and these are the ones to look at first.

    Example:  lookalike run --data ../shared/datasets/fashionTexture --out runs/demo --splits 5
    """
    from ..pipeline import run_pipeline
    from ..rundir import RunDir

    cfg = _config(config, **{"features.backbone": backbone, "features.weights": str(weights) if weights else None, "features.resolution": resolution, "data.seed": seed, "data.split_by_subfolder": by_subfolder})
    metrics = run_pipeline(data, run, cfg, splits=splits, force=force, jobs=jobs)
    _print_table(metrics, str(RunDir(run).report))


@app.command()
def retrieve(
    image: Path = typer.Argument(..., help="The query image."),
    run: Path = ModelOpt,
    gallery: Optional[Path] = typer.Option(None, "--gallery", "-g", help="Folder of images to search (default: the run's test images; needed with a model folder)."),
    top: int = typer.Option(15, "--top", "-n", min=1, help="How many matches to list."),
    min_probability: Optional[float] = typer.Option(None, "--min-probability", "-p", min=0, max=1, help="Only matches at least this likely (0-1) to share the query's attribute."),
    split: int = SplitOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the keys of REST /search (and `index search --json`)."),
    picture: Optional[Path] = typer.Option(None, help="Where to write the grid picture (default RUN_DIR/retrieval/ or the current folder; none with --json unless given)."),
):
    """List the images most alike to IMAGE under the learned distance, and draw them as a grid.

    Example:  lookalike retrieve query.jpg --model models/mine --gallery catalog/
    """
    from ..retrieval import retrieve as _retrieve

    if picture is None and not as_json:
        base = Path(run) / "retrieval" if (Path(run) / "config.json").is_file() else Path.cwd()
        picture = base / f"{image.stem}-top{top}.jpg"
    start = time.perf_counter()
    matches = _retrieve(run, image, top=top, split=split, picture=picture, gallery=gallery, min_probability=min_probability)
    if as_json:
        print(search_answer(Path(os.path.abspath(image)), None, matches, (time.perf_counter() - start) * 1000, None, min_probability).model_dump_json())
        return
    print_matches(f"Most alike to {image}", matches)
    out.print(f"grid picture: {picture}")


@app.command()
def fit(
    data: Path = DataOpt,
    model_dir: Path = typer.Option(..., "--out", "-o", help="Model folder to write (self-contained: weights, ranker, model card)."),
    config: Optional[Path] = ConfigOpt,
    backbone: Optional[str] = typer.Option(None, help="Backbone name (features.backbone); see `lookalike backbones`."),
    weights: Optional[Path] = typer.Option(None, help="Pretrained weights file for the backbone (features.weights)."),
    evaluation: Optional[Path] = typer.Option(None, "--evaluation", "-e", help="A `lookalike run` folder on the same data: its metrics go into the model card."),
    work: Optional[Path] = typer.Option(None, "--work", help="Keep the stages' outputs here, so a rerun skips finished work (default: a temporary folder)."),
):
    """Train the model to deploy on all labelled photos, and save it as a self-contained folder.

    A validation slice per attribute is kept out for calibration; there is no test set, since
    `lookalike run` (random splits) is the evaluation. Attach it with --evaluation.

    Example:  lookalike run --data photos --out runs/photos --splits 5
              lookalike fit --data photos --out models/photos --evaluation runs/photos
              lookalike index build --model models/photos --images catalog/ --out catalog.index
    """
    from ..model import SimilarityModel, may_hold_model
    from ..rundir import RunDir

    cfg = _config(config, **{"features.backbone": backbone, "features.weights": str(weights) if weights else None})
    if evaluation is not None:
        RunDir(evaluation).require(RunDir(evaluation).metrics, "run")
    if not may_hold_model(model_dir.expanduser()):
        raise ConfigError(f"--out {model_dir} exists and is not a lookalike model folder; choose another folder")
    model = SimilarityModel.from_config(cfg).fit(data, work_dir=work)
    model.save(model_dir, evaluation=evaluation)
    card = model.card_
    out.print(f"model {card['fingerprint']} ({', '.join(card['attributes'])}) trained on {card['data']['trained_on']} images, "
              f"calibrated on {card['data']['calibrated_on']}: {model_dir}")


@app.command()
def compare(
    image_a: Path = typer.Argument(..., help="First image."),
    image_b: Path = typer.Argument(..., help="Second image."),
    run: Path = ModelOpt,
    split: int = SplitOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """How alike two images are: the learned distance (lower = more alike) and P(same attribute)."""
    from ..model import SimilarityModel

    c = SimilarityModel.load(run, split).compare(image_a, image_b)
    if as_json:
        print(json.dumps({"distance": c.distance, "probability": c.probability}))
    else:
        out.print(f"distance {c.distance:.4f}, P(same attribute) {c.probability:.1%}")


@app.command("featurize-dir")
def featurize_dir(
    directory: str = typer.Argument(..., help="Folder of images (searched recursively); with --executor ray also s3://bucket/prefix or another fsspec URI."),
    out_file: str = typer.Option(..., "--out", "-o", help="Output: FILE.npy (+ FILE.json with the paths) or FILE.parquet; with --executor ray also a folder for the Parquet shards alone."),
    backbone: Optional[str] = typer.Option(None, help="Embed with this pretrained backbone (default efficientnet-lite0)."),
    run: Optional[Path] = typer.Option(None, "--model", "-m", "--run", "-r", help="Embed with this model folder's or run's (refined) backbone instead."),
    weights: Optional[Path] = typer.Option(None, help="Weights file for --backbone."),
    executor: str = typer.Option("local", "--executor", help="local (this process) or ray (a Ray cluster; pip install 'lookalike\\[ray]'). See docs/scale-out.md."),
    address: Optional[str] = typer.Option(None, help="With --executor ray: the cluster to use (auto, or ray://HOST:10001); default a private local instance."),
    shard_size: int = typer.Option(256, min=1, help="With --executor ray: images per Parquet shard (the unit of work and of resuming)."),
):
    """Embed every image below DIRECTORY into unit-length vectors (tutorial script A2)."""
    from ..backbones import create_backbone
    from ..model import ImageEmbedder, SimilarityModel
    from ..retrieval import featurize_dir as _featurize_dir

    if run is not None and backbone is not None:
        raise ConfigError("pass either --backbone or --model, not both")
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor}: choose local or ray")
    if executor == "ray":
        from ..distributed import ModelSpec, featurize_dir_ray

        spec = ModelSpec.of(backbone, weights, run)
        info = featurize_dir_ray(directory, out_file, spec, spec.load(), address=address, shard_size=shard_size)
    elif address is not None:
        raise ConfigError("--address needs --executor ray")
    else:
        model = SimilarityModel.load(run).embedder_ if run is not None else ImageEmbedder(create_backbone(backbone or "efficientnet-lite0", weights))
        info = _featurize_dir(directory, out_file, model)
    out.print(f"wrote {info['n']} embeddings ({info['dim']}-d, {info['backbone']}) to {out_file}; skipped {len(info['skipped'])}")
    for s in info["skipped"]:
        err.print(f"skipped {escape(s['path'])}: {escape(s['reason'])}", style="yellow")
    if info["skipped"]:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def backbones():
    """List the available backbones: embedding size, input size, normalisation, and whether their weights are here."""
    from ..backbones.registry import describe_backbones

    table = Table(title="Backbones")
    for col in ("name", "embedding", "input", "normalisation", "pretrained weights"):
        table.add_column(col)
    for b in describe_backbones():
        table.add_row(b["name"], f"{b['embedding_dim']}-d", f"{b['input_size']} px", b["normalization"], escape(b["weights"]) if b["weights"] else "[yellow]not on this machine[/yellow] (--weights FILE)")
    out.print(table)


def _print_table(metrics: dict, report: str) -> None:
    from ..report import best_rows, format_table

    table = Table(title=f"{metrics['backbone']} on {Path(metrics['dataset']).name}: {metrics['splits']} split(s), {metrics['n_test_queries']} test queries each")
    for col in ("distance", "top-1", "top-5", "mean rank", "median rank"):
        table.add_column(col, justify="left" if col == "distance" else "right")
    best = best_rows(metrics)["rank"]
    for name, row in zip(metrics["distances"], format_table(metrics)):
        table.add_row(*row, style="bold" if name in best else None)
    out.print(table)
    g = metrics.get("gallery") or {}
    if g:
        out.print(f"gallery (weighted L2): recall@1 {g['recall_at_1']:.1%}, recall@5 {g['recall_at_5']:.1%}, mAP {g['map']:.3f}")
    misses = metrics.get("misses") or {}
    if misses.get("photos"):
        top = misses["photos"][0]
        out.print(
            f"misses: {misses['misses']} of {misses['queries']} queries; {len(misses['photos'])} photo(s) take part in {misses['covered']} of them "
            f"(most: {escape(top['path'])}, in {top['misses']} misses); the report pictures them: check their folders"
        )
    out.print(f"report: {report}")


def _plain_placeholders(command) -> None:
    """Flags show no `<bool>` placeholder and arguments read as IMAGE, not {image}, in every command's --help."""
    help_option = command.get_help_option(command.context_class(command, help_option_names=["-h", "--help"]))
    for param in [*getattr(command, "params", []), *([help_option] if help_option else [])]:
        if param.param_type_name == "option" and (param.is_flag or param.count) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument" and param.metavar is None:
            param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        _plain_placeholders(sub)


def _register_plugins() -> None:
    """The command groups of the other cli/ modules (data tools, index, refine, service)."""
    import importlib

    for module in ("lookalike.cli.datatools", "lookalike.cli.index", "lookalike.cli.refine", "lookalike.cli.serve"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                continue
            raise
        if hasattr(mod, "register"):
            mod.register(app)


def exit_code(e: LookalikeError) -> int:
    """2 for a bad parameter (the error names one, or the configuration is invalid), else 1."""
    return EXIT_USAGE if isinstance(e, ConfigError) or getattr(e, "param", None) else EXIT_FAILURE


def _interrupted() -> None:
    err.print("[yellow]interrupted[/yellow]; finished stages are kept, rerun the same command to continue")


def main() -> None:
    _register_plugins()
    attach_log()
    command = typer.main.get_command(app)
    _plain_placeholders(command)
    try:
        command.main(prog_name="lookalike")
    except LookalikeError as e:
        err.print(f"[red]error:[/red] {escape(error_message(e))}")
        sys.exit(exit_code(e))
    except KeyboardInterrupt:
        _interrupted()
        sys.exit(130)
    except SystemExit as e:
        if e.code == 130:  # how typer ends a command on Ctrl-C, without a word
            _interrupted()
        raise
    except Exception as e:  # noqa: BLE001 - last line of defence: never show users a traceback
        if os.environ.get("LOOKALIKE_DEBUG") == "1":
            raise
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {escape(str(e))}\nSet LOOKALIKE_DEBUG=1 to see the traceback, and please report it.")
        sys.exit(1)
