"""Server settings, from environment variables (SIEVE_*) and command-line flags."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass


class StartupError(Exception):
    """A file the server needs at start-up is missing or wrong: `sieve serve` exits 1 with this one line."""


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
    max_batch_searches: int = 64  # searches in one SearchBatch call
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
    # Which models a collection may name (encoder, reranker, term_weights): local folders only under these
    # directories (separated by ':'), Hugging Face hub names only when allowed. The packaged models always.
    model_roots: str = ""
    allow_hub_models: bool = False
    # Where snapshots may be copied to and restored from: fsspec URL prefixes separated by commas
    # (s3://backups/sieve/,file:///mnt/backups/); none: only the data directory's .snapshots/.
    snapshot_targets: str = ""
    # Where ImportSegments may read batch jobs' prebuilt segments (`sieve ingest --ray`): folders or fsspec
    # URL prefixes separated by commas; the data directory's .staging/ always.
    import_roots: str = ""
    # Router mode: the shards' addresses (host:port, comma-separated; name-{0..2}.service:50051 for a
    # StatefulSet). A router holds no data and serves every collection split over all of them.
    shards: str = ""
    shard_api_key: str = ""  # sent to the shards (a read-write key of theirs)
    shard_ca: str = ""  # PEM that signs the shards' certificates: calls them over TLS
    shard_timeout_seconds: float = 10.0  # a shard slower than this counts as down for that call

    def __post_init__(self):
        """Refuse settings that would only fail later, or never: a clear message at start-up instead."""
        at_least_one = ("default_k", "max_k", "max_query_chars", "max_batch_documents", "max_document_chars",
                        "max_message_bytes", "max_rerank_passages", "max_batch_searches", "max_queued_rerank_pairs",
                        "max_pending_batches", "max_concurrent_searches", "max_encode_batch", "queue_claim_idle_ms",
                        "cache_ttl_seconds")  # Redis refuses an expiry of 0 (and the link would be marked down)
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{_variable(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "drain_seconds", "shard_timeout_seconds"):
            if not 0 <= getattr(self, name) < float("inf"):  # also refuses NaN
                raise ValueError(f"{_variable(name)} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 < self.refresh_seconds < float("inf"):
            raise ValueError(f"{_variable('refresh_seconds')} must be above 0, got {self.refresh_seconds}")
        if not 1 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"ports must be in 1-65535 (SIEVE_METRICS_PORT: 0 for none), "
                             f"got {self.port} and {self.metrics_port}")
        if self.default_k > self.max_k:
            raise ValueError(f"SIEVE_DEFAULT_K ({self.default_k}) is above SIEVE_MAX_K ({self.max_k})")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"SIEVE_LOG_FORMAT must be text or json, got {self.log_format!r}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("set SIEVE_TLS_CERT and SIEVE_TLS_KEY together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("SIEVE_TLS_CLIENT_CA needs SIEVE_TLS_CERT and SIEVE_TLS_KEY")

    @classmethod
    def from_env(cls, **overrides) -> "ServerConfig":
        """SIEVE_<FIELD> variables, then explicit overrides (flags that were given)."""
        values = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(_variable(field.name))
            if raw is not None:
                if isinstance(field.default, bool):
                    flag = raw.strip().lower()
                    if flag not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                        raise ValueError(f"{_variable(field.name)}={raw!r} is not a boolean (true or false)")
                    values[field.name] = flag in ("1", "true", "yes", "on")
                else:
                    try:
                        values[field.name] = type(field.default)(raw)
                    except ValueError:
                        kind = {int: "an integer", float: "a number"}[type(field.default)]
                        raise ValueError(f"{_variable(field.name)}={raw!r} is not {kind}") from None
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)


def _variable(field: str) -> str:
    return f"SIEVE_{field.upper()}"
