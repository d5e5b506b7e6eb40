"""Caches shared by replicas: search responses (keyed by index generation) and query encodings.

The key holds the collection's generation, so a replica never reads results computed on a
generation other than the one it serves: a commit changes the generation, which is the
invalidation, and the TTL removes what is left behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from . import metrics
from .client import array_bytes, bytes_array
from .redis_link import RedisLink


class ResultCache:
    """Search results as JSON, keyed by the query (with its k resolved), the collection's incarnation and the
    generation searched (a collection dropped and created again restarts its generations), and how it was
    ranked: side records (`sieve evaluate`'s gate, trained exit heads) change results without a new generation."""

    def __init__(self, link: RedisLink, ttl_seconds: int):
        self.link = link
        self.ttl = ttl_seconds

    @staticmethod
    def key(query, generation: int, ranking: str = "", incarnation: int = 0) -> str:
        plain = json.dumps([dataclasses.asdict(query), ranking], sort_keys=True, ensure_ascii=False, default=str)
        digest = hashlib.sha256(plain.encode()).hexdigest()[:32]
        return f"sieve:result:{query.collection}:{incarnation}:{generation}:{digest}"

    async def get(self, key: str) -> dict | None:
        raw = await self.link.call("get", key)
        metrics.CACHE_REQUESTS.labels("result", "hit" if raw else "miss").inc()
        return json.loads(raw) if raw else None

    async def put(self, key: str, result: dict) -> None:
        await self.link.call("set", key, json.dumps(result, ensure_ascii=False), ex=self.ttl)


class EncodingCache:
    """Query encodings that are arrays (dense, multi-vector), stored as .npy bytes: no pickle from Redis; keyed by
    the collection's incarnation too, as a collection created again under its name may encode otherwise."""

    def __init__(self, link: RedisLink, ttl_seconds: int):
        self.link = link
        self.ttl = ttl_seconds

    @staticmethod
    def key(collection: str, retriever: str, text: str, incarnation: int = 0) -> str:
        digest = hashlib.sha256(text.encode()).hexdigest()[:32]
        return f"sieve:encoding:{collection}:{incarnation}:{retriever}:{digest}"

    async def get(self, key: str) -> np.ndarray | None:
        raw = await self.link.call("get", key)
        metrics.CACHE_REQUESTS.labels("encoding", "hit" if raw else "miss").inc()
        return bytes_array(raw) if raw else None

    async def put(self, key: str, array) -> None:
        if isinstance(array, np.ndarray):
            await self.link.call("set", key, array_bytes(array), ex=self.ttl)
