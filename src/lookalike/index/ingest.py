"""Bring a folder into the index: embed only new or changed files, in committed chunks.

A file whose size and modification time match its catalogue entry is skipped without reading it;
otherwise it is hashed, and a file whose content (SHA-256) is already stored anywhere in the index
reuses that vector instead of running the network. Work is committed every `chunk_size` files, so
an interrupted run loses at most one chunk and the next run picks up where it stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from ..errors import LookalikeError
from ..fileio import sha256_file
from ..images import Skipped, scan_images, skipped_file
from ..progress import tqdm
from .backends import IndexStore
from .catalog import ImageEntry, NewImage


class Embedder(Protocol):
    """Turns image files into the index's vectors (SimilarityModel behind the CLI; anything in tests)."""

    fingerprint: str
    dim: int

    def embed(self, paths: list[str]) -> tuple[np.ndarray, list[str], list[dict]]:
        """(float32 (n, dim) vectors, the paths they belong to, [{"path", "reason"}] for files skipped)."""


@dataclass
class IngestReport:
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    reused_vectors: int = 0
    embedded: int = 0
    compacted: bool = False
    skipped: list[Skipped] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__}


def image_sources(sources: str | os.PathLike | Sequence[str | os.PathLike], attribute: str | None = None) -> list[tuple[str, str | None]]:
    """(absolute path, attribute) of each image file given and every image below each folder given.

    A folder's images take their top sub-folder as attribute unless `attribute` is given; files take `attribute`.
    """
    found = []
    for path in source_paths(sources):
        if path.is_dir():
            found += [(p, attribute if attribute is not None else a) for p, a in scan_images(path)]
        else:
            found.append((str(path), attribute))
    return found


def source_paths(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The absolute paths of image files or folders given, each checked to exist before any work starts."""
    paths = [Path(os.path.abspath(Path(source).expanduser())) for source in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
    for path in paths:
        if not (path.is_dir() or path.is_file()):
            raise LookalikeError(f"{path} does not exist; pass image files or folders of them")
    return paths


def ingest(
    index: IndexStore,
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    embedder: Embedder,
    chunk_size: int = 1024,
    progress: bool = True,
    attribute: str | None = None,
    compact_above: float | None = None,
) -> IngestReport:
    """Add or refresh the images of `sources` (see `image_sources`); then merge the FAISS index if the tail grew enough,
    and compact the stored vectors once removed or replaced images hold more than `compact_above` of them (default:
    the index's parameter)."""
    check_embedder(index, embedder)
    report = IngestReport()
    known = index.entries_by_path()
    candidates = []
    for path, attribute in image_sources(sources, attribute):
        try:
            st = os.stat(path)
        except OSError as e:
            report.skipped.append(skipped_file(path, e))
            continue
        entry = known.get(path)
        if entry is not None and entry.size == st.st_size and entry.mtime == st.st_mtime:
            report.unchanged += 1
        else:
            candidates.append((path, attribute, st.st_size, st.st_mtime))
    bar = tqdm(total=len(candidates), desc="Indexing images", unit="img", disable=not progress or not candidates)
    for start in range(0, len(candidates), chunk_size):
        _ingest_chunk(index, candidates[start : start + chunk_size], known, embedder, report)
        bar.update(min(chunk_size, len(candidates) - start))
    bar.close()
    index.merge(progress=progress)
    report.compacted = index.compact(compact_above)
    return report


def _ingest_chunk(index: IndexStore, chunk: list, known: dict, embedder: Embedder, report: IngestReport) -> None:
    pending: list[tuple[NewImage, np.ndarray | None]] = []
    for path, attribute, size, mtime in chunk:
        try:
            digest = sha256_file(path)
        except OSError as e:
            report.skipped.append(skipped_file(path, e))
            continue
        entry = known.get(path)
        if entry is not None and entry.sha256 == digest:
            index.touch(entry.id, size, mtime)
            report.unchanged += 1
            continue
        pending.append((NewImage(path, attribute, digest, size, mtime), index.reuse_vector(digest)))
    first_path = {}
    for im, vector in pending:
        if vector is None:
            first_path.setdefault(im.sha256, im.path)
    fresh: dict[str, np.ndarray] = {}
    if first_path:
        digest_of = {p: d for d, p in first_path.items()}
        feats, ok_paths, skipped = embedder.embed(list(first_path.values()))
        report.skipped.extend(skipped)
        fresh = {digest_of[str(p)]: v for p, v in zip(ok_paths, np.asarray(feats, dtype=np.float32))}
    images, vectors, replaced = [], [], []
    for im, vector in pending:
        if vector is None:
            vector = fresh.get(im.sha256)
            if vector is None:
                continue  # unreadable image, reported in skipped
        if first_path.get(im.sha256) == im.path:
            report.embedded += 1
        else:
            report.reused_vectors += 1
        old = known.get(im.path)
        if old is not None:
            replaced.append(old.id)
            report.changed += 1
        else:
            report.added += 1
        images.append(im)
        vectors.append(vector)
    if images:
        ids = index.add(images, np.stack(vectors), replaced)
        for im, i in zip(images, ids):
            known[im.path] = ImageEntry(int(i), im.path, im.attribute, im.sha256, im.size, im.mtime)


def check_embedder(index: IndexStore, embedder: Embedder) -> None:
    """Refuse to mix vectors from another backbone or dimension into an index."""
    if embedder.dim != index.dim:
        raise LookalikeError(
            f"the run embeds images as {embedder.dim}-d vectors but {index.location} holds {index.dim}-d vectors; "
            "use the run the index was built with, or build a new index"
        )
    expected = index.manifest["backbone_fingerprint"]
    if expected and embedder.fingerprint != expected:
        raise LookalikeError(
            f"the run's backbone (fingerprint {embedder.fingerprint}) is not the one {index.location} was built with "
            f"({expected}); its distances would be meaningless. Use the run given by `lookalike index stats`, or build a new index"
        )
