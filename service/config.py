"""Server settings, from environment variables (SIEVE_*) and command-line flags."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    data: str = "./sieve-data"
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0  # 0: no Prometheus HTTP endpoint
    default_k: int = 10
    max_k: int = 1000
    max_query_chars: int = 2048
    max_batch_documents: int = 1024
    max_document_chars: int = 100_000
    max_message_bytes: int = 32 * 1024 * 1024
    max_rerank_passages: int = 500
    # query-passage pairs queued or running in the reranker; a request that would pass it gets
    # RESOURCE_EXHAUSTED at once (about a minute of work on 2 CPU cores) instead of its deadline
    max_queued_rerank_pairs: int = 2000
    max_pending_batches: int = 8  # ingestion batches being prepared at once; more get RESOURCE_EXHAUSTED
    max_concurrent_searches: int = 256
    batch_wait_ms: float = 2.0  # how long the query encoder waits to batch concurrent requests
    max_encode_batch: int = 64
    drain_seconds: float = 30.0
    # A read-only replica serves searches from an index volume that one writer updates, and picks up
    # each new generation by polling (see the README's deployment section).
    read_only: bool = False
    refresh_seconds: float = 2.0
    redis_url: str = ""
    redis_password: str = ""
    cache_ttl_seconds: int = 300
    queue_claim_idle_ms: int = 30_000  # a queue entry pending this long is taken over from its consumer
    api_keys_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    log_format: str = "text"
    otel_endpoint: str = ""

    @classmethod
    def from_env(cls, **overrides) -> "ServerConfig":
        """SIEVE_<FIELD> variables, then explicit overrides (flags that were given)."""
        values = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(f"SIEVE_{field.name.upper()}")
            if raw is not None:
                if isinstance(field.default, bool):
                    flag = raw.strip().lower()
                    if flag not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                        raise ValueError(f"SIEVE_{field.name.upper()}={raw!r} is not a boolean (true or false)")
                    values[field.name] = flag in ("1", "true", "yes", "on")
                else:
                    values[field.name] = type(field.default)(raw)
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)
