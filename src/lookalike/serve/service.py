"""The service's engine: the models that embed uploads and the index they are searched against.

CPU work (decoding, embedding, thumbnails) runs in a thread pool behind a semaphore, so the event
loop stays free and at most `max_concurrency` jobs compete for the cores; a request that cannot get
a slot, or whose job overruns, within `timeout_s` is answered 503 with Retry-After. Uploads are
decoded in parallel, each in its own job, and then embedded together: the uploads that arrive
within `batch_wait_ms` of each other (at most `max_batch`) share one model call (batching.py). The index is
used from one dedicated thread, because its SQLite connection belongs to the thread that opened
it; that thread reopens the index whenever its manifest changes (a write by this service or by
`lookalike index add`), so searches always see the last committed generation. Each reopened index
is checked against the service's model again: an index rebuilt in place with another run, or
being rebuilt, is answered 503 (also by /healthz) until the service is restarted with its model.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import mimetypes
import os
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from ..backbones import Preprocessor
from ..datatools.fusion import fuse_probabilities
from ..errors import BadImageError, LookalikeError
from ..features.extract import l2_normalize
from ..fileio import open_regular, write_bytes
from ..images import FORMAT_EXTENSIONS, open_image_bytes
from ..index.api import filtered_search, unknown_attribute
from ..index.backends import IndexLocation, IndexStore
from ..index.build import check_model
from ..index.catalog import ImageEntry, NewImage
from ..model import SimilarityModel
from ..results import Match, shown_distance
from .batching import MicroBatcher
from .errors import ApiError
from .settings import ServeSettings


@dataclass(frozen=True)
class Ranker:
    """A named model; the first one embeds queries for the index, the others only score /compare."""

    name: str
    model: SimilarityModel


@dataclass(frozen=True)
class Upload:
    """An uploaded image whose header has been checked: `name` labels it in messages, `size` is as uploaded."""

    data: bytes
    name: str
    filename: str
    format: str
    size: tuple[int, int]


@dataclass
class LoopState:
    """What the engine keeps per event loop (asyncio primitives belong to one): the model slots and the upload batcher."""

    slots: asyncio.Semaphore
    batcher: MicroBatcher[np.ndarray, np.ndarray]


def resolve_run_dir(index_dir: Path, recorded: str | None, override: Path | None) -> Path:
    """The run that embeds queries: --run if given, else the one the index records (absolute, or relative to cwd or the index)."""
    if override is not None:
        return Path(override).expanduser().resolve()
    if not recorded:
        raise LookalikeError(f"the index at {index_dir} does not record the run it was built with; pass --run RUN_DIR")
    path = Path(recorded).expanduser()
    for candidate in ([path] if path.is_absolute() else [Path.cwd() / path, index_dir / path, index_dir.parent / path]):
        if candidate.is_dir():
            return candidate.resolve()
    raise LookalikeError(f"the run {recorded} that built the index at {index_dir} is not there any more; pass --run RUN_DIR (the same model)")


class IndexAccess:
    """The index, used only from its own thread; reopened when an update commits (a new manifest, or Milvus state)."""

    def __init__(self, location: IndexLocation):
        self.location = location
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lookalike-index")
        self._index: IndexStore | None = None
        self._stamp: tuple | None = None
        self.attributes: dict[str, int] = {}
        self.check: Callable[[IndexStore], None] | None = None  # raises LookalikeError for an index the service's model cannot search

    def submit(self, fn: Callable, *args) -> Future:
        """Run fn(index, *args) on the index thread."""
        return self._thread.submit(lambda: fn(self._current(), *args))

    @property
    def stamp(self) -> tuple | None:
        """The version of the index the index thread searches now (read it there)."""
        return self._stamp

    def version_now(self) -> tuple | None:
        """The index's committed version where that is cheap enough to read on the event loop (a FAISS folder: one stat), else None."""
        if self.location.backend != "faiss":
            return None
        try:
            return self.location.version()
        except LookalikeError:
            return None  # the index thread gives the error

    def _current(self) -> IndexStore:
        try:
            stamp = self.location.version()
        except LookalikeError:
            if self._index is None:  # never opened: say what the path holds instead, not that the index went away
                self.location.open().close()
            raise
        if stamp != self._stamp:
            fresh = self.location.open()
            try:
                self._check(fresh)
            except ApiError:
                fresh.close()
                raise
            if self._index is not None:
                self._index.close()
            self._index, self._stamp = fresh, stamp
            self.attributes = fresh.attribute_counts()
        return self._index

    def _check(self, index: IndexStore) -> None:
        if index.manifest.get("building"):
            raise ApiError(503, "index_rebuilding", f"{index.location} is being rebuilt; retry when the build has finished", {"Retry-After": "30"})
        if self.check is not None:
            try:
                self.check(index)
            except LookalikeError as e:
                raise ApiError(
                    503, "model_mismatch", f"the index was rebuilt with another model since the service started ({e}); restart `lookalike serve` so that it loads that model"
                ) from None

    def close(self) -> None:
        def _close():
            if self._index is not None:
                self._index.close()
                self._index = None

        self._thread.submit(_close).result()
        self._thread.shutdown(wait=True)


