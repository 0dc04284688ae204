"""Where an index lives, and the surface every backend offers, so the CLI and the service do not care which.

Two backends: `faiss` (default), a folder on this machine (store.py), and `milvus`, a collection
in Milvus (milvus.py), either a Milvus Lite file or a server. Both number images the same way,
reduce the distance to L2 the same way and score candidates exactly, so they return the same
matches. Choosing the FAISS backend never imports pymilvus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ConfigError, LookalikeError
from .catalog import ImageEntry, NewImage
from .metric import IndexMetric
from .milvus import MilvusIndex, check_collection_name, committed_version, normalize_uri
from .store import MANIFEST, ImageIndex

BACKENDS = ("faiss", "milvus")


class IndexStore(Protocol):
    """An open index: ImageIndex (FAISS) and MilvusIndex both satisfy it."""

    metric: IndexMetric

    @property
    def location(self) -> str: ...
    @property
    def manifest(self) -> dict: ...
    @property
    def dim(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def generation(self) -> int: ...
    def add(self, images: list[NewImage], vectors: np.ndarray, replaced_ids=()) -> np.ndarray: ...
    def remove(self, ids) -> int: ...
    def touch(self, entry_id: int, size: int, mtime: float) -> None: ...
    def merge(self, force: bool = False, rebuild: bool = False, progress: bool = False) -> bool: ...
    def compact(self, above: float | None = None) -> bool: ...
    def reindex(self, kind: str | None = None, params: dict | None = None, progress: bool = False) -> None: ...
    def finish_build(self) -> None: ...
    def reuse_vector(self, sha256: str) -> np.ndarray | None: ...
    def vectors_of(self, ids) -> np.ndarray: ...
    def is_live(self, image_id: int) -> bool: ...
    def entries(self, ids) -> dict[int, ImageEntry]: ...
    def entries_by_path(self, prefix: str | None = None) -> dict[str, ImageEntry]: ...
    def attribute_counts(self) -> dict[str, int]: ...
    @property
    def build_finished(self) -> bool: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...
    def __enter__(self) -> "IndexStore": ...
    def __exit__(self, *exc) -> None: ...


@dataclass(frozen=True)
class IndexLocation:
    """An index folder (FAISS), or a collection name in the Milvus at `uri`."""

    name: str
    backend: str = "faiss"
    uri: str | None = None

    @classmethod
    def parse(cls, name: str | os.PathLike, backend: str = "faiss", uri: str | None = None) -> "IndexLocation":
        """Check the options that say where an index is (--backend, --uri and the index argument)."""
        if backend not in BACKENDS:
            raise ConfigError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
        if backend == "faiss":
            if uri is not None:
                raise ConfigError("--uri goes with --backend milvus; a FAISS index is the folder given as the index")
            return cls(str(Path(name).expanduser().resolve()))
        if not uri:
            raise ConfigError("--backend milvus needs --uri: a Milvus Lite file (catalog.db) or a server (http://host:19530)")
        return cls(check_collection_name(os.fspath(name)), backend, normalize_uri(uri))

    def open(self, writable: bool = False) -> IndexStore:
        if self.backend == "faiss":
            return ImageIndex.open(self.name, writable=writable)
        return MilvusIndex.open(self.uri, self.name, writable=writable)

    def create(self, dim: int, metric: IndexMetric, backbone_fingerprint=None, kind="auto", params=None, run_dir=None, overwrite=False) -> IndexStore:
        """A new, empty, writable index (an interrupted build with the same settings is resumed)."""
        if self.backend == "faiss":
            return ImageIndex.create(self.name, dim, metric, backbone_fingerprint, kind, params, run_dir, overwrite)
        return MilvusIndex.create(self.uri, self.name, dim, metric, backbone_fingerprint, kind, params, run_dir, overwrite)

    def version(self) -> tuple:
        """Changes whenever an update commits: a long-lived reader reopens the index when it does."""
        if self.backend == "milvus":
            return committed_version(self.uri, self.name)
        try:
            st = os.stat(os.path.join(self.name, MANIFEST))  # read for every /similar answer: 2 µs, against 11 with a Path
        except OSError:
            raise LookalikeError(f"the index at {self.name} has gone away; restart the service with a valid --index") from None
        return st.st_ino, st.st_mtime_ns

    def __str__(self) -> str:
        return self.name if self.backend == "faiss" else f"Milvus collection {self.name} at {self.uri}"


def as_location(index: str | os.PathLike | IndexLocation) -> IndexLocation:
    """A location as given, or a path taken as a FAISS index folder."""
    return index if isinstance(index, IndexLocation) else IndexLocation.parse(index)
