"""Micro-batching: requests that arrive together share one model call.

Each request puts its item in a queue and awaits its own future. One collector task takes the queue
as soon as `max_batch` items wait, or `max_wait_s` after the oldest of them arrived, whichever comes
first, and hands them to `run` in one call; while that call runs, newcomers queue up for the next
batch. So batching adds at most `max_wait_s` to a request that finds the model idle, and none to one
that queued behind a running batch. A failed batch fails only its own requests; a request that gives
up (timeout, client gone) before its batch starts is left out of it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Gathers items submitted within a short window into one call of `run` (items in, results in the same order out).

    Belongs to the event loop it is first used on.
    """

    def __init__(self, run: Callable[[list[Item]], Awaitable[Sequence[Result]]], max_batch: int, max_wait_s: float):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be at least 1 and max_wait_s at least 0 (got {max_batch}, {max_wait_s})")
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: deque[tuple[float, Item, asyncio.Future]] = deque()
        self._arrived = asyncio.Event()
        self._collector: asyncio.Task | None = None

    async def submit(self, item: Item) -> Result:
        """The result for `item`, computed in a batch with the items submitted around the same time."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((loop.time(), item, future))
        self._arrived.set()
        if self._collector is None:
            self._collector = loop.create_task(self._collect())
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                deadline = self._queue[0][0] + self.max_wait_s
                while len(self._queue) < self.max_batch and (left := deadline - loop.time()) > 0:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
                batch = []
                while self._queue and len(batch) < self.max_batch:
                    _, item, future = self._queue.popleft()
                    if not future.done():  # its request gave up waiting
                        batch.append((item, future))
                if batch:
                    await self._run(batch)
        finally:
            self._collector = None  # no await since the queue was last seen empty: the next submit starts a new collector

    async def _run(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await self.run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(results)} results")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - handed to this batch's requests, which answer it; the next batch starts afresh
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        else:
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
