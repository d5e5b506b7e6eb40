"""Prometheus metrics. Every name here is referenced by deploy/ (dashboard and alerts); tests check it."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("sieve_requests_total", "RPCs handled, by method and status code", ["rpc", "code"])
REQUEST_SECONDS = Histogram("sieve_request_duration_seconds", "RPC latency", ["rpc"], buckets=LATENCY_BUCKETS)
STAGE_SECONDS = Histogram(
    "sieve_stage_duration_seconds", "Latency of one stage of a request: encode, each retriever, fusion, "
    "each reranker checkpoint", ["stage"], buckets=LATENCY_BUCKETS)
INFLIGHT = Gauge("sieve_inflight_requests", "RPCs being handled now")
READY = Gauge("sieve_ready", "1 while the server reports SERVING")

RERANK_SURVIVORS = Histogram(
    "sieve_rerank_survivors", "Candidates alive after each reranker checkpoint", ["checkpoint"],
    buckets=(1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 200, 500))

RERANK_REJECTED = Counter("sieve_rerank_rejected_total", "Rerank work refused because too many pairs were queued")

COLLECTION_DOCUMENTS = Gauge("sieve_collection_documents", "Live, searchable documents", ["collection"])
COLLECTION_DELETED = Gauge("sieve_collection_deleted", "Tombstones awaiting compaction", ["collection"])
COLLECTION_PRUNED = Gauge("sieve_collection_pruned", "Passages dropped by quality pruning", ["collection"])
COLLECTION_BYTES = Gauge("sieve_collection_bytes", "Bytes on disk", ["collection"])
COLLECTION_GENERATION = Gauge("sieve_collection_generation", "Index generation served (replicas lag the writer)",
                              ["collection"])
COLLECTION_DEGRADED = Gauge(
    "sieve_collection_degraded", "1 while a collection serves an older generation or none (damaged files): writes "
    "are refused until `sieve collections repair`", ["collection"])
COLLECTION_HOUSEKEEPING_FAILURES = Gauge(
    "sieve_collection_housekeeping_failures", "Cleanups and compactions after a commit that failed since the "
    "collection was opened (the commits stood; the next write retries)", ["collection"])
COLLECTION_VECTORS = Gauge(
    "sieve_collection_vectors", "Stored vectors per index, before and after token pooling",
    ["collection", "index", "stage"])

INGESTED = Counter("sieve_ingested_documents_total", "Documents committed (indexed or pruned)", ["collection"])
INGEST_REJECTED = Counter("sieve_ingest_rejected_batches_total", "Batches refused", ["reason"])
INGEST_LAG_ENTRIES = Gauge("sieve_ingest_lag_entries", "Queue entries not yet acknowledged", ["stream"])
INGEST_OLDEST_SECONDS = Gauge("sieve_ingest_oldest_pending_seconds", "Age of the oldest unacknowledged entry",
                              ["stream"])

SHARD_SECONDS = Histogram("sieve_shard_request_duration_seconds", "Router: each call to a shard, by shard",
                          ["shard"], buckets=LATENCY_BUCKETS)
SHARD_FAILURES = Counter("sieve_shard_failures_total", "Router: calls to a shard that failed, by shard and code",
                         ["shard", "code"])
PARTIAL_RESPONSES = Counter("sieve_partial_responses_total", "Router: searches answered without every shard")
CACHE_REQUESTS = Counter("sieve_cache_requests_total", "Shared cache lookups", ["kind", "result"])
# Labelled so that it is exported only where Redis is configured.
CACHE_AVAILABLE = Gauge("sieve_cache_available", "1 while Redis answers", ["backend"])
GPU_MEMORY_BYTES = Gauge("sieve_gpu_memory_bytes", "GPU memory allocated by torch", ["device"])


def record_health(name: str, degraded: bool, housekeeping_failures: int = 0) -> None:
    COLLECTION_DEGRADED.labels(name).set(1 if degraded else 0)
    COLLECTION_HOUSEKEEPING_FAILURES.labels(name).set(housekeeping_failures)


def record_collection(name: str, stats: dict) -> None:
    COLLECTION_DOCUMENTS.labels(name).set(stats["documents"])
    COLLECTION_DELETED.labels(name).set(stats["deleted"])
    COLLECTION_PRUNED.labels(name).set(stats["pruned"])
    COLLECTION_BYTES.labels(name).set(stats["bytes_on_disk"])
    COLLECTION_GENERATION.labels(name).set(stats["generation"])
    for index, details in stats["details"].items():
        for stage in ("raw", "stored"):
            key = f"vectors_{stage}" if f"vectors_{stage}" in details else "vectors"
            if key in details and details[key] is not None:
                COLLECTION_VECTORS.labels(name, index, stage).set(details[key])


def forget_collection(name: str) -> None:
    for gauge in (COLLECTION_DOCUMENTS, COLLECTION_DELETED, COLLECTION_PRUNED, COLLECTION_BYTES, COLLECTION_GENERATION,
                  COLLECTION_DEGRADED, COLLECTION_HOUSEKEEPING_FAILURES, COLLECTION_VECTORS):
        gauge.remove_by_labels({"collection": name})
