"""`ImageIndex`: a searchable, growing catalog of images together with the model that embeds them.

The library's front door to the index. It pairs a store (the crash-safe folder of store.py:
manifest, SQLite catalog, raw vectors, FAISS; or a Milvus collection, milvus.py) with a SimilarityModel, so callers hand it images, not vectors:
build from a folder, search by photo, vector or catalog id, add and remove by path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..errors import LookalikeError
from ..results import Match
from .backends import IndexLocation, IndexStore, as_location
from .build import ModelEmbedder, absolute, check_model
from .ingest import IngestReport, ingest
from .metric import IndexMetric
from .search import search_vectors

if TYPE_CHECKING:
    from ..model import SimilarityModel


class ImageIndex:
    """A catalog of images you can search for lookalikes, grow and shrink without rebuilding.

    Parameters
    ----------
    store : IndexStore
        The opened index: a folder (FAISS) or a Milvus collection.
    model : SimilarityModel, optional
        Embeds query images and new catalog images; loaded from the folder the index records when omitted.

    Examples
    --------
    >>> index = ImageIndex.build("catalog/", model, "catalog.index")   # doctest: +SKIP
    >>> index.search("query.jpg", k=5)                               # doctest: +SKIP
    [Match(id=17, path='/data/catalog/dotted/a.jpg', attribute='dotted', distance=0.21, probability=0.97), ...]
    """

    def __init__(self, store: IndexStore, model: "SimilarityModel | None" = None):
        self.store = store
        self._given = model
        self._model: "SimilarityModel | None" = None  # the model, once checked against the index

    # ---- making and opening ------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        images: str | os.PathLike | Sequence[str | os.PathLike],
        model: "SimilarityModel | str | os.PathLike",
        path: str | os.PathLike | IndexLocation,
        kind: str = "auto",
        distance: str = "learned",
        overwrite: bool = False,
        progress: bool = True,
    ) -> "ImageIndex":
        """Embed every image of `images` (folders: a top sub-folder names the attribute) into a new index at `path`.

        Parameters
        ----------
        images : folder, file, or list of them
        model : SimilarityModel, or the path of a model or run folder
        path : path or IndexLocation
            The index folder to create, or ``IndexLocation.parse(name, "milvus", uri)`` for a Milvus
            collection; rerunning resumes an interrupted build.
        kind : {"auto", "flat", "hnsw", "ivfpq"}, or for Milvus {"auto", "flat", "hnsw", "diskann"}
            Index kind; "auto" picks by catalog size.
        distance : str
            "learned" (the model's distance) or a plain one ("l2", "cosine").
        overwrite : bool
            Replace an existing index at `path`.

        Returns
        -------
        ImageIndex
            Open for searching and changes; close it (or use ``with``) to release the writer lock.
        """
        model = _as_model(model)
        metric = IndexMetric.from_ranker(model.ranker_, distance)
        store = as_location(path).create(model.embedding_dim, metric, model.backbone_fingerprint, kind, run_dir=getattr(model, "source_", None), overwrite=overwrite)
        try:
            ingest(store, images, ModelEmbedder(model, progress), progress=progress)
            store.finish_build()
        except BaseException:
            store.close()
            raise
        return cls(store, model)

    @classmethod
    def open(cls, path: str | os.PathLike | IndexLocation, model: "SimilarityModel | str | os.PathLike | None" = None, writable: bool = False) -> "ImageIndex":
        """An existing index (a folder, or an IndexLocation); `writable` takes the writer lock (one writer at a time), needed by `add` and `remove`."""
        store = as_location(path).open(writable=writable)
        return cls(store, _as_model(model) if model is not None else None)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "ImageIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.store.size

    def __repr__(self) -> str:
        return f"ImageIndex({self.store.location!r}, {len(self)} images)"

    @property
    def model(self) -> "SimilarityModel":
        """The model that embeds images for this index: the one given, else the one the index records (checked once)."""
        if self._model is None:
            model = self._given or self._recorded_model()
            check_model(self.store, model, getattr(model, "source_", "the given model"))
            self._model = model
        return self._model

    def _recorded_model(self) -> "SimilarityModel":
        from ..model import SimilarityModel

        recorded = self.store.manifest.get("run_dir")
        if not recorded or not Path(recorded).is_dir():
            raise LookalikeError(
                f"{self.store.location} does not record a model folder that exists here ({recorded}); "
                "open it with the model it was built with: ImageIndex.open(path, model=...)"
            )
        return SimilarityModel.load(recorded)

    # ---- searching ---------------------------------------------------------------------------

    def search(
        self, query, k: int = 15, attribute: str | None = None, min_probability: float | None = None, keep_self: bool = False, params: dict | None = None
    ) -> list[Match]:
        """The `k` catalog images most alike to `query`, nearest first.

        Parameters
        ----------
        query : path, PIL image, (H, W, 3) uint8 array, embedding vector, or catalog id (int)
            A catalog image (by id, or by an unchanged path) is left out of its own results unless `keep_self`.
        k : int
            How many matches.
        attribute : str, optional
            Only matches of this attribute; the shortlist widens until it holds `k` of them or the whole catalog.
        min_probability : float, optional
            Only matches with at least this calibrated P(same attribute).
        params : dict, optional
            Search-time settings of approximate kinds: ``rerank``, ``ef_search`` (HNSW), ``nprobe`` (IVF-PQ).

        Returns
        -------
        list of Match
            ``id``, ``path``, ``attribute``, ``distance`` (lower = more alike), ``probability``.
        """
        return self.search_many([query], k, attribute, min_probability, keep_self, params)[0]

    def search_many(
        self, queries: Sequence, k: int = 15, attribute: str | None = None, min_probability: float | None = None, keep_self: bool = False, params: dict | None = None
    ) -> list[list[Match]]:
        """`search` for many queries; images among them are embedded in one batch."""
        self.check_search(k, attribute, min_probability, params)
        vectors, own = self.query_vectors(queries)
        return self._search(vectors, k, attribute, min_probability, None if keep_self else own, params)

    def check_search(self, k: int = 15, attribute: str | None = None, min_probability: float | None = None, params: dict | None = None) -> None:
        """Refuse, before any query is embedded, a search that cannot be answered as asked."""
        if k < 1:
            raise LookalikeError(f"k = {k}: ask for at least 1 match", param="k")
        if min_probability is not None and not 0 <= min_probability <= 1:
            raise LookalikeError(f"min_probability = {min_probability}: give a probability between 0 and 1", param="min_probability")
        for name, value in (params or {}).items():
            if name in ("rerank", "ef_search", "nprobe") and int(value) < 1:
                raise LookalikeError(f"{name} = {value}: give 1 or more (leave it out for the index's own setting)", param=name)
        if attribute is not None and attribute not in (known := self.store.attribute_counts()):
            raise LookalikeError(unknown_attribute(attribute, known), param="attribute")

    def search_vectors(
        self, vectors: np.ndarray, k: int = 15, attribute: str | None = None, min_probability: float | None = None,
        leave_out: Sequence[int | None] | None = None, params: dict | None = None,
    ) -> list[list[Match]]:
        """`search` for query vectors (rows); `leave_out[i]` is a catalog id query i must not match (its own)."""
        self.check_search(k, attribute, min_probability, params)
        return self._search(vectors, k, attribute, min_probability, leave_out, params)

    def _search(self, vectors, k: int, attribute: str | None, min_probability: float | None, leave_out, params: dict | None) -> list[list[Match]]:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        leave_out = leave_out if leave_out is not None else [None] * len(vectors)
        return [
            filtered_search(self.store, v, k, attribute, min_probability, exclude=None if i is None else [i], params=params)
            for v, i in zip(vectors, leave_out)
        ]

    def query_vectors(self, queries: Sequence, skipped: list | None = None) -> tuple[np.ndarray, list[int | None]]:
        """Each query's vector and catalog id (None when it is not a catalog image); catalog files are not embedded again.

        An unreadable query file raises BadImageError; with `skipped` it is listed there instead ({"path", "reason"})
        and left out, so the rows follow the readable queries.
        """
        store = self.store
        vectors = np.zeros((len(queries), store.dim), np.float32)
        own: list[int | None] = [None] * len(queries)
        to_embed = []
        for n, q in enumerate(queries):
            if isinstance(q, (int, np.integer)) and not isinstance(q, bool):
                if not store.entries([q]):
                    raise LookalikeError(f"no image with id {q} in the index")
                own[n] = int(q)
            elif isinstance(q, np.ndarray) and q.ndim == 1:
                if q.shape[0] != store.dim:
                    raise LookalikeError(f"query vector has {q.shape[0]} dimensions; this index stores {store.dim}-d vectors")
                vectors[n] = q
            elif isinstance(q, (str, os.PathLike)):
                path = absolute(q)
                entry = store.entries_by_path(path).get(path)
                st = os.stat(path) if os.path.exists(path) else None
                if entry is not None and st is not None and entry.size == st.st_size and entry.mtime == st.st_mtime:
                    own[n] = entry.id
                else:
                    to_embed.append(n)
            else:
                to_embed.append(n)
        stored = [n for n in range(len(queries)) if own[n] is not None]
        if stored:
            vectors[stored] = store.vectors_of([own[n] for n in stored])
        if to_embed:
            unreadable: list = []
            vectors[to_embed] = self.model.embed([queries[n] for n in to_embed], skipped=None if skipped is None else unreadable)
            if unreadable:
                skipped.extend(unreadable)
                bad, embedded = {s["path"] for s in unreadable}, set(to_embed)
                keep = [n for n in range(len(queries)) if n not in embedded or str(queries[n]) not in bad]
                return vectors[keep], [own[n] for n in keep]
        return vectors, own

    # ---- changing ----------------------------------------------------------------------------

    def add(self, images: str | os.PathLike | Sequence[str | os.PathLike], attribute: str | None = None, progress: bool = False) -> IngestReport:
        """Add new images and re-embed changed ones (files, or folders whose top sub-folder names the attribute).

        Unchanged files (same size and time, or same content) cost nothing. Needs ``open(..., writable=True)`` or `build`.
        """
        return ingest(self.store, images, ModelEmbedder(self.model, progress), progress=progress, attribute=attribute)

    def remove(self, images: Sequence[int | str | os.PathLike]) -> int:
        """Take images out by catalog id, or by path (a folder removes everything below it); returns how many went."""
        ids = []
        for item in images:
            if isinstance(item, (int, np.integer)):
                ids.append(int(item))
            else:
                ids += [e.id for e in self.store.entries_by_path(absolute(item)).values()]
        removed = self.store.remove(ids)
        self.store.merge()
        return removed

    def stats(self) -> dict:
        """What the index holds: images per attribute, kind, tail, tombstones, files and sizes."""
        return self.store.stats()


def unknown_attribute(attribute: str, known) -> str:
    """Why a search for `attribute` cannot match anything in a catalog whose attributes are `known`."""
    return f"no catalog image has the attribute {attribute!r}; known attributes: {', '.join(known) or 'none'}"


def filtered_search(
    store: IndexStore, vector: np.ndarray, k: int, attribute: str | None = None, min_probability: float | None = None, exclude=None, params: dict | None = None
) -> list[Match]:
    """Top-k matches of one vector, optionally of one attribute ("(none)": unlabelled) and above a probability.

    With an attribute the shortlist grows until it holds k such matches or the whole catalog.
    """
    if not store.size:
        return []
    wanted = None if attribute == "(none)" else attribute
    fetch = k if attribute is None else min(4 * k, store.size)
    while True:
        matches = search_vectors(store, vector, fetch, params, exclude_ids=exclude)[0]
        if attribute is not None:
            matches = [m for m in matches if m.attribute == wanted]
        if len(matches) >= k or attribute is None or fetch >= store.size:
            break
        fetch = min(4 * fetch, store.size)
    if min_probability is not None:
        matches = [m for m in matches if m.probability is None or m.probability >= min_probability]
    return matches[:k]


def _as_model(model):
    from ..model import SimilarityModel

    if isinstance(model, SimilarityModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return SimilarityModel.load(model)
    raise LookalikeError(f"model: expected a SimilarityModel or the path of a model or run folder, not {type(model).__name__}")
