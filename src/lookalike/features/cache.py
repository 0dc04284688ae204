"""Feature cache in SQLite, keyed by (backbone fingerprint, image content hash): re-runs only embed new images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..fileio import connect_sqlite


def default_cache_dir() -> Path:
    """$LOOKALIKE_CACHE_DIR, else ~/.cache/lookalike."""
    env = os.environ.get("LOOKALIKE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lookalike"


def configured_cache_dir(setting: str) -> Path:
    """features.cache_dir when it is set, else the default."""
    return Path(setting).expanduser() if setting else default_cache_dir()


class FeatureCache:
    """One SQLite file per backbone fingerprint; safe for several processes at once."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str, dim: int):
        self.fingerprint = fingerprint
        self.path = Path(directory) / f"features-{fingerprint}.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self._db = connect_sqlite(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS features (sha256 TEXT PRIMARY KEY, vector BLOB NOT NULL)")

    def get_many(self, digests: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            rows = self._db.execute(
                f"SELECT sha256, vector FROM features WHERE sha256 IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            for digest, blob in rows:
                vec = np.frombuffer(blob, dtype=np.float32)
                if vec.size == self.dim:
                    found[digest] = vec
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO features (sha256, vector) VALUES (?, ?)",
                [(d, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for d, v in items.items()],
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
