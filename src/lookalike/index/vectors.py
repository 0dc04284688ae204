"""Vector storage: the raw embeddings on disk, and the FAISS index kinds that search them.

Raw embeddings live in one append-only float32 file, memory-mapped, so exact re-ranking and the
un-indexed tail are read from the page cache rather than held in RAM. Rows are in image-id order
and looked up by id (the FAISS id and the catalog id of the same image), which a compaction keeps
while it drops removed images' rows. The FAISS index is derived data: it searches the metric's L2
search space (see metric.py) and can always be rebuilt from the raw rows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import faiss
import numpy as np

from ..errors import LookalikeError
from ..fileio import atomic_path, load_npy, save_npy

KINDS = ("flat", "hnsw", "ivfpq")

#: Catalogs below this size are searched exactly; above it approximately (HNSW, then IVF-PQ).
EXACT_BELOW = 50_000
#: Above this size HNSW's memory (reduced vectors + graph in RAM) gives way to IVF-PQ's compact codes.
HNSW_BELOW = 2_000_000
#: IVF-PQ needs this many vectors to train its 256-centroid product quantisers.
IVFPQ_MIN_TRAIN = 10_000
#: Rows copied per step when a compaction rewrites the vectors file.
COPY_CHUNK = 65_536

DEFAULT_PARAMS = {
    "pca_dim": 128,  # ivfpq searches PCA-reduced vectors; candidates are re-ranked exactly
    "hnsw_pca_dim": 48,  # the same for hnsw: a smaller graph that builds faster (measured in docs/index.md)
    "hnsw_m": 16,  # graph degree
    "ef_construction": 32,
    "ef_search": 96,
    "nlist": 0,  # IVF cells; 0 = about sqrt(n)
    "pq_m": 64,  # 4-bit sub-quantisers per IVF-PQ code (fast-scan: code = pq_m / 2 bytes)
    "nprobe": 0,  # IVF cells visited per query; 0 = the smallest reaching target_recall, chosen at build time
    "target_recall": 0.97,  # recall@15 the build-time choice aims for on catalog images (fresh queries score ~1-2 points lower)
    "tune_queries": 300,  # catalog images searched to measure that recall
    "rerank": 200,  # approximate candidates re-ranked by the exact distance
    "train_sample": 100_000,
    "compact_above": 0.25,  # `add` compacts the vectors file once removed images hold more than this share of it
}

#: The recall that target_recall refers to is recall@TUNE_K (the default --top of search and the service).
TUNE_K = 15


def choose_kind(n: int) -> str:
    """Exact while brute force is cheap; HNSW while its graph fits comfortably in RAM; IVF-PQ beyond."""
    if n < EXACT_BELOW:
        return "flat"
    return "hnsw" if n < HNSW_BELOW else "ivfpq"


#: The layout of an index that was never compacted: row r of vectors.f32 holds image id r.
PLAIN_LAYOUT = {"file": "vectors.f32", "ids": None, "appended_from": 0}


class RawVectors:
    """Raw float32 rows in an append-only file, in image-id order; rows past the committed count are garbage from a crash.

    Until the index is first compacted, row r holds image id r. A compaction writes the live rows to
    a new file and their ids to `ids-<G>.npy`; rows appended after it hold consecutive ids from
    `appended_from` on, so only the compacted rows need their ids stored.
    """

    def __init__(self, directory: str | os.PathLike, dim: int, layout: dict | None = None):
        self.directory = Path(directory)
        self.layout = dict(layout or PLAIN_LAYOUT)
        self.path = self.directory / self.layout["file"]
        self.dim = dim
        self.row_bytes = 4 * dim
        ids = self.layout["ids"]
        self.base_ids = np.zeros(0, np.int64) if ids is None else load_npy(self.directory / ids, mmap=True)
        self.appended_from = int(self.layout["appended_from"])
        self._map: np.ndarray | None = None

    @property
    def files(self) -> set[str]:
        """The file names this layout uses (a writer deletes any other vectors file)."""
        return {self.layout["file"]} | ({self.layout["ids"]} if self.layout["ids"] else set())

    def stored(self, next_id: int) -> int:
        """Rows on disk once ids [0, next_id) have been handed out."""
        return len(self.base_ids) + next_id - self.appended_from

    def truncate(self, next_id: int) -> None:
        """Drop rows written by an update that never committed."""
        size = self.stored(next_id) * self.row_bytes
        if self.path.exists() and self.path.stat().st_size != size:
            os.truncate(self.path, size)

    def append(self, next_id: int, X: np.ndarray) -> None:
        """Write X as the rows of ids next_id.. and flush them to disk (they are committed later, by the manifest)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise LookalikeError(f"vectors of shape {X.shape} do not match this index's dimension {self.dim}")
        self.truncate(next_id)
        with open(self.path, "ab") as f:
            f.write(X.tobytes())
            f.flush()
            os.fsync(f.fileno())

    def view(self, next_id: int) -> "IdRows":
        """The committed rows, looked up by image id; the file is mapped once per row count, so a reader
        keeps its rows even after a compaction deletes the file."""
        rows = self.stored(next_id)
        if self._map is None or len(self._map) != rows:
            self._map = np.zeros((0, self.dim), np.float32) if rows == 0 else np.memmap(self.path, dtype=np.float32, mode="r", shape=(rows, self.dim))
        return IdRows(self._map, self.base_ids, self.appended_from)

    def compacted(self, generation: int, rows: "IdRows", ids: np.ndarray, next_id: int) -> "RawVectors":
        """Copy the rows of `ids` (ascending) to a new file named for `generation`, durably; the manifest adopts it later."""
        layout = {"file": f"vectors-{generation:06d}.f32", "ids": f"ids-{generation:06d}.npy", "appended_from": int(next_id)}
        with atomic_path(self.directory / layout["file"], durable=True) as tmp, open(tmp, "wb") as f:
            for start in range(0, len(ids), COPY_CHUNK):
                f.write(np.ascontiguousarray(rows[ids[start : start + COPY_CHUNK]]).tobytes())
        save_npy(self.directory / layout["ids"], np.asarray(ids, dtype=np.int64), durable=True)
        return RawVectors(self.directory, self.dim, layout)


