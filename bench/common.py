"""What every benchmark shares: BEIR loading, evaluation with ir-measures, result files."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from sieve.index.beir import DATASETS, evaluate, load_judged_queries, per_query  # noqa: F401 (re-exported)
from sieve.index.documents import Document, read_jsonl

RESULTS = Path(__file__).resolve().parent / "results"


def load_corpus(name: str) -> list[Document]:
    return [d for d in read_jsonl(DATASETS / name / "corpus.jsonl") if isinstance(d, Document)]


def load_queries(name: str, split: str = "test"):
    return load_judged_queries(DATASETS / name, split)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def under_load(target: str, clients: int, requests: int, call) -> dict:
    """Latency percentiles and throughput of `requests` calls `call(client, i)` shared by `clients` threads,
    each with its own SieveClient (channel)."""
    from concurrent.futures import ThreadPoolExecutor

    from sieve.service.client import SieveClient

    latencies: list[float] = []

    def worker(offset: int) -> None:
        with SieveClient(target) as client:
            for i in range(offset, requests, clients):
                start = time.perf_counter()
                call(client, i)
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {"clients": clients, "requests": len(ms), "p50_ms": round(percentile(ms, 50), 2),
            "p95_ms": round(percentile(ms, 95), 2), "p99_ms": round(percentile(ms, 99), 2),
            "throughput_qps": round(len(ms) / elapsed, 2)}


def write_results(name: str, figures: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    figures = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "date": time.strftime("%Y-%m-%d %H:%M"), **figures}
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


def prebuilt_collection(folder: Path, settings, corpus: list[Document], encoded: dict):
    """A one-segment collection from encodings computed elsewhere (cached), through the real commit."""
    from sieve.index.collection import Collection, PreparedBatch

    collection = Collection.create(folder, settings)
    if "bm25" in settings.indexes:
        encoded = {**encoded, "bm25": collection.retrievers["bm25"].encode_documents(corpus)}
    collection.commit(PreparedBatch(corpus, len(corpus), encoded, None))
    return collection


def mean_vector(tokens):
    """A passage's normalised mean token vector: a stand-in dense vector for timing and filter checks
    (exact search costs the same for any vectors; it is not the model's sentence embedding)."""
    import numpy as np

    mean = tokens.mean(0)
    return (mean / np.linalg.norm(mean)).astype("float32")
