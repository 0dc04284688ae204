"""`lookalike refine`: learn a run's attributes from its training images (the stage between prepare and featurize)."""

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
        mode: Optional[str] = typer.Option(None, "--mode", help="auto, cached (fast on a CPU: the frozen stages run once per image view) or full (every stage trained; for GPUs)."),
        texture_stages: Optional[str] = typer.Option(
            None, "--texture-stages", help="Comma-separated stages whose channel mean and std the classifier sees, e.g. '-8,-6,-4,-2' (the default); 'none' = the last stage average-pooled, as in the tutorial."
        ),
        trainable_blocks: Optional[int] = typer.Option(None, "--trainable-blocks", min=0, help="Cached mode: how many of the last stages the descriptor needs are fine-tuned too (default 0)."),
        resolution: Optional[int] = typer.Option(None, "--resolution", min=32, help="Input resolution in pixels (features.resolution, shared with featurize), e.g. 224, 500 or 1000."),
        last_layer_only: Optional[bool] = typer.Option(None, "--last-layer-only/--train-blocks", help="Freeze the whole pretrained trunk and train only the new layers."),
        lr: Optional[float] = typer.Option(None, "--lr", help="One learning rate for every epoch (replaces refine.lr_schedule)."),
    ):
        """Train an attribute classifier (and optionally the last stages) on the split's training images; featurize then embeds with it.

        By default the classifier sees texture statistics (each channel's mean and standard deviation) of four stages of the frozen pretrained trunk, and its attribute posterior becomes the embedding.

        Example:  lookalike refine --run runs/demo --split 0 --epochs 40

        Writes RUN_DIR/split-K/refined/ (backbone.safetensors, backbone.json, history.json, curves.png).
        Flags given here are stored in the run's config, so later stages and reruns see the same settings.
        """
        from pydantic import ValidationError

        from ..config import LookalikeConfig, format_validation_error
        from ..errors import ConfigError
        from ..rundir import RunDir
        from ..refine.stage import base_backbone, refine as _refine

        rd = RunDir(run)
        cfg = rd.config()
        changes = {"epochs": epochs, "mode": mode, "last_layer_only": last_layer_only, "trainable_blocks": trainable_blocks}
        changes = {k: v for k, v in changes.items() if v is not None}
        if texture_stages is not None:
            changes["texture_stages"] = _stage_list(texture_stages)
        if lr is not None:
            changes["lr_schedule"] = [(max(cfg.refine.epochs, epochs or 0, 1), lr)]
        if changes or resolution is not None:
            try:
                features = cfg.features.model_dump() | ({"resolution": resolution} if resolution is not None else {})
                cfg = LookalikeConfig.model_validate(cfg.model_dump() | {"refine": cfg.refine.model_dump() | changes, "features": features})
            except ValidationError as e:
                raise ConfigError(f"invalid refine option:\n{format_validation_error(e)}") from None
            base_backbone(cfg)  # a stage number the backbone lacks is refused before the run's config changes
            rd.save_config(cfg)
        record = _refine(run, split=split, force=force)
        if record is None:
            typer.echo("refinement is off (refine.epochs = 0); featurize uses the pretrained backbone")
            return
        last = record["history"][-1]
        typer.echo(
            f"refined model in {rd.split_dir(split) / 'refined'}: {len(record['history'])} epochs on {record['device']}, "
            f"final train error {last['train_error']:.1%}" + (f", test error {last['test_error']:.1%}" if "test_error" in last else "")
        )


def _stage_list(text: str) -> list[int]:
    from ..errors import ConfigError

    if text.strip().lower() in ("", "none"):
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--texture-stages takes comma-separated stage numbers such as -8,-6,-4,-2 (or 'none'), not {text!r}") from None
