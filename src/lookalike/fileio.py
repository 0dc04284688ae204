"""Atomic file writes: outputs appear whole or not at all, never half-written, with the permissions `open()` would give."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np


_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (read from /proc where possible, since setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it into place only if the block succeeds.

    The file gets the mode `open()` would give a new file (0666 less the umask), not mkstemp's 0600.
    With `durable`, the file is fsync'ed before the rename and its folder after it, so the rename
    survives a power loss (used for commit points such as an index manifest).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        if durable:
            fsync_path(tmp_path)
        os.replace(tmp_path, path)
        if durable:
            fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), durable)


def write_json(path: str | os.PathLike, obj: Any, durable: bool = False) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", durable)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_npy(path: str | os.PathLike, array: np.ndarray, durable: bool = False) -> None:
    with atomic_path(path, suffix=".npy", durable=durable) as tmp:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """The array in a .npy file; with `mmap`, memory-mapped read-only (it stays readable if the file is deleted meanwhile)."""
    return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)


def open_regular(path: str | os.PathLike) -> IO[bytes]:
    """Open a regular file (symlinks followed) for reading; anything else raises OSError at once.

    The file is opened without blocking and checked on the open descriptor, so a FIFO never hangs
    the open, a device such as /dev/zero is never read forever, and a swap after a check cannot slip in.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a folder, FIFO or device); only plain files are read", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} as JSON")


def connect_sqlite(path: str | os.PathLike) -> sqlite3.Connection:
    """A connection in WAL mode that waits up to a minute for a lock: readers never block the writer, and several processes share the file."""
    db = sqlite3.connect(path, timeout=60)
    db.execute("PRAGMA journal_mode=WAL")
    return db
