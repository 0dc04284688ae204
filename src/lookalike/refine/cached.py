"""The fast CPU mode: run the frozen early blocks once per image view and keep their activations.

Activations are stored as float16 in SQLite, keyed by (image content hash, view number) in one file per
(backbone fingerprint, cut point, augmentation settings). Views do not depend on the split, so the five
splits of a run (and later runs) reuse each other's work; only the last blocks are trained per split.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from cachetools import LRUCache
from torch import nn

from ..errors import BadImageError, LookalikeError
from ..fileio import connect_sqlite, write_bytes
from ..prefetch import prefetch_map
from ..progress import tqdm
from .augment import ViewMaker


class ActivationCache:
    """(sha256, view) -> activation map; safe for several processes at once.

    Random views are stored as float16 (they only feed training); the centre view (0) as float32, so the
    embeddings computed from it equal what featurize computes from the image.
    Views once read stay in memory, up to `memory_mb` (least recently used first out): training asks for the
    same few per photo every epoch, and a stored view never changes (it is a function of its key).
    """

    def __init__(self, directory: str | os.PathLike, key: str, memory_mb: float = 512):
        self.path = Path(directory) / f"activations-{key}.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect_sqlite(self.path)
        self._read: LRUCache = LRUCache(maxsize=int(memory_mb * 2**20), getsizeof=lambda a: a.nbytes)
        self._db.execute("CREATE TABLE IF NOT EXISTS activations (sha256 TEXT, view INTEGER, dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (sha256, view))")

    def _select(self, columns: str, keys: Sequence[tuple[str, int]]) -> Iterator[tuple]:
        """Rows of `columns` for the stored (sha256, view) keys among `keys`, a few hundred keys per query."""
        for start in range(0, len(keys), 400):
            chunk = keys[start : start + 400]
            where = " OR ".join("(sha256 = ? AND view = ?)" for _ in chunk)
            yield from self._db.execute(f"SELECT {columns} FROM activations WHERE {where}", [x for k in chunk for x in k])

    def missing(self, keys: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        have = set(self._select("sha256, view", keys))
        return [k for k in keys if k not in have]

    def get_many(self, keys: Sequence[tuple[str, int]]) -> np.ndarray:
        """Stacked float32 activations in the order of `keys`."""
        found = {k: self._read[k] for k in keys if k in self._read}
        unread = list(dict.fromkeys(k for k in keys if k not in found))
        for digest, view, dtype, shape, blob in self._select("sha256, view, dtype, shape, data", unread):
            found[(digest, view)] = view_array = np.frombuffer(blob, dtype=np.dtype(dtype)).reshape([int(s) for s in shape.split(",")])
            if view_array.nbytes <= self._read.maxsize:  # one larger than the whole budget is read again when asked for
                self._read[(digest, view)] = view_array
        absent = [k for k in unread if k not in found]
        if absent:
            raise LookalikeError(f"activation cache {self.path} lacks {len(absent)} view(s) (e.g. {absent[0]}); delete the file and run refine again")
        return np.stack([found[k] for k in keys]).astype(np.float32)

    def put_many(self, items: dict[tuple[str, int], np.ndarray]) -> None:
        rows = []
        for (digest, view), a in items.items():
            dtype = "float32" if view == 0 else "float16"
            rows.append((digest, view, dtype, ",".join(map(str, a.shape)), np.ascontiguousarray(a, dtype=dtype).tobytes()))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO activations (sha256, view, dtype, shape, data) VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "ActivationCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def frozen_runner(frozen: nn.Module, input_size: int, model_dir: str | os.PathLike, key: str) -> Callable[[np.ndarray], np.ndarray]:
    """The frozen blocks as a batch function: ONNX Runtime when installed (several times faster on a CPU), else PyTorch."""
    frozen.eval()
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return _torch_runner(frozen)
    from ..features.engines import cpu_threads

    path = Path(model_dir) / "onnx" / f"frozen-{key}.onnx"
    if not path.exists():
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(frozen, (torch.zeros(2, 3, input_size, input_size),), buffer, dynamo=False, input_names=["images"],
                              output_names=["activations"], dynamic_axes={"images": {0: "batch"}, "activations": {0: "batch"}}, opset_version=17)
        write_bytes(path, buffer.getvalue())
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"images": np.ascontiguousarray(batch, dtype=np.float32)})[0]


def _torch_runner(frozen: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return frozen(torch.from_numpy(batch)).numpy()

    return run


def fill_cache(
    cache: ActivationCache,
    frozen: Callable[[np.ndarray], np.ndarray],
    views: ViewMaker,
    images: dict[str, str],
    wanted: Sequence[tuple[str, int]],
    batch_size: int,
    progress: bool = True,
    workers: int | None = None,
) -> int:
    """Compute and store every (sha256, view) in `wanted` that the cache lacks; `images` maps sha256 -> path.

    Returns how many views were computed.
    """
    todo = cache.missing(list(wanted))
    if not todo:
        return 0
    by_image: dict[str, list[int]] = {}
    for digest, view in todo:
        by_image.setdefault(digest, []).append(view)
    jobs = list(by_image.items())
    bar = tqdm(total=len(todo), desc="Caching frozen-block activations", unit="view", disable=not progress)
    pending: list[tuple[tuple[str, int], np.ndarray]] = []
    for digest, view, array in _decoded_views(views, images, jobs, workers):
        pending.append(((digest, view), array))
        if len(pending) >= batch_size:
            _run(cache, frozen, pending)
            bar.update(len(pending))
            pending = []
    if pending:
        _run(cache, frozen, pending)
        bar.update(len(pending))
    bar.close()
    return len(todo)


def _run(cache: ActivationCache, frozen: Callable[[np.ndarray], np.ndarray], batch: list[tuple[tuple[str, int], np.ndarray]]) -> None:
    out = frozen(np.stack([a for _, a in batch]))
    cache.put_many({key: act for (key, _), act in zip(batch, out)})


def _decoded_views(views: ViewMaker, images: dict[str, str], jobs: list[tuple[str, list[int]]], workers: int | None) -> Iterator[tuple[str, int, np.ndarray]]:
    """Decode each image once in a thread pool and yield its requested views, in job order."""

    def make(job: tuple[str, list[int]]):
        digest, wanted = job
        try:
            arrays = views.views(images[digest], digest, wanted)
        except BadImageError as e:
            raise LookalikeError(f"cannot read {e.path} for refinement ({e.reason}); prepare the run again, forced (its images changed after the scan)") from None
        return [(digest, v, a) for v, a in zip(wanted, arrays)]

    chunks = [jobs[i : i + 8] for i in range(0, len(jobs), 8)]
    for done in prefetch_map(make, chunks, workers or min(4, os.cpu_count() or 1)):
        for made in done:
            yield from made
