"""Work on the next chunks in threads while the caller uses the current one (decoding ahead of the model)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch_map(fn: Callable[[T], R], chunks: Sequence[Sequence[T]], workers: int, ahead: int = 2) -> Iterator[list[R]]:
    """[fn(item) for item in chunk] for each chunk, in order, with the next `ahead` chunks already in the works.

    Threads suffice where `fn` releases the GIL (Pillow decoding and resizing do).
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.map(fn, chunk) for chunk in chunks[:ahead]]
        for n in range(len(chunks)):
            done = list(pending.pop(0))
            if n + ahead < len(chunks):
                pending.append(pool.map(fn, chunks[n + ahead]))
            yield done
