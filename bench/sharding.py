"""Sharded collections against one node holding the same documents, through real servers on loopback.

    python -m bench.sharding [--dataset scifact] [--shards 1,2,4] [--queries 300]

SciFact is encoded once (dense embeddings cached); the single-node collection and every shard's
collection are built from those encodings through the real commit, each shard holding the documents
the router's hash gives it. Per shard count: quality (nDCG@10, R@100 and top-10 agreement with one
node) for BM25, dense (exact) and their fusion; latency paired per query, router against one node,
interleaved query by query; resident memory of every process. Writes bench/results/sharding.{json,md}.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sieve.index.beir import cache_dir
from sieve.index.encoders import load_encoder
from sieve.index.settings import CollectionSettings
from sieve.service.client import SieveClient
from sieve.service.process import ServerProcess
from sieve.service.router import shard_of

from .common import evaluate, load_corpus, load_queries, percentile, prebuilt_collection, write_results

RETRIEVERS = {"bm25": ["bm25"], "dense": ["dense"], "fused": ["dense", "bm25"]}
SETTINGS = CollectionSettings(indexes=("dense", "bm25"), quality_estimator="none")


def resident_mb(process: ServerProcess) -> float:
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def embeddings(name: str, docs) -> np.ndarray:
    path = cache_dir("sharding") / f"{name}_dense.npy"
    if path.exists() and len(np.load(path, mmap_mode="r")) == len(docs):
        return np.load(path)
    vectors = load_encoder("").embed([d.content for d in docs], progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def build(folder: Path, docs, vectors: np.ndarray, name: str) -> None:
    prebuilt_collection(folder / name, SETTINGS, docs, {"dense": vectors}).close()


def run(client: SieveClient, name: str, texts: dict[str, str], retrievers: list[str]):
    """({qid: {id: score}}, top-10 ids per query, seconds per query)."""
    import time

    runs, tops, seconds = {}, {}, []
    for qid, text in texts.items():
        start = time.perf_counter()
        response = client.search(name, text, k=100, retrievers=retrievers, omit_text=True)
        seconds.append(time.perf_counter() - start)
        runs[qid] = {r.id: r.score for r in response.results}
        tops[qid] = [r.id for r in response.results[:10]]
    return runs, tops, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()

    docs = load_corpus(args.dataset)
    queries, qrels = load_queries(args.dataset)
    texts = dict(list(queries.items())[:args.queries])
    vectors = embeddings(args.dataset, docs)
    work = Path(tempfile.mkdtemp(prefix="sieve-sharding-"))
    build(work / "single", docs, vectors, args.dataset)
    single = ServerProcess(work / "single").start()
    figures = {"dataset": args.dataset, "documents": len(docs), "queries": len(texts), "configurations": []}
    with SieveClient(single.target) as alone:
        baseline = {label: run(alone, args.dataset, texts, retrievers)[:2] for label, retrievers in RETRIEVERS.items()}
        for count in map(int, args.shards.split(",")):
            owners = np.array([shard_of(d.id, count) for d in docs])
            shards = []
            for shard in range(count):
                rows = np.flatnonzero(owners == shard)
                build(work / f"{count}-shard-{shard}", [docs[r] for r in rows], vectors[rows], args.dataset)
                shards.append(ServerProcess(work / f"{count}-shard-{shard}").start())
            router = ServerProcess(work / f"{count}-router", {"SIEVE_SHARDS": ",".join(s.target for s in shards)}).start()
            row = {"shards": count, "retrievers": {}}
            with SieveClient(router.target) as routed:
                for label, retrievers in RETRIEVERS.items():
                    ours, tops, _ = run(routed, args.dataset, texts, retrievers)
                    theirs, their_tops = baseline[label]
                    # latency: paired, interleaved query by query (load from elsewhere hits both alike)
                    ratios, routed_ms, alone_ms = [], [], []
                    for qid, text in tqdm(texts.items(), desc=f"{count} shards {label}", mininterval=10):
                        _, _, [a] = run(alone, args.dataset, {qid: text}, retrievers)
                        _, _, [r] = run(routed, args.dataset, {qid: text}, retrievers)
                        alone_ms.append(a * 1000)
                        routed_ms.append(r * 1000)
                        ratios.append(r / a)
                    quality, reference = evaluate(ours, qrels), evaluate(theirs, qrels)
                    row["retrievers"][label] = {
                        "ndcg@10": round(quality["nDCG@10"], 4), "one_node_ndcg@10": round(reference["nDCG@10"], 4),
                        "recall@100": round(quality["R@100"], 4), "one_node_recall@100": round(reference["R@100"], 4),
                        "top10_same": float(np.mean([tops[q] == their_tops[q] for q in texts])),
                        "top10_same_set": float(np.mean([set(tops[q]) == set(their_tops[q]) for q in texts])),
                        "router_p50_ms": round(percentile(routed_ms, 50), 2),
                        "router_p99_ms": round(percentile(routed_ms, 99), 2),
                        "one_node_p50_ms": round(percentile(alone_ms, 50), 2),
                        "one_node_p99_ms": round(percentile(alone_ms, 99), 2),
                        "p50_ratio_paired": round(float(np.median(ratios)), 3)}
                    print(count, label, row["retrievers"][label], flush=True)
            row["memory_mb"] = {"router": round(resident_mb(router)), "shards": [round(resident_mb(s)) for s in shards],
                                "one_node": round(resident_mb(single))}
            row["bytes_on_disk_per_shard"] = [sum(p.stat().st_size for p in (work / f"{count}-shard-{s}").rglob("*")
                                                  if p.is_file()) for s in range(count)]
            figures["configurations"].append(row)
            for process in (router, *shards):
                process.stop()
    single.stop()
    write_results("sharding", figures, markdown(figures))


def markdown(figures: dict) -> str:
    lines = [f"## Sharded collections: {figures['dataset']} ({figures['documents']} documents, "
             f"{figures['queries']} queries, k=100, one query at a time, 2 cores for everything)", "",
             "| shards | retriever | nDCG@10 (one node) | R@100 (one node) | top 10 = one node (as a set) | "
             "router p50 / p99 ms | one node p50 / p99 ms | p50 ratio, paired |", "|---|---|---|---|---|---|---|---|"]
    for row in figures["configurations"]:
        for label, r in row["retrievers"].items():
            lines.append(f"| {row['shards']} | {label} | {r['ndcg@10']:.4f} ({r['one_node_ndcg@10']:.4f}) | "
                         f"{r['recall@100']:.4f} ({r['one_node_recall@100']:.4f}) | {r['top10_same']:.3f} "
                         f"({r['top10_same_set']:.3f}) | {r['router_p50_ms']} / {r['router_p99_ms']} | "
                         f"{r['one_node_p50_ms']} / {r['one_node_p99_ms']} | {r['p50_ratio_paired']} |")
    lines += ["", "| shards | resident MB: router | each shard | one node | bytes on disk per shard |",
              "|---|---|---|---|---|"]
    for row in figures["configurations"]:
        memory = row["memory_mb"]
        lines.append(f"| {row['shards']} | {memory['router']} | {', '.join(map(str, memory['shards']))} | "
                     f"{memory['one_node']} | {', '.join(f'{b / 1e6:.1f} MB' for b in row['bytes_on_disk_per_shard'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
