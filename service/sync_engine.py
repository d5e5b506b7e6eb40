"""The engine for synchronous callers: scripts, notebooks, the CLI's `evaluate`, benchmarks and tests.

    with SyncEngine(data="./sieve-data") as engine:
        engine.create_collection("notes", {"indexes": ["dense", "bm25"]})
        engine.upsert("notes", [Document("a", "Oak trees drop acorns in autumn.")])
        hits = engine.search(SearchQuery("notes", "acorns")).hits

Every coroutine method of the engine, blocking: they run on the engine's own event loop in a background
thread, so micro-batching and the worker threads behave as in the server. With `shards=...` it is a
router over a sharded deployment instead (see service/router.py).
"""
from __future__ import annotations

import asyncio
import inspect
import threading

from .config import ServerConfig
from .engine import BaseEngine, make_engine


class SyncEngine:
    def __init__(self, config: ServerConfig | None = None, **settings):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sieve-engine", daemon=True)
        self._thread.start()
        try:
            self.engine: BaseEngine = self._run(self._start(config or ServerConfig(**settings)))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _start(config: ServerConfig) -> BaseEngine:
        engine = make_engine(config)  # made on its loop: the semaphore and batcher belong to it
        await engine.open()
        return engine

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __getattr__(self, name: str):
        if name == "engine":  # not made (yet)
            raise AttributeError(name)
        attribute = getattr(self.engine, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute
        return lambda *args, **kwargs: self._run(attribute(*args, **kwargs))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.engine.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *_) -> None:
        self.close()
