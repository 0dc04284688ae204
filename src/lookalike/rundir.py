"""The run directory: where each stage's outputs live, and the log every stage appends to."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .errors import LookalikeError
from .fileio import read_json

console = Console(stderr=True, highlight=False)


class RunDir:
    """Paths inside RUN_DIR; split k's files live in RUN_DIR/split-k/."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def dataset(self) -> Path:
        return self.root / "dataset.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def log_file(self) -> Path:
        return self.root / "log.txt"

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

    def log(self, message: str, style: str = "") -> None:
        """Print to the console and append to RUN_DIR/log.txt."""
        console.print(escape(message), style=style or None)
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {message}\n")


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-serialisable inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def up_to_date(path: Path, fp: str) -> bool:
    """True when `path` is a JSON output whose recorded fingerprint equals `fp`."""
    if not path.exists():
        return False
    try:
        return read_json(path).get("fingerprint") == fp
    except (OSError, ValueError, AttributeError):
        return False
