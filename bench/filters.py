"""Filtered search on SciFact: exactly the top k of the matching documents, at a cost that falls with them.

    python -m bench.filters [--queries 100]

Synthetic metadata (a tenant of 1,000, uniformly drawn) gives filters of selectivity 0.1%, 1%, 10%
and 50% (`any` of 1, 10, 100, 500 tenants). For each retriever (dense exact, dense HNSW, BM25,
multi-vector) and selectivity, per query: the filtered search against brute force over the
matching subset (dense and BM25: the same scores; multi-vector: top-10 agreement with exact MaxSim
over the matching documents' stored vectors), that it returns min(k, matching), and its latency
paired with the unfiltered search. Then SearchBatch against the same searches one by one through a
real server, and snapshot and restore time and size. The dense vectors are mean token vectors (the
multi-vector cache's), which is what the checks need; quality is not measured here.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sieve.index.beir import cache_dir
from sieve.index.catalog import Catalog
from sieve.index.multivector import MultiVectorRetriever, maxsim
from sieve.index.settings import CollectionSettings

from .common import load_corpus, load_queries, mean_vector, prebuilt_collection, write_results
from .multivector import cached_pooled, cached_tokens

K = 10
SELECTIVITIES = (0.001, 0.01, 0.1, 0.5)
TENANTS = 1000


def tenant_filter(selectivity: float) -> dict:
    return {"must": [{"field": "tenant", "any": [f"t{i}" for i in range(max(1, round(TENANTS * selectivity)))]}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100)
    args = parser.parse_args()
    cache = cache_dir("mv")
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    corpus = [replace(d, metadata={"tenant": f"t{rng.integers(TENANTS)}"}) for d in load_corpus("scifact")]
    judged, _ = load_queries("scifact")
    qids = list(judged)[:args.queries]
    base = MultiVectorRetriever(CollectionSettings())
    tokens = cached_tokens(cache / "scifact-minilm-256-corpus.npz", [d.content for d in corpus], base, "corpus")
    query_tokens = cached_tokens(cache / "scifact-minilm-256-queries.npz", list(judged.values()), base, "queries")
    query_tokens = query_tokens[:args.queries]
    batch = cached_pooled(cache / "scifact-minilm-256-pool2.npz", tokens, MultiVectorRetriever(
        CollectionSettings(indexes=("multivector",), pool_factor=2)))
    dense = np.stack([mean_vector(t) for t in tokens])
    tenant = np.array([d.metadata["tenant"] for d in corpus])
    tenant_of = {d.id: d.metadata["tenant"] for d in corpus}

    work = Path(tempfile.mkdtemp(prefix="sieve-filters-"))
    filterable = {"tenant": "keyword"}
    exact = prebuilt_collection(work / "data" / "exact", CollectionSettings(
        indexes=("dense", "bm25", "multivector"), filterable=filterable), corpus, {"dense": dense, "multivector": batch})
    hnsw = prebuilt_collection(work / "data" / "hnsw", CollectionSettings(
        indexes=("dense",), exact_search_max=0, filterable=filterable), corpus, {"dense": dense})
    part = exact.snapshot.segments[0].parts["multivector"]
    stored = [part.decode(np.arange(part.offsets[i], part.offsets[i + 1])) for i in range(part.documents)]

    retrievers = {"dense exact": (exact, "dense"), "dense HNSW": (hnsw, "dense"), "bm25": (exact, "bm25"),
                  "multivector": (exact, "multivector")}
    rows = []
    for label, (collection, name) in retrievers.items():
        for selectivity in SELECTIVITIES:
            spec = tenant_filter(selectivity)
            admitted = set(spec["must"][0]["any"])
            allowed = np.flatnonzero(np.isin(tenant, list(admitted)))
            same, agreement, short, ratios, filtered_ms = 0, [], 0, [], []
            for qid, query_vectors in tqdm(list(zip(qids, query_tokens)), desc=f"{label} {selectivity:.1%}",
                                           mininterval=5):
                query = {"dense": mean_vector(query_vectors), "multivector": query_vectors,
                         "bm25": exact.encode_queries("bm25", [judged[qid]])[0]}[name]
                started = time.perf_counter()
                plain = collection.search({name: query}, K)
                plain_s = time.perf_counter() - started
                started = time.perf_counter()
                hits = collection.search({name: query}, K, filter=collection.filter(spec)).hits
                filtered_s = time.perf_counter() - started
                ratios.append(filtered_s / plain_s)
                filtered_ms.append(filtered_s * 1000)
                scores = np.array([h.score for h in hits])
                if name == "dense":
                    truth = np.sort(dense[allowed] @ query)[::-1][:K]
                elif name == "bm25":
                    everything = collection.search({name: query}, len(corpus)).hits  # unfiltered, every score
                    truth = np.array([h.score for h in everything if tenant_of[h.id] in admitted])[:K]
                else:
                    exact_scores = np.array([maxsim(query, stored[i], np.array([len(stored[i])]))[0] for i in allowed])
                    best = set(allowed[np.argsort(-exact_scores)[:K]].tolist())
                    rows_found = {exact.snapshot.id_map[h.id][1] for h in hits}
                    agreement.append(len(rows_found & best) / min(K, len(allowed)))
                    truth = None
                if truth is not None:
                    same += len(truth) == len(scores) and np.allclose(scores, truth, atol=1e-4)
                expected = min(K, len(allowed)) if name != "bm25" else len(truth)
                short += len(hits) < expected
            rows.append({
                "retriever": label, "selectivity": selectivity, "matching": int(len(allowed)),
                "exact_top_k": same / len(qids) if name != "multivector" else None,
                "top10_agreement_with_exact": float(np.mean(agreement)) if agreement else None,
                "searches_short_of_min_k_matching": short, "filtered_p50_ms": float(np.median(filtered_ms)),
                "p50_ratio_to_unfiltered": float(np.median(ratios)),
            })
            print(rows[-1], flush=True)

    snapshot_s = time.perf_counter()
    exact.copy_to(work / "snapshot")
    snapshot_s = time.perf_counter() - snapshot_s
    size = sum(p.stat().st_size for p in (work / "snapshot").rglob("*") if p.is_file())
    catalog = Catalog(work / "restored")
    restore_s = time.perf_counter()
    catalog.restore(work / "snapshot", "scifact")
    restore_s = time.perf_counter() - restore_s
    batch_figures = batch_throughput(work / "data", judged, qids)

    lines = ["# Filtered search (SciFact, 5,183 documents; synthetic tenants)", "",
             f"{len(qids)} queries, k={K}, one query at a time, 2 threads; exact top k = filtered scores equal "
             "brute force over the matching documents.", "",
             "| retriever | selectivity | matching | exact top k | top-10 = exact (multi-vector) | short of min(k, matching) "
             "| filtered p50 ms | p50 ratio to unfiltered (paired) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exact_share = f"{r['exact_top_k']:.3f}" if r["exact_top_k"] is not None else "-"
        agreement = f"{r['top10_agreement_with_exact']:.3f}" if r["top10_agreement_with_exact"] is not None else "-"
        lines.append(f"| {r['retriever']} | {r['selectivity']:.1%} | {r['matching']} | {exact_share} | {agreement} "
                     f"| {r['searches_short_of_min_k_matching']} | {r['filtered_p50_ms']:.1f} "
                     f"| {r['p50_ratio_to_unfiltered']:.2f} |")
    lines += ["", f"Snapshot of the collection (dense, BM25, multi-vector): {snapshot_s * 1000:.0f} ms, "
              f"{size / 1e6:.1f} MB (hard links: no new space on the volume); restore with full verification: "
              f"{restore_s * 1000:.0f} ms.", "",
              f"SearchBatch of {batch_figures['searches']} searches through a real server: "
              f"{batch_figures['batch_s'] * 1000:.0f} ms against {batch_figures['one_by_one_s'] * 1000:.0f} ms one by "
              f"one ({batch_figures['one_by_one_s'] / batch_figures['batch_s']:.2f}x the throughput).", ""]
    write_results("filters", {"rows": rows, "snapshot_seconds": snapshot_s, "snapshot_bytes": size,
                              "restore_seconds": restore_s, "batch": batch_figures}, "\n".join(lines))


def batch_throughput(data: Path, judged: dict, qids: list[str], searches: int = 32) -> dict:
    from sieve.service.client import SieveClient
    from sieve.service.process import ServerProcess
    from sieve.v1 import sieve_pb2 as pb

    server = ServerProcess(data).start()
    try:
        with SieveClient(server.target) as client:
            requests = [pb.SearchRequest(collection="exact", query=judged[q], k=K, retrievers=["dense", "bm25"],
                                         omit_text=True) for q in qids[:searches]]
            client.search_batch(requests[:4])  # warm-up: the query encoder loads
            started = time.perf_counter()
            for request in requests:
                client.search_stub.Search(request)
            one_by_one = time.perf_counter() - started
            started = time.perf_counter()
            client.search_batch(requests)
            batched = time.perf_counter() - started
    finally:
        server.stop()
    return {"searches": len(requests), "one_by_one_s": one_by_one, "batch_s": batched}


if __name__ == "__main__":
    main()
