"""SciFact through the real gRPC server beside plain sentence-transformers + numpy, in one run.

    python -m bench.service [--dataset scifact] [--requests 300]

Measures: quality (nDCG@10, R@100) over gRPC vs the in-process peer; gRPC latency vs the same
search in-process (the overhead ratio); p50/p95/p99 and throughput at 1, 4 and 16 concurrent
clients; ingestion throughput vs raw SentenceTransformer.encode on the same passages.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer
from tqdm import tqdm

from sieve.index.collection import Collection
from sieve.index.encoders import resolve_encoder
from sieve.service.client import SieveClient
from sieve.service.process import ServerProcess

from .common import evaluate, load_corpus, load_queries, percentile, under_load, write_results

BATCH = 64


def run_of(responses: dict[str, list[tuple[str, float]]]) -> dict[str, dict[str, float]]:
    return {qid: {doc: float(score) for doc, score in hits} for qid, hits in responses.items()}


def latency_under_load(target: str, collection: str, queries: list[str], clients: int, requests: int,
                       retrievers: list[str]) -> dict:
    return under_load(target, clients, requests, lambda client, i: client.search(
        collection, queries[i % len(queries)], k=10, retrievers=retrievers, omit_text=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    parser.add_argument("--work", default=None, help="folder for the server's data (default: a temp folder)")
    args = parser.parse_args()

    docs = load_corpus(args.dataset)
    queries, qrels = load_queries(args.dataset)
    texts = [d.content for d in docs]
    work = Path(args.work or tempfile.mkdtemp(prefix="sieve-bench-"))

    # Ingestion through gRPC, every stage of the default collection (dense + BM25).
    server = ServerProcess(work / "data").start()
    client = SieveClient(server.target)
    client.create_collection(args.dataset, {"indexes": ["dense", "bm25"]})
    start = time.perf_counter()
    bar = tqdm(total=len(docs), unit="doc", desc="ingest over gRPC")
    for ack in client.upsert_stream(args.dataset, (docs[i:i + BATCH] for i in range(0, len(docs), BATCH))):
        bar.update(ack.upserted)
    bar.close()
    ingest_seconds = time.perf_counter() - start

    # The peer: plain sentence-transformers + numpy, same model, same passages, same batch size.
    model = SentenceTransformer(resolve_encoder(""), device="cpu")
    model.max_seq_length = 256
    start = time.perf_counter()
    doc_vectors = model.encode(texts, batch_size=BATCH, normalize_embeddings=True, show_progress_bar=True)
    encode_seconds = time.perf_counter() - start

    # Quality: gRPC (dense alone, and fused with BM25) vs the in-process peer. The same search
    # in-process (the collection the server wrote, opened read-only here) is timed right after each
    # gRPC call, so that load from elsewhere on the machine hits both alike.
    collection = Collection.open(work / "data" / args.dataset, read_only=True)
    qids, qtexts = list(queries), list(queries.values())
    grpc_runs: dict[str, dict] = {"dense": {}, "dense+bm25": {}}
    grpc_ms, local_ms = [], []
    for qid, text in tqdm(list(zip(qids, qtexts)), desc="queries over gRPC"):
        start = time.perf_counter()
        response = client.search(args.dataset, text, k=100, retrievers=["dense"], omit_text=True)
        grpc_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        collection.search({"dense": collection.encode_queries("dense", [text])[0]}, 100)
        local_ms.append((time.perf_counter() - start) * 1000)
        grpc_runs["dense"][qid] = [(h.id, h.score) for h in response.results]
        fused = client.search(args.dataset, text, k=100, omit_text=True)
        grpc_runs["dense+bm25"][qid] = [(h.id, h.score) for h in fused.results]
    query_vectors = model.encode(qtexts, batch_size=BATCH, normalize_embeddings=True)
    scores = query_vectors @ doc_vectors.T
    peer_run = {}
    for qid, row in zip(qids, scores):
        top = np.argsort(-row)[:100]
        peer_run[qid] = [(docs[i].id, row[i]) for i in top]

    load = [latency_under_load(server.target, args.dataset, qtexts, c, args.requests, ["dense", "bm25"])
            for c in (1, 4, 16)]
    stats = client.describe(args.dataset).stats
    client.close()
    server.stop()

    quality = {name: evaluate(run_of(run), qrels) for name, run in grpc_runs.items()}
    quality["peer: sentence-transformers + numpy (dense)"] = evaluate(run_of(peer_run), qrels)
    figures = {
        "dataset": args.dataset, "documents": len(docs), "queries": len(queries), "quality": quality,
        "latency_ms": {"grpc_p50": round(percentile(grpc_ms, 50), 2), "in_process_p50": round(percentile(local_ms, 50), 2),
                       "grpc_overhead_ratio": round(percentile(grpc_ms, 50) / percentile(local_ms, 50), 3)},
        "load": load,
        "ingestion": {"sieve_passages_per_s": round(len(docs) / ingest_seconds, 1),
                      "raw_encode_passages_per_s": round(len(docs) / encode_seconds, 1),
                      "ratio": round(encode_seconds / ingest_seconds, 3), "bytes_on_disk": stats.bytes_on_disk},
    }
    lines = [f"## Service benchmark: {args.dataset} ({len(docs)} documents, {len(queries)} queries)", "",
             "| run | nDCG@10 | R@100 |", "|---|---|---|"]
    lines += [f"| {name} | {q['nDCG@10']} | {q['R@100']} |" for name, q in quality.items()]
    lat = figures["latency_ms"]
    lines += ["", f"Single-client dense search p50: gRPC {lat['grpc_p50']} ms, in-process {lat['in_process_p50']} ms "
              f"(ratio {lat['grpc_overhead_ratio']}).", "",
              "| clients | requests | p50 ms | p95 ms | p99 ms | queries/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['throughput_qps']} |"
              for r in load]
    ing = figures["ingestion"]
    lines += ["", f"Ingestion (dense + BM25, over gRPC): {ing['sieve_passages_per_s']} passages/s; raw "
              f"SentenceTransformer.encode: {ing['raw_encode_passages_per_s']} passages/s; ratio {ing['ratio']}.", ""]
    write_results("service", figures, "\n".join(lines))


if __name__ == "__main__":
    main()
