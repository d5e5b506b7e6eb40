"""One Redis connection for the cache and the ingestion queue, which notices when Redis is gone.

While Redis is down every call returns quickly (the cache is bypassed, the queue waits) and the
link tries again after a short cool-down, so a dead Redis never slows searches down.
"""
from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import metrics

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 2.0


class RedisLink:
    def __init__(self, url: str, password: str = "", connect_timeout: float = 0.5, timeout: float = 2.0):
        # rediss:// URLs use TLS; certificate options go in the URL's query (ssl_ca_certs=...).
        self.client = aioredis.from_url(url, password=password or None, socket_timeout=timeout,
                                        socket_connect_timeout=connect_timeout, health_check_interval=10)
        self.available = True
        self._down_since = 0.0
        metrics.CACHE_AVAILABLE.labels("redis").set(1)

    def usable(self) -> bool:
        return self.available or time.monotonic() - self._down_since > RETRY_AFTER_SECONDS

    def failed(self, error: Exception) -> None:
        if self.available:
            log.warning("redis unavailable (%s); cache bypassed, queue paused", error)
        self.available = False
        self._down_since = time.monotonic()
        metrics.CACHE_AVAILABLE.labels("redis").set(0)

    def succeeded(self) -> None:
        if not self.available:
            log.info("redis is back")
        self.available = True
        metrics.CACHE_AVAILABLE.labels("redis").set(1)

    async def call(self, method: str, *args, **kwargs):
        """Run one command; None (and the link marked down) if Redis does not answer."""
        if not self.usable():
            return None
        try:
            result = await getattr(self.client, method)(*args, **kwargs)
        except (RedisError, OSError) as error:
            self.failed(error)
            return None
        self.succeeded()
        return result

    async def close(self) -> None:
        await self.client.aclose()


__all__ = ["RedisLink", "RedisError"]