class IdRows:
    """Stored vectors looked up by image id: `rows[ids]` (ids stay fixed when a compaction moves rows)."""

    def __init__(self, matrix: np.ndarray, base_ids: np.ndarray, appended_from: int):
        self.matrix = matrix
        self.base_ids = base_ids
        self.appended_from = appended_from

    def __len__(self) -> int:
        return len(self.matrix)

    def __getitem__(self, ids) -> np.ndarray:
        return self.matrix[self.positions(ids)]

    @property
    def ids(self) -> np.ndarray:
        """The image id of each stored row, ascending."""
        return np.concatenate([self.base_ids, np.arange(self.appended_from, self.appended_from + len(self.matrix) - len(self.base_ids))])

    def positions(self, ids):
        """Row of each id; an id with no stored row (never added, or removed and compacted away) is an IndexError."""
        scalar = np.ndim(ids) == 0
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        pos = ids - self.appended_from + len(self.base_ids)
        old = ids < self.appended_from
        if old.any():
            found = np.minimum(np.searchsorted(self.base_ids, ids[old]), max(len(self.base_ids) - 1, 0))
            pos[old] = np.where(self.base_ids[found] == ids[old], found, -1) if len(self.base_ids) else -1
        bad = (pos < 0) | (pos >= len(self.matrix))
        if bad.any():
            raise IndexError(f"image id {int(ids[bad][0])} has no stored vector")
        return pos[0] if scalar else pos


