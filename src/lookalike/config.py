"""Every tunable parameter in one place. `lookalike.toml` documents each one; CLI flags override."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    seed: int = 0
    train_ratio: float = Field(0.75, gt=0, lt=1)
    validation_ratio: float = Field(0.2, ge=0, lt=1)
    split_by_subfolder: bool = False
    train_queries_per_attribute: int = Field(100, ge=1)
    validation_queries_per_attribute: int = Field(20, ge=1)
    test_queries_per_attribute: int = Field(20, ge=1)
    negatives_per_query: int = Field(100, ge=1)
    near_duplicates: Literal["refuse", "resolve", "ignore"] = "refuse"
    near_duplicate_max_distance: int = Field(16, ge=0, le=256)


class FeaturesConfig(_Section):
    backbone: str = "efficientnet-lite0"
    weights: str = ""
    resolution: int = Field(320, ge=32, le=2048)
    normalization: Literal["backbone", "imagenet", "inception"] = "backbone"
    batch_size: int = Field(32, ge=1)
    cache_dir: str = ""
    engine: Literal["auto", "torch", "onnx"] = "auto"
    quantize: bool = False


class RefineConfig(_Section):
    """Fine-tuning the backbone on the dataset's attributes before featurize (the tutorial's `rf_*` parameters)."""

    @model_validator(mode="before")
    @classmethod
    def _resolution_moved(cls, data):
        if isinstance(data, dict) and "resolution" in data:
            raise ValueError("refine.resolution is now features.resolution, the one input size that refine and featurize share; move it to [features]")
        return data

    epochs: int = Field(60, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr_schedule: list[tuple[int, float]] = [(45, 0.001), (15, 0.0001)]
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0005, ge=0)
    batch_size: int = Field(64, ge=2)
    dropout: float = Field(0.2, ge=0, lt=1)
    mode: Literal["auto", "cached", "full"] = "auto"
    texture_stages: list[int] = [-8, -6, -4, -2]
    trainable_blocks: int = Field(0, ge=0)
    last_layer_only: bool = False
    embedding: Literal["lookalike", "posterior", "logits", "pooled"] = "lookalike"
    attribute_dim: int = Field(64, ge=1)
    attribute_members: int = Field(4, ge=1)
    visual_dim: int = Field(64, ge=1)
    visual_part: Literal["auto", "learned", "pretrained"] = "auto"
    temperature: float = Field(0.1, gt=0)
    view_weight: float = Field(1.0, ge=0)
    view_temperature: float = Field(0.1, gt=0)
    new_layer_lr_multiplier: float = Field(1.0, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    balance: bool = False
    max_images_per_epoch: int = Field(0, ge=0)
    cached_views: int = Field(3, ge=0)
    crop_scale_min: float = Field(0.25, gt=0, le=1)
    hflip: bool = True
    vflip: bool = True
    color_jitter: float = Field(0.3, ge=0, lt=1)
    hue_jitter: float = Field(0.02, ge=0, le=0.5)
    degrade: float = Field(0.5, ge=0, le=1)
    mixed_precision: bool = True


class MetricConfig(_Section):
    C: float = Field(0.1, gt=0)
    C_candidates: list[float] = []
    class_weight: Literal["balanced", "none"] = "balanced"
    max_iter: int = Field(10000, ge=100)
    hard_negative_iterations: int = Field(0, ge=0)
    hard_negative_max_per_iteration: int = Field(5000, ge=1)
    hard_negative_sampling_rounds: int = Field(10, ge=1)
    platt_negative_ratio: float = Field(10.0, gt=0)
    visual_weight: float = Field(0.5, ge=0)
    pretrained_visual_weight: float = Field(4.0, ge=0)


class EvaluateConfig(_Section):
    query_pictures: int = Field(12, ge=0)
    gallery: bool = True
    copy_test: bool = True
    unseen_attribute: bool = True


class LookalikeConfig(_Section):
    data: DataConfig = DataConfig()
    features: FeaturesConfig = FeaturesConfig()
    metric: MetricConfig = MetricConfig()
    refine: RefineConfig = RefineConfig()
    evaluate: EvaluateConfig = EvaluateConfig()



def stored_config(data: dict, source: str) -> LookalikeConfig:
    """A configuration a run or model folder recorded, from this version or an earlier one.

    Earlier versions kept the refined model's input size in refine.resolution; it is features.resolution now.
    """
    refine = dict(data.get("refine", {}))
    if "resolution" in refine:
        resolution = refine.pop("resolution")
        features = dict(data.get("features", {}))
        if resolution and refine.get("epochs", 1):
            features["resolution"] = resolution
        data = {**data, "refine": refine, "features": features}
    try:
        return LookalikeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: the recorded configuration is not valid for this version of lookalike:\n{format_validation_error(e)}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> LookalikeConfig:
    """Defaults, then the TOML file, then `overrides`; unknown keys are errors.

    `overrides` maps "section.key" to a value ({"refine.epochs": 10}) or a section to a dict ({"refine": {"epochs": 10}}).
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; give an existing lookalike.toml, or none for the defaults", param="config") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, dict) and "." not in name:
            data.setdefault(name, {}).update(value)
        elif "." in name:
            section, key = name.split(".", 1)
            data.setdefault(section, {})[key] = value
        else:
            raise ConfigError(f"override {name!r}: give 'section.key' (e.g. 'refine.epochs': 10) or a section's dict (e.g. 'refine': {{'epochs': 10}})")
    try:
        return LookalikeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid configuration:\n{format_validation_error(e)}") from None


def format_validation_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in err["loc"][:-1])
            known = _known_keys(err["loc"][:-1])
            msg = f"unknown key; known keys{' in [' + section + ']' if section else ''}: {', '.join(known)}"
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = LookalikeConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)
