"""The image catalog in SQLite, versioned by generation, and the single-writer lock.

Every row carries the generation that added it and, once removed, the generation that removed it.
A reader pinned to generation G (the one named by the manifest) sees exactly the rows with
added_gen <= G and (removed_gen is null or > G): a half-finished update, whose rows carry G + 1,
stays invisible, and recovery deletes or restores those rows. Row id = FAISS id = the id its raw
vector is looked up by. A compaction deletes the rows of removed images; a reader keeps seeing them
through the read snapshot it pinned when it opened.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LookalikeError
from ..fileio import connect_sqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    attribute TEXT,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    added_gen INTEGER NOT NULL,
    removed_gen INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS live_path ON images(path) WHERE removed_gen IS NULL;
CREATE INDEX IF NOT EXISTS by_sha256 ON images(sha256);
"""

VISIBLE = "added_gen <= :gen AND (removed_gen IS NULL OR removed_gen > :gen)"


@dataclass(frozen=True)
class ImageEntry:
    """One catalogued image."""

    id: int
    path: str
    attribute: str | None
    sha256: str
    size: int
    mtime: float


@dataclass(frozen=True)
class NewImage:
    """A file about to be catalogued (its vector is supplied alongside)."""

    path: str
    attribute: str | None
    sha256: str
    size: int
    mtime: float


class Catalog:
    """SQLite in WAL mode: readers never block the writer and always see a committed state."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.db = connect_sqlite(self.path)
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def rollback_to(self, generation: int) -> int:
        """Undo every change newer than `generation` (left by a crashed update); returns rows dropped."""
        with self.db:
            dropped = self.db.execute("DELETE FROM images WHERE added_gen > ?", (generation,)).rowcount
            self.db.execute("UPDATE images SET removed_gen = NULL WHERE removed_gen > ?", (generation,))
        return dropped

    def pin(self) -> None:
        """Hold a read snapshot from the next query on (readers only): rows deleted later stay visible to this connection."""
        self.db.execute("BEGIN")

    def purge(self, generation: int) -> int:
        """Delete the rows of images removed at or before `generation` (a compaction dropped their vectors)."""
        with self.db:
            return self.db.execute("DELETE FROM images WHERE removed_gen <= ?", (generation,)).rowcount

    def insert(self, first_id: int, generation: int, images: list[NewImage], replaced_ids: list[int]) -> None:
        """Add `images` with ids first_id.. and retire `replaced_ids`, in one transaction."""
        with self.db:
            if replaced_ids:
                self.db.executemany("UPDATE images SET removed_gen = ? WHERE id = ?", [(generation, i) for i in replaced_ids])
            self.db.executemany(
                "INSERT INTO images (id, path, attribute, sha256, size, mtime, added_gen) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(first_id + j, im.path, im.attribute, im.sha256, im.size, im.mtime, generation) for j, im in enumerate(images)],
            )

    def retire(self, ids: list[int], generation: int) -> None:
        with self.db:
            self.db.executemany("UPDATE images SET removed_gen = ? WHERE id = ? AND removed_gen IS NULL", [(generation, i) for i in ids])

    def touch(self, entry_id: int, size: int, mtime: float) -> None:
        """Record a new size/mtime for a file whose content is unchanged (a cache hint, not versioned)."""
        with self.db:
            self.db.execute("UPDATE images SET size = ?, mtime = ? WHERE id = ?", (size, mtime, entry_id))

    def live_ids(self, generation: int) -> np.ndarray:
        rows = self.db.execute(f"SELECT id FROM images WHERE {VISIBLE}", {"gen": generation}).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def entries(self, ids, generation: int) -> dict[int, ImageEntry]:
        ids = [int(i) for i in ids]
        found: dict[int, ImageEntry] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(
                f"SELECT id, path, attribute, sha256, size, mtime FROM images WHERE id IN ({marks}) "
                "AND added_gen <= ? AND (removed_gen IS NULL OR removed_gen > ?)",
                [*chunk, generation, generation],
            ):
                found[row[0]] = ImageEntry(*row)
        return found

    def by_path(self, generation: int, prefix: str | None = None) -> dict[str, ImageEntry]:
        """Visible entries keyed by path, optionally only those at or below a path prefix."""
        sql = f"SELECT id, path, attribute, sha256, size, mtime FROM images WHERE {VISIBLE}"
        args: dict = {"gen": generation}
        if prefix is not None:
            sql += " AND (path = :p OR substr(path, 1, length(:d)) = :d)"
            args.update(p=prefix, d=prefix.rstrip("/") + "/")
        return {row[1]: ImageEntry(*row) for row in self.db.execute(sql, args)}

    def row_with_sha(self, sha256: str) -> int | None:
        """Any stored vector row for this content, live or retired: the content-hash cache."""
        row = self.db.execute("SELECT id FROM images WHERE sha256 = ? ORDER BY id DESC LIMIT 1", (sha256,)).fetchone()
        return None if row is None else int(row[0])

    def attribute_counts(self, generation: int) -> dict[str, int]:
        rows = self.db.execute(f"SELECT COALESCE(attribute, ''), COUNT(*) FROM images WHERE {VISIBLE} GROUP BY 1 ORDER BY 1", {"gen": generation})
        return {a or "(none)": n for a, n in rows}


class WriterLock:
    """An exclusive advisory lock (flock) on INDEX_DIR/writer.lock; a second writer is refused, not queued."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / "writer.lock"
        self._file = None

    def acquire(self) -> "WriterLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise LookalikeError(
                f"{self.directory} is being updated by another lookalike process (pid {holder}); "
                "wait for it to finish, then run the command again (one writer at a time keeps the catalog "
                "and the vector index consistent; searching is allowed meanwhile)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