class Service:
    """Everything a request needs besides HTTP: embedding, searching, scoring, thumbnails, catalog writes."""

    def __init__(self, settings: ServeSettings, extra_rankers: dict[str, Path] | None = None):
        self.settings = settings
        self.index = IndexAccess(settings.index_location)
        try:
            manifest = self.index.submit(lambda ix: ix.manifest).result()
        except ApiError as e:
            raise LookalikeError(e.detail) from None
        run_dir = resolve_run_dir(Path(self.index.location.name), manifest.get("run_dir"), settings.run_dir)
        model = SimilarityModel.load(run_dir)
        self.index.submit(check_model, model, run_dir).result()
        self.index.check = lambda index: check_model(index, model, run_dir)
        self.rankers = [Ranker(run_dir.name, model)] + [Ranker(name, SimilarityModel.load(path)) for name, path in (extra_rankers or {}).items()]
        self.model = model
        self.preprocessor = Preprocessor(model.backbone_.config)
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="lookalike-model")
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState] = weakref.WeakKeyDictionary()
        self.jobs_running = 0
        self._thumbnails = lru_cache(maxsize=settings.thumbnail_cache)(self._render_thumbnail)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.index.close()

    # ---- running work off the event loop -------------------------------------------------------

    def _loop_state(self) -> LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            batcher = MicroBatcher(self._embed_batch, self.settings.max_batch, self.settings.batch_wait_ms / 1000)
            state = self._loops[loop] = LoopState(asyncio.Semaphore(self.settings.max_concurrency), batcher)
        return state

    async def cpu(self, fn: Callable, *args):
        """Run fn in the model pool, at most max_concurrency at once, within the request timeout."""
        loop = asyncio.get_running_loop()
        slots = self._loop_state().slots
        timeout = self.settings.timeout_s
        start = time.monotonic()
        try:
            await asyncio.wait_for(slots.acquire(), timeout)
        except TimeoutError:
            raise self._busy("no model slot became free") from None
        self.jobs_running += 1
        job = loop.run_in_executor(self.pool, fn, *args)
        job.add_done_callback(lambda _: self._job_done(slots))  # the slot is held until the thread really finishes
        return await self._await(job, timeout - (time.monotonic() - start))

    def _job_done(self, slots: asyncio.Semaphore) -> None:
        self.jobs_running -= 1
        slots.release()

    async def on_index(self, fn: Callable, *args):
        """Run fn(index, *args) on the index thread, within the request timeout."""
        return await self._await(asyncio.wrap_future(self.index.submit(fn, *args)), self.settings.timeout_s)

    async def _await(self, job, timeout: float):
        try:
            return await asyncio.wait_for(asyncio.shield(job), max(timeout, 0.001))
        except TimeoutError:
            raise self._busy("the request took too long") from None

    def _busy(self, why: str) -> ApiError:
        return ApiError(
            503,
            "busy",
            f"{why} within the {self.settings.timeout_s:g} s limit ({self.settings.max_concurrency} model jobs at once); retry shortly",
            {"Retry-After": "1"},
        )

    async def embed(self, upload: Upload) -> np.ndarray:
        """Unit vector of an upload: decoded in a job of its own, then embedded in one batch with the uploads that arrive together."""
        start = time.monotonic()
        pixels = await self.cpu(self.preprocess, upload)
        left = self.settings.timeout_s - (time.monotonic() - start)
        try:
            return await asyncio.wait_for(self._loop_state().batcher.submit(pixels), max(left, 0.001))
        except asyncio.TimeoutError:
            raise self._busy("the request took too long") from None

    async def _embed_batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        return await self.cpu(self.embed_pixels, pixels)

    # ---- model work (pool threads) -------------------------------------------------------------

    def preprocess(self, upload: Upload) -> np.ndarray:
        """The model's input for an upload, decoded, resized and normalised as the index's files were."""
        return self.preprocessor.array(open_image_bytes(upload.data, upload.name, draft_size=self.preprocessor.size))

    def embed_pixels(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Unit vectors of preprocessed images, in one call of the model."""
        return l2_normalize(self.model.engine()(np.stack(pixels)))

    def compare(self, a: Upload, b: Upload) -> dict:
        """Distance and calibrated probability from every ranker, and their fusion."""
        images = {}
        scores = []
        for ranker in self.rankers:
            size = ranker.model.backbone_.config.input_size
            pair = images.setdefault(size, [open_image_bytes(u.data, u.name, draft_size=size) for u in (a, b)])
            va, vb = (ranker.model.embed_image(img) for img in pair)
            d = shown_distance(ranker.model.distance(va, vb)[0])
            scores.append({"name": ranker.name, "distance": d, "probability": float(ranker.model.probability(d))})
        fused = fuse_probabilities({s["name"]: s["probability"] for s in scores})
        return {**{k: scores[0][k] for k in ("distance", "probability")}, "rankers": scores, "fused_probability": float(fused)}

    def thumbnail(self, entry: ImageEntry) -> bytes:
        """JPEG thumbnail of the indexed content, cached while the file keeps its inode, size and modification and
        change times (a rewrite moves the change time even when a copy keeps the modification time).

        A file removed since is a 404 even when its thumbnail is cached; a file replaced is checked again.
        """
        try:
            st = os.stat(entry.path)
        except OSError:
            raise missing(entry) from None
        return self._thumbnails(entry, (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    def _render_thumbnail(self, entry: ImageEntry, file_identity: tuple[int, int, int, int]) -> bytes:
        """JPEG thumbnail of the indexed content; `file_identity` only keys the cache."""
        px = self.settings.thumbnail_px
        try:
            img = open_image_bytes(indexed_bytes(entry), entry.path, draft_size=px)
        except BadImageError as e:
            raise unreadable(entry, e) from None
        img.thumbnail((px, px))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, optimize=True)
        return buf.getvalue()

    # ---- index work (index thread) -------------------------------------------------------------

    def search(
        self, index: IndexStore, vector: np.ndarray, top: int, attribute: str | None, exclude: list[int], min_probability: float | None = None
    ) -> list[dict]:
        """Top matches, optionally of one attribute and at least `min_probability` likely to share the query's."""
        if attribute is not None and attribute not in self.index.attributes:
            raise ApiError(422, "unknown_attribute", unknown_attribute(attribute, self.index.attributes))
        rows = self._with_probability(index, vector, filtered_search(index, vector, top, attribute, exclude=exclude))
        return [r for r in rows if min_probability is None or r["probability"] >= min_probability]

    def similar(self, index: IndexStore, image_id: int, top: int, attribute: str | None, min_probability: float | None) -> list[dict]:
        """Top matches of a catalog image's stored vector, the image itself left out."""
        return self.search(index, self.vector_of(index, image_id), top, attribute, [image_id], min_probability)

    def _with_probability(self, index: IndexStore, vector: np.ndarray, matches: list[Match]) -> list[dict]:
        """Matches as dicts; an index ranked by a plain distance still reports the run's calibrated probability."""
        rows = [dict(vars(m)) for m in matches]  # Match's fields are flat: asdict's deep copy cost a tenth of a /similar answer
        missing = [r for r in rows if r["probability"] is None]
        if missing:
            X = index.vectors_of([r["id"] for r in missing])
            probs = self.model.probability(self.model.distance(vector, X))
            for r, p in zip(missing, probs):
                r["probability"] = float(p)
        return rows

    @staticmethod
    def entry(index: IndexStore, image_id: int) -> ImageEntry:
        found = index.entries([image_id]).get(image_id)
        if found is None:
            raise not_found(image_id)
        return found

    def vector_of(self, index: IndexStore, image_id: int) -> np.ndarray:
        """The stored vector of a catalog image; a FAISS index reads its liveness from its mask, not from a catalog query."""
        if not index.is_live(image_id):
            raise not_found(image_id)
        return index.vectors_of([image_id])[0]

    def stats(self, index: IndexStore) -> dict:
        return {"images": index.size, "attributes": dict(self.index.attributes), "distance": index.metric.describe(), "generation": index.generation}

    def add(self, _reader: IndexStore, uploads: list[Upload], vectors: np.ndarray, attribute: str | None) -> list[dict]:
        """Store the uploads (named by content hash) and catalogue the new ones in one committed update."""
        folder = self.settings.resolved_upload_dir()
        folder.mkdir(parents=True, exist_ok=True)
        paths = [str(folder / f"{hashlib.sha256(u.data).hexdigest()}{FORMAT_EXTENSIONS[u.format]}") for u in uploads]
        writer = self._open_writer()
        try:
            known = writer.entries_by_path(str(folder))
            fresh: dict[str, tuple[Upload, np.ndarray]] = {}
            for path, upload, vector in zip(paths, uploads, vectors):
                if path not in known:
                    fresh.setdefault(path, (upload, vector))
            ids: dict[str, int] = {}
            if fresh:
                for path, (upload, _) in fresh.items():
                    write_bytes(path, upload.data)
                images = [NewImage(p, attribute, Path(p).stem, os.stat(p).st_size, os.stat(p).st_mtime) for p in fresh]
                ids = dict(zip(fresh, writer.add(images, np.stack([v for _, v in fresh.values()])).tolist()))
                writer.merge()
            answers, added = [], set()
            for p, u in zip(paths, uploads):
                # the second copy of one image in the same request is not added again either
                answers.append({
                    "id": known[p].id if p in known else ids[p],
                    "name": u.filename,
                    "attribute": known[p].attribute if p in known else attribute,
                    "already_present": p in known or p in added,
                })
                added.add(p)
            return answers
        finally:
            writer.close()

    def remove(self, _reader: IndexStore, image_id: int) -> None:
        writer = self._open_writer()
        try:
            if not writer.remove([image_id]):
                raise not_found(image_id)
        finally:
            writer.close()

    def _open_writer(self) -> IndexStore:
        try:
            return self.index.location.open(writable=True)
        except LookalikeError:
            raise ApiError(409, "index_busy", "the index is being updated by another process; retry when it has finished", {"Retry-After": "5"}) from None

    @staticmethod
    def media_type(path: str) -> str:
        return mimetypes.guess_type(path)[0] or "application/octet-stream"


def indexed_bytes(entry: ImageEntry) -> bytes:
    """The entry's file, only while it still holds the content that was indexed; else a 404 that does not reveal where it was.

    A file replaced since indexing (by a symlink to /etc/passwd, another image, a FIFO) is never
    served: it must be a regular file of the indexed size and SHA-256, checked on the bytes sent.
    """
    try:
        with open_regular(entry.path) as f:
            if os.fstat(f.fileno()).st_size != entry.size:
                raise ApiError(404, "image_changed", changed_message(entry))
            data = f.read(entry.size + 1)
    except OSError:
        raise missing(entry) from None
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ApiError(404, "image_changed", changed_message(entry))
    return data


def missing(entry: ImageEntry) -> ApiError:
    return ApiError(404, "image_missing", f"catalog image {entry.id} is no longer available on the server")


def not_found(image_id: int) -> ApiError:
    return ApiError(404, "not_found", f"the catalog has no image with id {image_id}")


def changed_message(entry: ImageEntry) -> str:
    return f"catalog image {entry.id} has changed on the server since it was indexed; the catalog owner should run `lookalike index add` to refresh it"


def unreadable(entry: ImageEntry, e: BadImageError) -> ApiError:
    return ApiError(404, "image_missing", f"catalog image {entry.id} cannot be read on the server ({e.reason.split(' (')[0]})")
