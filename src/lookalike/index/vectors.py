"""Vector storage: the raw embeddings on disk, and the FAISS index kinds that search them.

Raw embeddings live in one append-only float32 file, memory-mapped, so exact re-ranking and the
un-indexed tail are read from the page cache rather than held in RAM. Row r of that file is the
FAISS id and the catalog id of the same image. The FAISS index is derived data: it searches the
metric's L2 search space (see metric.py) and can always be rebuilt from the raw rows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import faiss
import numpy as np

from ..errors import LookalikeError

KINDS = ("flat", "hnsw", "ivfpq")

#: Catalogs below this size are searched exactly; above it approximately (HNSW, then IVF-PQ).
EXACT_BELOW = 50_000
#: Above this size HNSW's memory (reduced vectors + graph in RAM) gives way to IVF-PQ's compact codes.
HNSW_BELOW = 2_000_000
#: IVF-PQ needs this many vectors to train its 256-centroid product quantisers.
IVFPQ_MIN_TRAIN = 10_000

DEFAULT_PARAMS = {
    "pca_dim": 128,  # hnsw and ivfpq search PCA-reduced vectors; candidates are re-ranked exactly
    "hnsw_m": 32,  # graph degree
    "ef_construction": 80,
    "ef_search": 96,
    "nlist": 0,  # IVF cells; 0 = about 4 * sqrt(n)
    "pq_m": 64,  # 4-bit sub-quantisers per IVF-PQ code (fast-scan: code = pq_m / 2 bytes)
    "nprobe": 32,
    "rerank": 200,  # approximate candidates re-ranked by the exact distance
    "train_sample": 100_000,
}


def choose_kind(n: int) -> str:
    """Exact while brute force is cheap; HNSW while its graph fits comfortably in RAM; IVF-PQ beyond."""
    if n < EXACT_BELOW:
        return "flat"
    return "hnsw" if n < HNSW_BELOW else "ivfpq"


class RawVectors:
    """An append-only float32 matrix file; rows past the committed count are garbage from a crash."""

    def __init__(self, path: str | os.PathLike, dim: int):
        self.path = Path(path)
        self.dim = dim
        self.row_bytes = 4 * dim

    def truncate(self, rows: int) -> None:
        """Drop rows written by an update that never committed."""
        if self.path.exists() and self.path.stat().st_size != rows * self.row_bytes:
            os.truncate(self.path, rows * self.row_bytes)

    def append(self, committed_rows: int, X: np.ndarray) -> None:
        """Write X as rows committed_rows.. and flush them to disk (they are committed later, by the manifest)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise LookalikeError(f"vectors of shape {X.shape} do not match this index's dimension {self.dim}")
        self.truncate(committed_rows)
        with open(self.path, "ab") as f:
            f.write(X.tobytes())
            f.flush()
            os.fsync(f.fileno())

    def view(self, rows: int) -> np.ndarray:
        """A read-only (rows, dim) memory map of the committed rows."""
        if rows == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(rows, self.dim))


class AnnIndex:
    """One FAISS index over search-space vectors, with ids equal to raw rows."""

    def __init__(self, index: faiss.Index, kind: str):
        self.index = index
        self.kind = kind

    @classmethod
    def train(cls, kind: str, dim: int, sample: np.ndarray, n_expected: int, params: dict) -> "AnnIndex":
        """An empty index of `kind` over `dim`-d vectors, trained on `sample` when the kind needs it."""
        if kind not in KINDS:
            raise LookalikeError(f"unknown index kind '{kind}'; choose one of: auto, {', '.join(KINDS)}")
        p = {**DEFAULT_PARAMS, **params}
        # a PCA cannot output more dimensions than it has training vectors (a small catalog reindexed as hnsw)
        reduced = min(dim, int(p["pca_dim"]), max(len(sample), 1)) if p["pca_dim"] else dim
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
            nlist = int(p["nlist"]) or int(np.clip(4 * math.sqrt(n_expected), 16, len(sample) // 39))
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
            space.set_index_parameter(self.index, "nprobe", int(p["nprobe"]))
        threads = faiss.omp_get_max_threads()
        # FAISS parallelises over queries: for one or two of them, extra OpenMP threads only add wake-up costs.
        if len(queries) < 4:
            faiss.omp_set_num_threads(1)
        try:
            _, ids = self.index.search(_as_f32(queries), k)
        finally:
            faiss.omp_set_num_threads(threads)
        return ids

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


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
