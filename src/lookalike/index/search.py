"""Query -> top-k catalogue matches, ranked by the exact distance.

FAISS proposes candidates (all of them exact for the flat kind, an over-fetched shortlist for HNSW
and IVF-PQ); the un-merged tail is scanned by brute force (a Milvus index proposes its own
shortlist with the raw vectors, see milvus.py); every candidate is then scored with
the exact distance in float64 from the raw vectors, so approximate kinds only ever lose recall,
never report a wrong distance, and removed images (HNSW tombstones) are filtered out.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import LookalikeError
from ..results import Match
from .backends import IndexStore
from .store import ImageIndex


def candidate_ids(index: ImageIndex, queries: np.ndarray, k: int, params: dict | None = None) -> list[np.ndarray]:
    """Per query, the live rows worth scoring exactly: FAISS's shortlist plus the whole tail."""
    p = {**index.search_params, **(params or {})}
    alive = index.alive
    tail = index.ann_rows + np.flatnonzero(alive[index.ann_rows :])
    ann = index.ann
    if ann is None or ann.size == 0:
        return [tail] * len(queries)
    want = k + 8 if ann.kind == "flat" else max(int(p["rerank"]), k)
    tombstones = index.manifest["ann"]["tombstones"]
    live_fraction = max((ann.size - tombstones) / ann.size, 0.05)
    fetch = min(ann.size, math.ceil(want / live_fraction))
    space = index.metric.query_space(queries)
    while True:
        found = [ids[(ids >= 0)] for ids in ann.search(space, fetch, p)]
        found = [ids[alive[ids]] for ids in found]
        # removed images crowding a query's neighbourhood must not cut its results short: fetch more
        if fetch >= ann.size or min(len(ids) for ids in found) >= min(want, index.size):
            break
        fetch = min(ann.size, fetch * 4)
    return [np.concatenate([ids, tail]) if len(tail) else ids for ids in found]


def search_vectors(index: IndexStore, queries, k: int = 15, params: dict | None = None, exclude_ids=None) -> list[list[Match]]:
    """Top-k matches for each query vector (rows of `queries`), nearest first."""
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.shape[1] != index.dim:
        raise LookalikeError(f"query vectors have dimension {queries.shape[1]}, this index stores {index.dim}-d vectors (built with another backbone?)")
    if k < 1:
        raise LookalikeError(f"k = {k}: ask for at least 1 match", param="k")
    exclude = set() if exclude_ids is None else {int(i) for i in exclude_ids}
    if isinstance(index, ImageIndex):
        X = index.vectors()
        shortlists = ((ids, X[ids]) for ids in map(np.unique, candidate_ids(index, queries, k + len(exclude), params)))
    else:
        shortlists = index.shortlists(queries, k + len(exclude), params)
    results = []
    for q, (cands, vectors) in zip(queries, shortlists):
        if exclude:
            keep = ~np.isin(cands, list(exclude))
            cands, vectors = cands[keep], vectors[keep]
        dist = index.metric.distance(q, vectors)
        order = np.lexsort((cands, dist))[:k]
        top_ids, top_dist = cands[order], dist[order]
        prob = index.metric.probability(top_dist)
        entries = index.entries(top_ids)
        results.append(
            [
                Match(int(i), entries[int(i)].path, entries[int(i)].attribute, float(d), None if prob is None else float(pr))
                for i, d, pr in zip(top_ids, top_dist, prob if prob is not None else [None] * len(top_ids))
            ]
        )
    return results
