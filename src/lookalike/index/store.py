"""An image index on disk: manifest + SQLite catalog + raw vectors + FAISS index, kept consistent.

Layout of INDEX_DIR:
    manifest.json          the commit point: generation, ids handed out, vectors and FAISS files, metric
    catalog.sqlite         images, versioned by generation (catalog.py)
    vectors.f32            raw embeddings, append-only (vectors.py); after a compaction
                           vectors-<generation>.f32 + ids-<generation>.npy (the ids of its compacted rows)
    ann-<generation>.faiss the FAISS index over ids [0, ann.rows); newer ids are the "tail"
    writer.lock            flock'ed by the one process allowed to change the index

An update writes, in this order: new raw rows (fsync'ed), catalog rows tagged with generation G+1
(one SQLite transaction), a new FAISS file if the index is merged (temporary name, fsync, rename),
and last the manifest naming G+1 (temporary name, fsync, rename, fsync of the folder, so the commit
survives a power loss). A process that dies before the manifest is renamed leaves G as the current
state; the next writer truncates the raw rows, drops the G+1 catalog rows and deletes stray files. Readers pin the generation they opened and never
see a half-made update. Small additions go to the tail, searched exactly, so adding a few images
never rewrites a large FAISS file; the tail is merged into FAISS once it grows.

A compaction copies the live rows to a new vectors file (ids unchanged), commits it with the
manifest, then deletes the old file and the removed images' catalog rows. A reader keeps what it
pinned: its memory map of the old file outlives the deletion, and its catalog connection holds a
read snapshot (SQLite WAL) taken before it mapped the vectors, so it never loses a row it can see.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..errors import LookalikeError
from ..fileio import read_json, write_json
from ..progress import tqdm, write
from .catalog import Catalog, ImageEntry, NewImage, WriterLock
from .metric import IndexMetric
from .vectors import DEFAULT_PARAMS, KINDS, PLAIN_LAYOUT, TUNE_K, AnnIndex, IdRows, RawVectors, choose_kind, exact_neighbours

FORMAT = "lookalike.index/2"
#: Formats this version opens: /1 is /2 before any compaction (no "vectors" layout in the manifest).
READABLE = ("lookalike.index/1", FORMAT)
MANIFEST, CATALOG = "manifest.json", "catalog.sqlite"
OWN_FILES = (MANIFEST, CATALOG, CATALOG + "-wal", CATALOG + "-shm", CATALOG + "-journal")
VECTOR_FILE_PREFIXES = ("vectors", "ids-")


#: What the build-time tuning stores in the manifest's "ann" entry (kept across merges, redone by a rebuild).
TUNED = ("nprobe", "rerank", "recall")


def merge_threshold(ann_rows: int) -> int:
    """Tail rows (searched by brute force) tolerated before they are merged into the FAISS index."""
    return min(20_000, max(1_000, ann_rows // 50))


class ImageIndex:
    """Open with `ImageIndex.open(dir)` to search, `open(dir, writable=True)` or `create(...)` to change."""

    def __init__(self, directory: Path, manifest: dict, lock: WriterLock | None):
        self.directory = directory
        self.manifest = manifest
        self.metric = IndexMetric.from_dict(manifest["metric"])
        self.raw = RawVectors(directory, manifest["dim"], manifest.get("vectors"))
        self.catalog = Catalog(directory / CATALOG)
        self._lock = lock
        self._ann: AnnIndex | None = None
        self._ann_file: str | None = None
        self.alive = np.zeros(self.rows, dtype=bool)
        self._mapped: tuple[tuple[RawVectors, int], IdRows] | None = None  # ((file, rows), its id lookup) for vectors_of

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike,
        dim: int,
        metric: IndexMetric,
        backbone_fingerprint: str | None = None,
        kind: str = "auto",
        params: dict | None = None,
        run_dir: str | None = None,
        overwrite: bool = False,
    ) -> "ImageIndex":
        """A new, empty, writable index; an interrupted build with the same settings is resumed instead.

        An existing finished index is replaced only with overwrite=True.
        """
        if kind != "auto" and kind not in KINDS:
            raise LookalikeError(f"unknown index kind '{kind}'; choose one of: auto, {', '.join(KINDS)}", param="kind")
        unknown = set(params or {}) - set(DEFAULT_PARAMS)
        if unknown:
            raise LookalikeError(f"unknown index parameter(s) {sorted(unknown)}; known: {', '.join(DEFAULT_PARAMS)}")
        directory = Path(directory).expanduser().resolve()
        if directory.exists() and not directory.is_dir():
            raise LookalikeError(f"{directory} is a file; --out must be a folder for the index")
        lock = WriterLock(directory).acquire()
        try:
            foreign = [p.name for p in directory.iterdir() if not _is_own_file(p.name)]
            if foreign:
                raise LookalikeError(f"{directory} holds other files ({', '.join(sorted(foreign)[:3])}); choose an empty or new folder for the index")
            if (directory / MANIFEST).exists() and not overwrite:
                old = _read_manifest(directory)
                same = old["dim"] == dim and old["metric_fingerprint"] == metric.fingerprint() and old["backbone_fingerprint"] == backbone_fingerprint
                if old.get("building") and same and old["kind"] == kind:
                    index = cls(directory, old, lock)
                    index._recover()
                    index._load_state()
                    return index
                raise LookalikeError(f"{directory} already holds an index; use `lookalike index add` to update it, or pass --overwrite to rebuild it")
            for p in directory.iterdir():
                if p.name != "writer.lock":
                    p.unlink()
            now = time.time()
            manifest = {
                "format": FORMAT,
                "generation": 0,
                "rows": 0,
                "dim": int(dim),
                "kind": kind,
                "params": {**DEFAULT_PARAMS, **(params or {})},
                "metric": metric.to_dict(),
                "metric_fingerprint": metric.fingerprint(),
                "backbone_fingerprint": backbone_fingerprint,
                "run_dir": run_dir,
                "vectors": PLAIN_LAYOUT,
                "ann": None,
                "building": True,
                "created": now,
                "updated": now,
            }
            write_json(directory / MANIFEST, manifest, durable=True)
            return cls(directory, manifest, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(cls, directory: str | os.PathLike, writable: bool = False) -> "ImageIndex":
        """Open an index; a writer takes the lock and first repairs whatever a crashed writer left."""
        directory = Path(directory).expanduser().resolve()
        lock = WriterLock(directory).acquire() if writable and directory.is_dir() else None
        try:
            for _ in range(5):
                manifest = _read_manifest(directory)
                try:
                    index = cls(directory, manifest, lock)
                except FileNotFoundError:
                    continue  # a compaction deleted the ids file this manifest names (before any file was opened): read the new one
                if writable:
                    index._recover()
                try:
                    index._load_state()
                    return index
                except FileNotFoundError:
                    index.catalog.close()  # a writer replaced the vectors or FAISS file meanwhile: read the new manifest
            raise LookalikeError(f"{directory} keeps changing under this reader; try again")
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        self.catalog.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "ImageIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- state ---------------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def ann_rows(self) -> int:
        return int(self.manifest["ann"]["rows"]) if self.manifest["ann"] else 0

    @property
    def ann(self) -> AnnIndex | None:
        return self._ann

    @property
    def size(self) -> int:
        return int(self.alive.sum())

    @property
    def params(self) -> dict:
        """The index parameters (defaults for keys an older manifest lacks)."""
        return {**DEFAULT_PARAMS, **self.manifest["params"]}

    @property
    def search_params(self) -> dict:
        """The parameters a search uses by default: the index's, with the nprobe and shortlist chosen at build time."""
        ann = self.manifest["ann"]
        return {**self.params, **{key: ann[key] for key in ("nprobe", "rerank") if ann and key in ann}}

    def vectors(self) -> IdRows:
        """The committed raw vectors, looked up by image id: `vectors()[ids]` (memory-mapped; removed images' rows
        stay until a compaction)."""
        return self.raw.view(self.rows)

    def vectors_of(self, ids) -> np.ndarray:
        """The raw vectors of these image ids, in order (a copy; the file is mapped once per file and size, not per call)."""
        if self._mapped is None or self._mapped[0][0] is not self.raw or self._mapped[0][1] != self.rows:
            self._mapped = ((self.raw, self.rows), self.vectors())
        return np.array(self._mapped[1][np.asarray(ids, dtype=np.int64)])

    def is_live(self, image_id: int) -> bool:
        """Whether the id is a catalogued image of this generation (read from the mask, no catalog query)."""
        return 0 <= image_id < len(self.alive) and bool(self.alive[image_id])

    @property
    def location(self) -> str:
        """Where the index is, as messages name it."""
        return f"the index at {self.directory}"

    def _load_state(self) -> None:
        if self._lock is None:
            self.catalog.pin()  # before mapping the vectors: a compaction deletes the file before the catalog rows
        self.alive = np.zeros(self.rows, dtype=bool)
        self.alive[self.catalog.live_ids(self.generation)] = True
        self.vectors()
        ann = self.manifest["ann"]
        if ann and ann["file"] != self._ann_file:
            self._ann = AnnIndex.load(self.directory / ann["file"], ann["kind"])
            self._ann_file = ann["file"]

    def _recover(self) -> None:
        """Roll back anything newer than the manifest, delete files it does not name, finish a compaction's clean-up."""
        self.catalog.rollback_to(self.generation)
        self.raw.truncate(self.rows)
        self._delete_unnamed_files()
        self.catalog.purge(self.manifest.get("compacted_gen", -1))

    def _delete_unnamed_files(self) -> None:
        """FAISS, vectors and temporary files the manifest does not name: a crashed update's, or superseded ones."""
        keep = self.raw.files | ({self.manifest["ann"]["file"]} if self.manifest["ann"] else set())
        for p in self.directory.iterdir():
            ours = p.name.startswith(("ann-", *VECTOR_FILE_PREFIXES)) or (p.name.startswith(".") and ".tmp" in p.name)
            if ours and p.name not in keep:
                p.unlink()

    def _require_writer(self) -> None:
        if self._lock is None:
            raise LookalikeError(f"{self.directory} was opened read-only; open it with writable=True to change it")

    def _publish(self, **changes) -> None:
        """Write the next manifest: the single step that makes an update visible."""
        manifest = {**self.manifest, "format": FORMAT, "vectors": self.raw.layout, **changes, "generation": self.generation + 1, "updated": time.time()}
        write_json(self.directory / MANIFEST, manifest, durable=True)
        self.manifest = manifest

    # ---- updates -------------------------------------------------------------------------------

    def add(self, images: list[NewImage], vectors: np.ndarray, replaced_ids: list[int] = ()) -> np.ndarray:
        """Catalogue `images` with their vectors (and retire `replaced_ids`) as one committed update."""
        self._require_writer()
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(images), self.dim):
            raise LookalikeError(f"got vectors of shape {vectors.shape} for {len(images)} images; this index stores {self.dim}-d vectors")
        self.metric.data_space(vectors)
        first, gen = self.rows, self.generation + 1
        self.raw.append(first, vectors)
        self.catalog.insert(first, gen, list(images), list(replaced_ids))
        self._publish(rows=first + len(images), ann=self._ann_after_removal(replaced_ids))
        self.alive = np.concatenate([self.alive, np.ones(len(images), dtype=bool)])
        self.alive[list(replaced_ids)] = False
        return np.arange(first, first + len(images), dtype=np.int64)

    def remove(self, ids) -> int:
        """Retire catalogue entries by id as one committed update; returns how many were live."""
        self._require_writer()
        ids = sorted({int(i) for i in ids if 0 <= int(i) < self.rows and self.alive[int(i)]})
        if ids:
            self.catalog.retire(ids, self.generation + 1)
            self._publish(ann=self._ann_after_removal(ids))
            self.alive[ids] = False
        return len(ids)

    def _ann_after_removal(self, ids) -> dict | None:
        ann = self.manifest["ann"]
        if not ann:
            return None
        stale = sum(1 for i in ids if i < ann["rows"])
        return {**ann, "tombstones": ann["tombstones"] + stale}

    def touch(self, entry_id: int, size: int, mtime: float) -> None:
        """Record a new size/mtime for a file whose content is unchanged."""
        self.catalog.touch(entry_id, size, mtime)

    def finish_build(self) -> None:
        """Mark a build complete: from now on `build` refuses to touch it and `add` updates it."""
        self._require_writer()
        if self.manifest.get("building"):
            self._publish(building=False)

    def reuse_vector(self, sha256: str) -> np.ndarray | None:
        """The stored vector of any image with this content (the content-hash cache)."""
        row = self.catalog.row_with_sha(sha256)
        return None if row is None or row >= self.rows else np.array(self.vectors()[row])

    def merge(self, force: bool = False, rebuild: bool = False, progress: bool = False) -> bool:
        """Fold the tail and removals into the FAISS index when worthwhile (or `force`d); rebuild it when its kind should change."""
        self._require_writer()
        ann = self.manifest["ann"]
        live = self.size
        kind = choose_kind(live) if self.manifest["kind"] == "auto" else self.manifest["kind"]
        tail = self.rows - self.ann_rows
        rebuild = rebuild or ann is None or ann["kind"] != kind or (kind == "hnsw" and ann["tombstones"] > 0.3 * max(self._ann.size, 1))
        if rebuild and live == 0:
            return False
        if not (force or rebuild or tail > merge_threshold(self.ann_rows) or (ann["tombstones"] > merge_threshold(self.ann_rows) and kind != "hnsw")):
            return False
        if rebuild:
            self._ann = self._train(kind, progress)
            self._add_rows(np.flatnonzero(self.alive), progress)
            tuned = self._tune(progress) if kind == "ivfpq" and not int(self.params["nprobe"]) else {}
        else:
            self._add_rows(self.ann_rows + np.flatnonzero(self.alive[self.ann_rows :]), progress)
            if self._ann.supports_removal:
                self._ann.remove(np.flatnonzero(~self.alive[: self.ann_rows]))
            tuned = {key: ann[key] for key in TUNED if key in ann}
        gen = self.generation + 1
        name = f"ann-{gen:06d}.faiss"
        self._ann.save(self.directory / name)
        tombstones = 0 if rebuild or self._ann.supports_removal else ann["tombstones"]
        old = ann["file"] if ann else None
        self._publish(ann={"kind": kind, "file": name, "rows": self.rows, "tombstones": tombstones, **tuned})
        self._ann_file = name
        if old:
            (self.directory / old).unlink(missing_ok=True)
        return True

    def compact(self, above: float | None = 0.0) -> bool:
        """Rewrite the stored vectors without removed images' rows when they are more than `above` of them
        (None: the index's `compact_above`).

        Ids, paths, attributes and search results stay the same. Crash-safe like any update: the new
        vectors file is written durably under a name the current manifest does not use, the next
        manifest adopts it, and only then are the old file and the removed images' catalog rows deleted
        (a writer that finds them later deletes them too).
        """
        self._require_writer()
        above = self.params["compact_above"] if above is None else above
        stored = self.raw.stored(self.rows)
        dead = stored - self.size
        if dead == 0 or dead <= above * stored:
            return False
        gen = self.generation + 1
        compacted = self.raw.compacted(gen, self.vectors(), np.flatnonzero(self.alive), self.rows)
        self._publish(vectors=compacted.layout, compacted_gen=gen)
        self.raw = compacted
        self._delete_unnamed_files()
        self.catalog.purge(gen)
        return True

    def reindex(self, kind: str | None = None, params: dict | None = None, progress: bool = False) -> None:
        """Rebuild the FAISS index from the stored vectors (another kind or parameters; drops tombstones)."""
        self._require_writer()
        kind = kind or self.manifest["kind"]
        if kind != "auto" and kind not in KINDS:
            raise LookalikeError(f"unknown index kind '{kind}'; choose one of: auto, {', '.join(KINDS)}", param="kind")
        unknown = set(params or {}) - set(DEFAULT_PARAMS)
        if unknown:
            raise LookalikeError(f"unknown index parameter(s) {sorted(unknown)}; known: {', '.join(DEFAULT_PARAMS)}")
        self._publish(kind=kind, params={**self.manifest["params"], **(params or {})})
        self.merge(rebuild=True, progress=progress)

    def _train(self, kind: str, progress: bool) -> AnnIndex:
        live = np.flatnonzero(self.alive)
        n_sample = min(len(live), int(self.manifest["params"]["train_sample"]))
        sample_rows = np.sort(np.random.default_rng(0).choice(live, n_sample, replace=False))
        sample = self.metric.data_space(self.vectors()[sample_rows])
        if progress and kind != "flat":
            write(f"Training the {kind} index on {n_sample:,} vectors")
        return AnnIndex.train(kind, sample.shape[1], sample, len(live), self.manifest["params"])

    def _tune(self, progress: bool) -> dict:
        """nprobe and shortlist chosen at build time (IVF-PQ): the cheapest whose exact re-ranked results reach
        `target_recall` at recall@TUNE_K, measured on catalog images searched as queries, each left out of its own results."""
        p = self.params
        live = np.flatnonzero(self.alive)
        own = np.sort(np.random.default_rng(1).choice(live, min(len(live), int(p["tune_queries"])), replace=False))
        X = self.vectors()
        queries = self.metric.query_space(X[own])
        chunks = ((ids, self.metric.data_space(X[ids])) for ids in np.array_split(live, max(1, len(live) // 50_000)))
        truth = exact_neighbours(queries, chunks, TUNE_K + 1)
        tuned = self._ann.tune(queries, truth, own, max(int(p["rerank"]), TUNE_K), float(p["target_recall"]))
        if progress:
            write(f"nprobe {tuned['nprobe']}, shortlist {tuned['rerank']}: recall@{TUNE_K} {tuned['recall']:.3f} on {len(own)} catalog images (target {p['target_recall']})")
        return {**tuned, "recall": round(tuned["recall"], 4)}

    def _add_rows(self, rows: np.ndarray, progress: bool, chunk: int = 50_000) -> None:
        X = self.vectors()
        for start in tqdm(range(0, len(rows), chunk), desc=f"Indexing ({self._ann.kind})", unit="chunk", disable=not progress or len(rows) <= chunk):
            ids = rows[start : start + chunk]
            self._ann.add(self.metric.data_space(X[ids]), ids)

    # ---- reading -------------------------------------------------------------------------------

    def entries(self, ids) -> dict[int, ImageEntry]:
        return self.catalog.entries(ids, self.generation)

    def entries_by_path(self, prefix: str | None = None) -> dict[str, ImageEntry]:
        return self.catalog.by_path(self.generation, prefix)

    def attribute_counts(self) -> dict[str, int]:
        """Images per attribute ("(none)": unlabelled), from the catalog alone: cheap enough to check a search with."""
        return self.catalog.attribute_counts(self.generation)

    @property
    def build_finished(self) -> bool:
        """False while a build that was interrupted has not been run again to its end."""
        return not self.manifest.get("building")

    def stats(self) -> dict:
        """What the index holds and how it is laid out, for `lookalike index stats`."""
        ann = self.manifest["ann"]
        stored = self.raw.stored(self.rows)
        files = {p.name: p.stat().st_size for p in sorted(self.directory.iterdir()) if p.is_file() and not p.name.startswith(".")}
        return {
            "directory": str(self.directory),
            "images": self.size,
            "build_finished": self.build_finished,
            "attributes": self.attribute_counts(),
            "dim": self.dim,
            "distance": self.metric.describe(),
            "kind_requested": self.manifest["kind"],
            "kind": ann["kind"] if ann else None,
            "indexed_rows": self.ann_rows,
            "tail_rows": self.rows - self.ann_rows,
            "tombstones": ann["tombstones"] if ann else 0,
            "vector_rows": stored,
            "dead_rows": stored - self.size,
            "dead_share": round((stored - self.size) / stored, 4) if stored else 0.0,
            "tuned": {key: ann[key] for key in TUNED if key in ann} if ann else {},
            "generation": self.generation,
            "backbone_fingerprint": self.manifest["backbone_fingerprint"],
            "run_dir": self.manifest["run_dir"],
            "params": self.manifest["params"],
            "files_bytes": files,
            "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.manifest["updated"])),
        }


def _is_own_file(name: str) -> bool:
    return name in OWN_FILES or name == "writer.lock" or name.startswith(("ann-", *VECTOR_FILE_PREFIXES)) or (name.startswith(".") and ".tmp" in name)


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        hint = " (an interrupted build? run `lookalike index build` again)" if (directory / CATALOG).exists() else ""
        raise LookalikeError(f"{directory} is not a lookalike index: no {MANIFEST}{hint}; create one with `lookalike index build`")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise LookalikeError(f"cannot read {path}: {e}") from None
    if manifest.get("format") not in READABLE:
        raise LookalikeError(f"{path} has format {manifest.get('format')!r}, this version of lookalike reads {' and '.join(READABLE)}")
    return manifest
