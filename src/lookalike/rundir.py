"""The run directory: where each stage's outputs live, how to read them back, and the log every stage appends to.

Stages and every consumer of a run (the model, retrieval, the report) read a run through `RunDir`, so none of
them reaches back into the orchestrator (`pipeline.py`) for a loader.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LookalikeError
from .fileio import read_json, write_json

if TYPE_CHECKING:
    import numpy as np

    from .backbones import Backbone, SavedBackbone
    from .config import LookalikeConfig
    from .data import Dataset, Split

logger = logging.getLogger("lookalike")

_LEVELS = {"": logging.INFO, "bold": logging.INFO, "yellow": logging.WARNING, "red": logging.ERROR}
#: The label of the larger run a nested run logs for ("" for a run of its own), shown on the console before each message.
_scope: contextvars.ContextVar[str] = contextvars.ContextVar("lookalike_log_scope", default="")


@contextlib.contextmanager
def log_scope(label: str):
    """Name `label` before every message a run logs inside, on the console: a nested run's "split 0" is not the run's own."""
    token = _scope.set(label)
    try:
        yield
    finally:
        _scope.reset(token)


class RunDir:
    """Paths inside RUN_DIR and loaders for what the stages wrote there; split k's files live in RUN_DIR/split-k/,
    the unseen-attribute test's run (itself a RunDir) in RUN_DIR/unseen/."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def config_file(self) -> Path:
        return self.root / "config.json"

    @property
    def dataset_file(self) -> Path:
        return self.root / "dataset.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def reliability_plot(self) -> Path:
        return self.root / "reliability.png"

    @property
    def misses_dir(self) -> Path:
        return self.root / "misses"

    @property
    def log_file(self) -> Path:
        return self.root / "log.txt"

    @property
    def unseen_dir(self) -> Path:
        return self.root / "unseen"

    def split_dir(self, k: int) -> Path:
        return self.root / f"split-{k}"

    def splits(self) -> list[int]:
        """Split numbers present in the run, in order."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("split-") and p.name[6:].isdigit():
                found.append(int(p.name[6:]))
        return sorted(found)

    def require(self, path: Path, stage: str) -> Path:
        if not path.exists():
            raise LookalikeError(f"{path} is missing; run `lookalike {stage}` for this run directory first")
        return path

    # ---- loaders ------------------------------------------------------------------------------

    def config(self) -> "LookalikeConfig":
        """The configuration the run was made with (written by prepare)."""
        from .config import stored_config

        return stored_config(read_json(self.require(self.config_file, "prepare")), str(self.config_file))

    def save_config(self, cfg: "LookalikeConfig") -> None:
        write_json(self.config_file, cfg.model_dump())

    def dataset(self) -> "Dataset":
        from .data import Dataset

        return Dataset.from_dict(read_json(self.require(self.dataset_file, "prepare")))

    def split(self, k: int) -> "Split":
        from .data import Split

        return Split.from_dict(read_json(self.require(self.split_dir(k) / "split.json", "prepare")))

    def split_is_current(self, k: int, cfg: "LookalikeConfig", scan_fp: str | None) -> bool:
        """Whether split k was made from the dataset scan `scan_fp` and the [data] settings of `cfg`."""
        split_file = self.split_dir(k) / "split.json"
        made = read_json(split_file).get("fingerprint") if split_file.exists() else None
        return made is not None and made in {split_fingerprint(scan_fp, cfg, k), *([split_fingerprint(scan_fp, cfg, None)] if k == 0 else [])}

    def check_split(self, k: int, cfg: "LookalikeConfig | None" = None) -> None:
        """Refuse split k when the run has no such split, or when it was made from another dataset or other [data]
        settings than the run's dataset.json and config.json (a later `lookalike run` into this folder that stopped
        early, or made fewer splits): read with this dataset.json, its image numbers would name the wrong photos.
        A folder trimmed to its models keeps no dataset.json, so nothing in it can disagree with the split."""
        if k not in self.splits():
            have = ", ".join(map(str, self.splits())) or "none yet; run `lookalike run` first"
            raise LookalikeError(f"{self.root} has no split {k}; its splits: {have}")
        if not self.dataset_file.exists():
            return
        self.require(self.split_dir(k) / "split.json", "prepare")
        if not self.split_is_current(k, cfg or self.config(), read_json(self.dataset_file).get("fingerprint")):
            raise LookalikeError(
                f"split {k} of {self.root} was made from another dataset or other [data] settings than the run's dataset.json and "
                f"config.json hold now (a later `lookalike run` into this folder stopped before making it again, or made fewer splits); "
                f"run `lookalike run` into this folder again, or into a new one"
            )

    def current_split(self, k: int) -> "Split":
        """Split k, once `check_split` finds it made from the run's dataset.json, to read with it."""
        self.check_split(k)
        return self.split(k)

    def backbone(self, k: int, cfg: "LookalikeConfig | None" = None) -> "Backbone | SavedBackbone":
        """Split k's refined backbone when one was trained (built only when PyTorch must run it), else the pretrained one the config names."""
        from .backbones import SavedBackbone

        refined = self.split_dir(k) / "refined"
        if (refined / "backbone.json").exists():
            return SavedBackbone(refined)
        from .backbones import create_backbone

        f = (cfg or self.config()).features
        return create_backbone(f.backbone, f.weights or None, f.resolution, f.normalization)

    def features(self, k: int) -> tuple["np.ndarray", dict[int, int]]:
        """Unit-length features of split k and a map dataset index -> row."""
        from .fileio import load_npy

        meta = read_json(self.require(self.split_dir(k) / "features.json", "featurize"))
        return load_npy(self.split_dir(k) / "features.npy"), {idx: row for row, idx in enumerate(meta["rows"])}

    # ---- log ----------------------------------------------------------------------------------

    def log(self, message: str, style: str = "") -> None:
        """Log to the `lookalike` logger (the CLI shows it, after the `log_scope` label) and append to RUN_DIR/log.txt; yellow = a warning."""
        scope = _scope.get()
        logger.log(_LEVELS.get(style, logging.INFO), f"{scope}: {message}" if scope else message)
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {message}\n")


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_fingerprint(scan_fp: str | None, cfg: "LookalikeConfig", split: int | None) -> str:
    """What split.json records it was made from: the dataset's scan, the [data] settings and the split's seed
    (`split` None: the one split of `train_on_all`, every image but a validation slice)."""
    return fingerprint(scan_fp, cfg.data.model_dump(), "all" if split is None else cfg.data.seed + split)


def up_to_date(path: Path, fp: str) -> bool:
    """True when `path` is a JSON output whose recorded fingerprint equals `fp`."""
    if not path.exists():
        return False
    try:
        return read_json(path).get("fingerprint") == fp
    except (OSError, ValueError, AttributeError):
        return False
