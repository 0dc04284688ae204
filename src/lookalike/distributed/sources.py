"""Where images and shards live: a local folder, or any pyarrow/fsspec filesystem such as s3:// or gs://.

Only URI strings travel to Ray workers; each worker resolves them again, so no filesystem object
(and no credential) is ever serialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import LookalikeError
from ..fileio import open_regular
from ..images import is_image_file


@dataclass(frozen=True)
class ListedImage:
    """One image found by `list_images`: its URI, top sub-folder (the attribute), size and modification time."""

    uri: str
    attribute: str | None
    size: int
    mtime: float


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme (s3://, gs://, hdfs://...), false for a plain local path."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def resolve(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or a filesystem URI.

    pyarrow's own filesystems (local, s3, gs, hdfs) are used when they know the scheme, any
    other fsspec filesystem (e.g. az://, http://) through pyarrow's fsspec adapter.
    """
    import pyarrow.fs as pafs

    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError:  # pyarrow does not know the scheme (ArrowInvalid): try fsspec
        pass
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError:
        raise LookalikeError(f"{uri}: pyarrow has no filesystem for this scheme and fsspec is not installed; pip install fsspec (and its plugin for the scheme)") from None
    except (ValueError, OSError) as e:
        raise LookalikeError(f"{uri}: cannot open this filesystem ({e}); install the fsspec plugin for the scheme and check its credentials") from None
    return PyFileSystem(FSSpecHandler(fs)), path


def child_uri(base: str, path_in_fs: str, base_path: str) -> str:
    """The URI of `path_in_fs` (a path inside the filesystem of `base`, whose own path is `base_path`)."""
    if not is_remote(base):
        return path_in_fs
    rel = PurePosixPath(path_in_fs).relative_to(PurePosixPath(base_path))
    return base.rstrip("/") + ("/" + str(rel) if str(rel) != "." else "")


def list_images(root: str | os.PathLike) -> list[ListedImage]:
    """Every visible image below `root`, sorted by URI (the order the single-process path uses too)."""
    import pyarrow.fs as pafs

    root = str(root)
    fs, base = resolve(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise LookalikeError(f"{root} is not a folder; pass the folder (or bucket prefix) of images to embed")
    found = []
    for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if f.type != pafs.FileType.File:
            continue
        rel = PurePosixPath(f.path).relative_to(PurePosixPath(base)).parts
        if any(part.startswith(".") for part in rel) or not is_image_file(f.path):
            continue
        seconds, nanos = divmod(f.mtime_ns or 0, 1_000_000_000)
        mtime = seconds + nanos * 1e-9  # computed like os.stat's st_mtime, so `lookalike index add` sees the file as unchanged
        found.append(ListedImage(child_uri(root, f.path, base), rel[0] if len(rel) > 1 else None, int(f.size or 0), mtime))
    found.sort(key=lambda im: im.uri)
    return found


def read_bytes(uri: str) -> bytes:
    """The whole file, from local disk or a remote filesystem (raises OSError when it cannot be read)."""
    if not is_remote(uri):
        with open_regular(uri) as f:
            return f.read()
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return f.read()
