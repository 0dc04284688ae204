"""`lookalike refine`: fine-tune the backbone on a run's attributes (the stage between prepare and featurize)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def refine(
        run: Path = typer.Option(..., "--run", "-r", help="The run directory written by `lookalike prepare` / `lookalike run`."),
        split: int = typer.Option(0, "--split", help="Which random split of the run to refine on (0 .. K-1)."),
        force: bool = typer.Option(False, "--force", help="Refine again even if the refined model is up to date."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=0, help="Number of epochs (refine.epochs); 0 removes refinement."),
        mode: Optional[str] = typer.Option(None, "--mode", help="auto, cached (fast on a CPU: trains the last blocks) or full (every block; for GPUs)."),
        resolution: Optional[int] = typer.Option(None, "--resolution", min=32, help="Input resolution in pixels (refine.resolution), e.g. 224, 500 or 1000."),
        last_layer_only: Optional[bool] = typer.Option(None, "--last-layer-only/--train-blocks", help="Freeze the whole pretrained trunk and train only the new layers."),
        lr: Optional[float] = typer.Option(None, "--lr", help="One learning rate for every epoch (replaces refine.lr_schedule)."),
    ):
        """Fine-tune the backbone on the split's training images; featurize then embeds with the refined model.

        Writes RUN_DIR/split-K/refined/ (backbone.safetensors, backbone.json, history.json, curves.png).
        Flags given here are stored in the run's config, so later stages and reruns see the same settings.
        """
        from pydantic import ValidationError

        from ..config import LookalikeConfig, format_validation_error
        from ..errors import ConfigError
        from ..fileio import write_json
        from ..pipeline import load_run_config
        from ..rundir import RunDir
        from .stage import refine as _refine

        rd = RunDir(run)
        cfg = load_run_config(rd)
        changes = {"epochs": epochs, "mode": mode, "resolution": resolution, "last_layer_only": last_layer_only}
        changes = {k: v for k, v in changes.items() if v is not None}
        if lr is not None:
            changes["lr_schedule"] = [(max(cfg.refine.epochs, epochs or 0, 1), lr)]
        if changes:
            try:
                cfg = LookalikeConfig.model_validate(cfg.model_dump() | {"refine": cfg.refine.model_dump() | changes})
            except ValidationError as e:
                raise ConfigError(f"invalid refine option:\n{format_validation_error(e)}") from None
            write_json(rd.config, cfg.model_dump())
        record = _refine(run, split=split, force=force)
        if record is None:
            typer.echo("refinement is off (refine.epochs = 0); featurize uses the pretrained backbone")
            return
        last = record["history"][-1]
        typer.echo(
            f"refined model in {rd.split_dir(split) / 'refined'}: {len(record['history'])} epochs on {record['device']}, "
            f"final train error {last['train_error']:.1%}" + (f", test error {last['test_error']:.1%}" if "test_error" in last else "")
        )