class AnnIndex:
    """One FAISS index over search-space vectors, with ids equal to raw rows."""

    def __init__(self, index: faiss.Index, kind: str):
        self.index = index
        self.kind = kind

    @classmethod
    def train(cls, kind: str, dim: int, sample: np.ndarray, n_expected: int, params: dict) -> "AnnIndex":
        """An empty index of `kind` over `dim`-d vectors, trained on `sample` when the kind needs it."""
        if kind not in KINDS:
            raise LookalikeError(f"unknown index kind '{kind}'; choose one of: auto, {', '.join(KINDS)}", param="kind")
        p = {**DEFAULT_PARAMS, **params}
        # a PCA cannot output more dimensions than it has training vectors (a small catalog reindexed as hnsw)
        wanted = int(p["hnsw_pca_dim" if kind == "hnsw" else "pca_dim"])
        reduced = min(dim, wanted, max(len(sample), 1)) if wanted else dim
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        elif kind == "hnsw":
            graph = faiss.IndexHNSWFlat(reduced, int(p["hnsw_m"]))
            graph.hnsw.efConstruction = int(p["ef_construction"])
            inner = faiss.IndexPreTransform(faiss.PCAMatrix(dim, reduced), graph) if reduced < dim else graph
            index = faiss.IndexIDMap2(inner)
            if reduced < dim:
                index.train(_as_f32(sample))
        else:
            if len(sample) < IVFPQ_MIN_TRAIN:
                raise LookalikeError(
                    f"IVF-PQ needs at least {IVFPQ_MIN_TRAIN:,} images to train, this catalog has {len(sample):,}; "
                    "use --kind flat (exact) or --kind hnsw"
                )
            nlist = int(p["nlist"]) or int(np.clip(math.sqrt(n_expected), 16, len(sample) // 39))
            m = int(p["pq_m"])
            if reduced % m:
                raise LookalikeError(f"pq_m={m} must divide the reduced dimension {reduced}")
            pre = f"PCA{reduced}," if reduced < dim else ""
            index = faiss.index_factory(dim, f"{pre}IVF{nlist},PQ{m}x4fs", faiss.METRIC_L2)
            index.train(_as_f32(sample))
        return cls(index, kind)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    @property
    def supports_removal(self) -> bool:
        """HNSW graphs cannot drop nodes; their removed rows stay as tombstones filtered at query time."""
        return self.kind != "hnsw"

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(_as_f32(vectors), np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if self.supports_removal and len(ids):
            self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int, params: dict) -> np.ndarray:
        """Ids (n, k) of the nearest search-space vectors; -1 pads missing results."""
        p = {**DEFAULT_PARAMS, **params}
        space = faiss.ParameterSpace()
        if self.kind == "hnsw":
            space.set_index_parameter(self.index, "efSearch", max(int(p["ef_search"]), k))
        elif self.kind == "ivfpq":
            space.set_index_parameter(self.index, "nprobe", max(int(p["nprobe"]), 1))
        threads = faiss.omp_get_max_threads()
        # FAISS parallelises over queries: for one or two of them, extra OpenMP threads only add wake-up costs.
        if len(queries) < 4:
            faiss.omp_set_num_threads(1)
        try:
            _, ids = self.index.search(_as_f32(queries), k)
        finally:
            faiss.omp_set_num_threads(threads)
        return ids

    def tune(self, queries: np.ndarray, truth: np.ndarray, own: np.ndarray, rerank: int, target: float) -> dict:
        """IVF-PQ: the shortlist size (`rerank`, from the given one up to 8x) and `nprobe` a search needs for `target` recall.

        The exact re-rank puts every true neighbour in the shortlist into the results, so the shortlist's
        recall is the search's. The shortest shortlist that reaches the target wins (each of its rows is
        a read of the raw vectors, from disk for catalogs past RAM), then the fewest cells visited.
        `truth` holds each query's exact nearest ids; `own` the query's own id, left out of both sides.
        """
        nlist = faiss.extract_index_ivf(self.index).nlist
        fetches = sorted({min(int(rerank * m), self.size) for m in (1, 1.5, 2, 3, 4, 6, 8)})
        probes = sorted({min(nlist, int(round(2 ** (e / 2)))) for e in range(2 * int(math.log2(nlist)) + 3)})
        best, last = None, -1.0
        for nprobe in probes:
            found = self.search(queries, fetches[-1] + 1, {"nprobe": nprobe})
            recalls = [_recall(found[:, : f + 1], truth, own) for f in fetches]
            reached = [(f, r) for f, r in zip(fetches, recalls) if r >= target]
            if reached and (best is None or reached[0][0] < best["rerank"]):
                best = {"nprobe": nprobe, "rerank": reached[0][0], "recall": reached[0][1]}
            if (best and best["rerank"] == fetches[0]) or recalls[-1] < last + 0.001:
                break  # nothing shorter to find, or more cells no longer help
            last = recalls[-1]
        return best or {"nprobe": nprobe, "rerank": fetches[-1], "recall": recalls[-1]}

    def save(self, path: Path) -> None:
        """Write to a temporary name, flush to disk, rename into place."""
        tmp = path.with_name(f".{path.name}.tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, kind: str) -> "AnnIndex":
        return cls(faiss.read_index(str(path)), kind)


def exact_neighbours(queries: np.ndarray, chunks, k: int) -> np.ndarray:
    """Ids (n, k) of the k nearest search-space vectors of each query, by brute force over (ids, vectors) chunks."""
    Q = np.asarray(queries, dtype=np.float32)
    best_d = np.full((len(Q), 0), np.inf, np.float32)
    best_i = np.zeros((len(Q), 0), np.int64)
    for ids, X in chunks:
        X = np.asarray(X, dtype=np.float32)
        d = np.concatenate([best_d, (X * X).sum(1) - 2.0 * (Q @ X.T)], axis=1)  # |q|^2 is the same for a query's candidates
        i = np.concatenate([best_i, np.broadcast_to(ids, (len(Q), len(ids)))], axis=1)
        keep = np.argpartition(d, min(k, d.shape[1]) - 1, axis=1)[:, :k]
        best_d, best_i = np.take_along_axis(d, keep, 1), np.take_along_axis(i, keep, 1)
    order = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def _recall(found: np.ndarray, truth: np.ndarray, own: np.ndarray) -> float:
    """Mean share of each query's first TUNE_K true neighbours (itself left out) among its found ids."""
    shares = []
    for f, t, q in zip(found, truth, own):
        t = t[(t != q) & (t >= 0)][:TUNE_K]
        shares.append(len(np.intersect1d(f, t)) / max(len(t), 1))
    return float(np.mean(shares))


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
