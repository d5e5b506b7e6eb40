"""Ingestion through a Redis Stream: at-least-once delivery, exactly-once effect (upserts by id).

Publishers (`sieve ingest --queue redis://...`) add one entry per batch. Each server consumes with
a consumer group and acknowledges an entry only after its batch is committed to the index; entries
left pending by a crashed consumer are claimed again after a while (XAUTOCLAIM). Entries that can
never be applied (unknown collection, invalid batch) move to a dead-letter stream with the reason.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Iterable

from sieve.index.documents import Document
from sieve.index.errors import CorruptIndex, ResourceExhausted, SieveError, Unavailable

from . import metrics
from .redis_link import RedisLink

log = logging.getLogger(__name__)

STREAM = "sieve:ingest"
DEAD_LETTERS = "sieve:ingest:dead"
GROUP = "sieve-indexers"
CLAIM_IDLE_MS = 30_000  # an entry unacknowledged this long belongs to a consumer that died


def publish(url: str, collection: str, batches: Iterable[list[Document]],
            password: str = "", max_backlog: int = 1000) -> int:
    """Add each batch to the stream; waits while the backlog is over `max_backlog` entries."""
    import redis

    client = redis.Redis.from_url(url, password=password or os.environ.get("SIEVE_REDIS_PASSWORD") or None)
    published = 0
    for batch in batches:
        while client.xlen(STREAM) >= max_backlog:  # backpressure: the indexers are behind
            time.sleep(0.5)
        payload = json.dumps([doc.to_json() for doc in batch], ensure_ascii=False)
        client.xadd(STREAM, {"collection": collection, "documents": payload})
        published += len(batch)
    return published


class QueueConsumer:
    """Runs inside the server that owns the index: read, commit through the engine, then acknowledge."""

    def __init__(self, engine, consumer: str | None = None, claim_idle_ms: int = CLAIM_IDLE_MS):
        self.link: RedisLink = engine.redis
        self.engine = engine
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        group_ready = False
        while not self._stopping.is_set():
            if not group_ready:
                group_ready = await self._ensure_group()
                if not group_ready:
                    await asyncio.sleep(1)
                    continue
            entries = await self._next_entries()
            if entries is None:  # Redis is down: wait, then carry on where we were
                group_ready = False
                await asyncio.sleep(1)
                continue
            for entry_id, fields in entries:
                await self._apply(entry_id, fields)
            await self._report_lag()

    def stop(self) -> None:
        self._stopping.set()

    async def _ensure_group(self) -> bool:
        try:
            await self.link.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except Exception as error:  # BUSYGROUP means it exists already
            if "BUSYGROUP" not in str(error):
                self.link.failed(error)
                return False
        self.link.succeeded()
        return True

    async def _next_entries(self):
        claimed = await self.link.call("xautoclaim", STREAM, GROUP, self.consumer, self.claim_idle_ms,
                                       start_id="0-0", count=8)
        if claimed is None:
            return None
        if claimed[1]:
            log.info("claimed %d entries left pending by a stopped consumer", len(claimed[1]))
            return claimed[1]
        read = await self.link.call("xreadgroup", GROUP, self.consumer, {STREAM: ">"}, count=1, block=500)
        if read is None:
            return None
        return [entry for _, entries in read for entry in entries]

    async def _apply(self, entry_id, fields) -> None:
        fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        try:
            name = fields["collection"].decode() if isinstance(fields["collection"], bytes) else fields["collection"]
            docs = [Document.from_json(d) for d in json.loads(fields["documents"])]
            await self.engine.upsert(name, docs)  # the same path, checks and limits as the Upsert RPC
        except (ResourceExhausted, Unavailable, CorruptIndex) as error:
            # A full disk, a failing volume, a collection awaiting repair: the batch is fine; retried later.
            log.error("queue entry %s not applied now (%s); it stays pending and will be retried", entry_id, error)
            return
        except (SieveError, KeyError, ValueError) as error:
            log.error("queue entry %s cannot be applied (%s); moved to %s", entry_id, error, DEAD_LETTERS)
            await self.link.call("xadd", DEAD_LETTERS, {**fields, "error": str(error), "entry": entry_id})
            metrics.INGEST_REJECTED.labels("dead_letter").inc()
        except Exception:  # e.g. a full disk: leave it pending; it is claimed again later
            log.exception("queue entry %s failed; it stays pending and will be retried", entry_id)
            return
        # Only now, with the batch committed (or dead-lettered), is the entry acknowledged.
        await self.link.call("xack", STREAM, GROUP, entry_id)

    async def _report_lag(self) -> None:
        summary = await self.link.call("xpending", STREAM, GROUP)
        groups = await self.link.call("xinfo_groups", STREAM)
        if summary is None or groups is None:
            return
        undelivered = next((g.get("lag") or 0 for g in groups if g["name"] in (GROUP, GROUP.encode())), 0)
        metrics.INGEST_LAG_ENTRIES.labels(STREAM).set(summary["pending"] + undelivered)
        oldest = summary.get("min")
        age = 0.0
        if oldest:
            oldest = oldest.decode() if isinstance(oldest, bytes) else oldest
            age = max(0.0, time.time() - int(oldest.split("-")[0]) / 1000)
        metrics.INGEST_OLDEST_SECONDS.labels(STREAM).set(age)
