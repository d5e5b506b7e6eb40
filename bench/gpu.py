"""The GPU figures (run by bench/gpu.sh on a lent GPU machine; on a CPU it runs too, smaller, to check it).

    python -m bench.gpu --out gpu.json [--passages 8192]

  encoding   passages/s of the dense encoder (sentence vectors) and of the token vectors, on the device
  ingestion  passages/s of Collection.upsert with every importance stage on (supervised quality pruning,
             dense, BM25, learned term weights, multi-vector with pooling and residual codes)
  rerank     top-100 rerank p50 of Sieve's reranker (bf16 on CUDA), unpruned and with its early heads
  multivector  search p50 on the device against the same search on the CPU and against brute-force MaxSim
             on the device, with top-10 agreement between the device and the CPU

Passages are synthetic (words drawn from the encoder's vocabulary, about 145 tokens): the figures are
speeds, which depend on lengths, not on words.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from sieve.index.collection import Collection
from sieve.index.documents import Document
from sieve.index.encoders import device, load_encoder, resolve_encoder
from sieve.index.settings import CollectionSettings

WORDS_A_PASSAGE = 110  # about 145 word pieces, the brief's passage length


def synthetic_texts(count: int, words: int, seed: int = 0) -> list[str]:
    vocabulary = [w for w in (Path(resolve_encoder("")) / "vocab.txt").read_text().split()
                  if w.isalpha() and len(w) > 2]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocabulary, words)) for _ in range(count)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, *args, **kwargs) -> float:
    synchronize()
    started = time.perf_counter()
    function(*args, **kwargs)
    synchronize()
    return time.perf_counter() - started


def encoding(passages: list[str]) -> dict:
    encoder = load_encoder("", 256)
    encoder.embed(passages[:256], batch_size=128)  # warm-up: kernels, allocator
    sentence = timed(encoder.embed, passages, batch_size=128)
    tokens = timed(encoder.token_embeddings, passages, batch_size=128)
    return {"passages": len(passages), "sentence_vectors_per_s": len(passages) / sentence,
            "token_vectors_per_s": len(passages) / tokens}


def ingestion(passages: list[str], scratch: Path) -> tuple[dict, Collection]:
    settings = CollectionSettings(indexes=("dense", "bm25", "impact", "multivector"), pool_factor=4,
                                  compression="residual", quality_estimator="supervised", prune_ratio=0.25)
    collection = Collection.create(scratch / "gpu", settings)
    docs = [Document(f"d{i}", text) for i, text in enumerate(passages)]
    collection.upsert(docs[:256])  # warm-up: every model loaded
    batch, started = 1024, time.perf_counter()
    for first in range(256, len(docs), batch):
        collection.upsert(docs[first:first + batch], max_docs=batch)
    seconds = time.perf_counter() - started
    return {"passages": len(docs) - 256, "batch": batch, "passages_per_s": (len(docs) - 256) / seconds,
            "settings": settings.to_dict()}, collection


def rerank(passages: list[str], queries: list[str]) -> dict:
    from sieve.rankers import NO_PRUNING, PruningOptions
    from sieve.rankers.reranker import load_reranker

    reranker = load_reranker("")
    figures = {}
    for name, options in (("unpruned", NO_PRUNING), ("early heads", PruningOptions())):
        for query in queries[:3]:
            reranker.rerank(query, passages[:100], 10, options)
        seconds = [timed(reranker.rerank, query, passages[i:i + 100], 10, options)
                   for i, query in enumerate(queries)]
        figures[name] = {"p50_ms": 1000 * float(np.median(seconds)), "p99_ms": 1000 * float(np.percentile(seconds, 99))}
    return {"candidates": 100, "queries": len(queries), **figures}


def multivector(collection: Collection, queries: list[str]) -> dict:
    retriever = collection.retrievers["multivector"]
    parts = collection.snapshot.parts("multivector")
    deleted = collection.snapshot.searchable_deleted()
    encoded = retriever.encode_queries(queries)
    cpu_parts = [retriever.open(p.directory) for p in parts]
    for part in cpu_parts:
        part.device = torch.device("cpu")
    runs = {}
    for name, searched in (("device", parts), ("cpu", cpu_parts)):
        retriever.search(searched, deleted, encoded[0], 10)
        seconds, tops = [], []
        for query in encoded:
            synchronize()
            started = time.perf_counter()
            hits = retriever.search(searched, deleted, query, 10)
            synchronize()
            seconds.append(time.perf_counter() - started)
            tops.append({(h.segment, h.row) for h in hits})
        runs[name] = (seconds, tops)
    # brute force on the device over every stored vector, decoded once (what a user without an index does)
    vectors = torch.cat([torch.from_numpy(p.decode(np.arange(p.vectors))) for p in parts]).to(device())
    lengths = torch.from_numpy(np.concatenate([np.diff(p.offsets) for p in parts])).to(device())
    brute = []
    for query in encoded:
        q = torch.from_numpy(query).to(device())
        brute.append(timed(lambda: torch.topk(torch.segment_reduce(vectors @ q.T, "max", lengths=lengths, axis=0)
                                              .sum(1), 10)))
    device_s, cpu_s = (np.array(runs[n][0]) for n in ("device", "cpu"))
    return {"documents": int(sum(p.documents for p in parts)), "vectors": int(sum(p.vectors for p in parts)),
            "device_p50_ms": 1000 * float(np.median(device_s)), "cpu_p50_ms": 1000 * float(np.median(cpu_s)),
            "brute_force_on_device_p50_ms": 1000 * float(np.median(brute)),
            "device_over_cpu_paired_median": float(np.median(device_s / cpu_s)),
            "top10_agreement_device_cpu": float(np.mean([len(a & b) / 10 for a, b in zip(*(runs[n][1] for n in ("device", "cpu")))]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--passages", type=int, default=8192 if torch.cuda.is_available() else 512)
    parser.add_argument("--queries", type=int, default=50 if torch.cuda.is_available() else 5)
    args = parser.parse_args()
    passages = synthetic_texts(args.passages, WORDS_A_PASSAGE)
    queries = synthetic_texts(args.queries, 12, seed=1)
    figures = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
               "torch": torch.__version__, "weights": "random (the packaged architecture), see bench/gpu.sh",
               "faiss_gpu": "not measured: faiss-gpu wheels need CUDA 12's cuBLAS, the image has CUDA 13"}
    scratch = Path(tempfile.mkdtemp(prefix="sieve-gpu-"))

    def save(name: str, value) -> None:  # after each part, so that a timeout keeps what was measured
        figures[name] = value
        print(json.dumps({name: value}), flush=True)
        args.out.write_text(json.dumps(figures, indent=2))

    try:
        save("encoding", encoding(passages))
        ingested, collection = ingestion(passages, scratch)
        save("ingestion", ingested)
        save("multivector", multivector(collection, queries))
        save("rerank", rerank(passages, queries))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
