"""Micro-batching: concurrent requests that need the same model call share one forward pass.

The event loop only queues items and awaits futures; the model runs in a worker thread, so the
server keeps answering while it encodes (Infinity's batch handler, in a few lines).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Hashable


class MicroBatcher:
    def __init__(self, max_batch: int = 64, max_wait_ms: float = 2.0):
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self._pending: dict[Hashable, list[tuple[Any, asyncio.Future]]] = {}
        self._flushers: dict[Hashable, asyncio.Task] = {}

    async def submit(self, key: Hashable, function: Callable[[list], list], item: Any) -> Any:
        """Queue `item` for `function(items) -> results` with others of the same key; await its result."""
        future = asyncio.get_running_loop().create_future()
        queue = self._pending.setdefault(key, [])
        queue.append((item, future))
        if len(queue) >= self.max_batch:
            self._start(key, function)
        elif key not in self._flushers:
            self._flushers[key] = asyncio.create_task(self._flush_later(key, function))
        return await future

    async def _flush_later(self, key: Hashable, function: Callable) -> None:
        await asyncio.sleep(self.max_wait)
        self._flushers.pop(key, None)
        self._start(key, function)

    def _start(self, key: Hashable, function: Callable) -> None:
        batch = self._pending.pop(key, [])
        if batch:
            asyncio.create_task(self._run(function, batch))

    @staticmethod
    async def _run(function: Callable, batch: list) -> None:
        items = [item for item, _ in batch]
        try:
            results = await asyncio.to_thread(function, items)
        except Exception as error:  # every waiter of the batch sees the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
