"""Token pooling x compression for the multi-vector index (BRIEF 1.1, targets in section 5).

For each dataset the raw token vectors are encoded once (cached under --cache); every pool factor
and compression is then built and searched through MultiVectorRetriever's own pool/write/open/
search, so the figures are the shipped code path minus the encoder. Reports stored vectors, index
bytes, bytes per vector, nDCG@10, R@100, search latency p50 (queries pre-encoded), and ratios to
pool factor 1 with the same compression.

    nice -n 10 python bench/multivector.py            # SciFact grid, then factor 1 vs 4 elsewhere
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss
import ir_measures
import numpy as np
import torch
from ir_measures import R, nDCG
from tqdm.auto import tqdm

from sieve.index.beir import DATASETS, cache_dir, load_judged_queries
from sieve.index.documents import Document, read_jsonl
from sieve.index.multivector import MultiVectorRetriever, TokenBatch
from sieve.index.settings import CollectionSettings

RESULTS = Path(__file__).parent / "results"


def cached_tokens(path: Path, texts: list[str], retriever: MultiVectorRetriever, what: str) -> list[np.ndarray]:
    """Normalised, unpooled token vectors per text, stored once as float16 (flat + lengths)."""
    if not path.exists():
        print(f"encoding {what}", flush=True)
        documents = retriever.token_vectors(texts, progress=True)  # sentence-transformers' own progress bar
        lengths = np.array([len(d) for d in documents])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, vectors=np.vstack(documents).astype("float16"), lengths=lengths)
        os.replace(tmp, path)
    stored = np.load(path)
    vectors = stored["vectors"].astype("float32")
    return np.split(vectors, np.cumsum(stored["lengths"])[:-1])


def cached_pooled(path: Path, tokens: list[np.ndarray], retriever: MultiVectorRetriever) -> TokenBatch:
    if retriever.settings.pool_factor == 1:  # nothing to cache: the raw tokens are the batch
        return retriever.pool(tokens)
    if not path.exists():
        batch = retriever.pool(tokens, progress=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, vectors=batch.vectors.astype("float16"), offsets=batch.offsets, raw_counts=batch.raw_counts)
        os.replace(tmp, path)
    stored = np.load(path)
    return TokenBatch(stored["vectors"].astype("float32"), stored["offsets"], stored["raw_counts"])


def evaluate(dataset: str, factors: list[int], compressions: list[str], cache: Path, scratch: Path) -> list[dict]:
    folder = DATASETS / dataset
    corpus = [d for d in read_jsonl(folder / "corpus.jsonl") if isinstance(d, Document)]
    judged, qrels = load_judged_queries(folder)
    queries = [{"_id": qid, "text": text} for qid, text in judged.items()]
    doc_ids = [d.id for d in corpus]
    texts = [d.content for d in corpus]

    base = MultiVectorRetriever(CollectionSettings())
    tag = f"{dataset}-minilm-{base.settings.max_tokens}"
    tokens = cached_tokens(cache / f"{tag}-corpus.npz", texts, base, f"{dataset} corpus")
    query_vectors = cached_tokens(cache / f"{tag}-queries.npz", [q["text"] for q in queries], base, "queries")

    rows = []
    for factor in factors:
        settings = CollectionSettings(indexes=("multivector",), pool_factor=factor)
        start = time.perf_counter()
        batch = cached_pooled(cache / f"{tag}-pool{factor}.npz", tokens, MultiVectorRetriever(settings))
        for compression in compressions:
            retriever = MultiVectorRetriever(CollectionSettings(
                indexes=("multivector",), pool_factor=factor, compression=compression))
            directory = Path(tempfile.mkdtemp(dir=scratch))
            start = time.perf_counter()
            retriever.write(directory, batch)
            build_s = time.perf_counter() - start
            part = retriever.open(directory)
            run, latencies = {}, []
            gone = [np.zeros(0, "int64")]
            for query, vectors in tqdm(list(zip(queries, query_vectors)), desc=f"{dataset} x{factor} {compression}"):
                start = time.perf_counter()
                hits = retriever.search([part], gone, vectors, 100)
                latencies.append(time.perf_counter() - start)
                run[query["_id"]] = {doc_ids[h.row]: h.score for h in hits}
            quality = ir_measures.calc_aggregate([nDCG @ 10, R @ 100], qrels, run)
            stats = retriever.stats([part], len(corpus))
            rows.append({
                "dataset": dataset, "pool_factor": factor, "compression": compression,
                "vectors_raw": stats["vectors_raw"], "vectors_stored": stats["vectors_stored"],
                "index_bytes": stats["index_bytes"], "bytes_per_vector": stats["bytes_per_vector"],
                "index_bytes_per_vector": stats["index_bytes_per_vector"],
                "ndcg@10": quality[nDCG @ 10], "r@100": quality[R @ 100],
                "latency_p50_ms": 1000 * float(np.median(latencies)), "build_s": build_s,
            })
            print(json.dumps(rows[-1]), flush=True)
            del part
            shutil.rmtree(directory)
    for row in rows:  # factor 1 and "none" are in every default run; ratios are NaN where absent
        reference = next((r for r in rows if r["pool_factor"] == 1 and r["compression"] == row["compression"]), None)
        uncompressed = next((r for r in rows if r["pool_factor"] == row["pool_factor"] and r["compression"] == "none"), None)
        row["ndcg_ratio_to_factor_1"] = row["ndcg@10"] / reference["ndcg@10"] if reference else float("nan")
        row["vectors_ratio_to_factor_1"] = row["vectors_stored"] / reference["vectors_stored"] if reference else float("nan")
        row["ndcg_ratio_to_uncompressed"] = row["ndcg@10"] / uncompressed["ndcg@10"] if uncompressed else float("nan")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | pool factor | compression | stored vectors | vs factor 1 | bytes/vector | index MB "
        "| nDCG@10 | R@100 | nDCG vs factor 1 | nDCG vs uncompressed | search p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['pool_factor']} | {r['compression']} | {r['vectors_stored']:,} "
            f"| {r['vectors_ratio_to_factor_1']:.3f} | {r['bytes_per_vector']:.0f} | {r['index_bytes'] / 1e6:.1f} "
            f"| {r['ndcg@10']:.3f} | {r['r@100']:.3f} | {r['ndcg_ratio_to_factor_1']:.3f} "
            f"| {r['ndcg_ratio_to_uncompressed']:.3f} | {r['latency_p50_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for compression in dict.fromkeys(r["compression"] for r in rows):
            points = [r for r in rows if r["dataset"] == dataset and r["compression"] == compression]
            x = [r["index_bytes"] / 1e6 for r in points]
            axis.plot(x, [r["ndcg@10"] for r in points], "o-", label=compression)
            for r, xi in zip(points, x):
                axis.annotate(f"x{r['pool_factor']}", (xi, r["ndcg@10"]), textcoords="offset points", xytext=(4, 4))
        axis.set_xscale("log")
        axis.set_xlabel("index size (MB, log)")
        axis.set_ylabel("nDCG@10")
        axis.set_title(dataset)
        axis.legend(title="compression")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid-dataset", default="scifact")
    parser.add_argument("--factors", default="1,2,3,4")
    parser.add_argument("--others", default="cranfield,cisi,medline", help="datasets run at factors 1 and 4")
    parser.add_argument("--compressions", default="none,residual")
    parser.add_argument("--cache", type=Path, default=cache_dir("mv"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "multivector")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.cache / "scratch"
    scratch.mkdir(exist_ok=True)
    compressions = args.compressions.split(",")
    plan = [(args.grid_dataset, [int(f) for f in args.factors.split(",")])]
    plan += [(dataset, [1, 4]) for dataset in args.others.split(",") if dataset]

    rows: list[dict] = []
    for dataset, factors in plan:
        rows += evaluate(dataset, factors, compressions, args.cache, scratch)
        settings = {"encoder": "all-MiniLM-L6-v2 (packaged)", "max_tokens": 256, "protected_tokens": 1,
                    "nprobe": MultiVectorRetriever.nprobe, "exact_candidates": MultiVectorRetriever.exact_candidates,
                    "k": 100, "threads": args.threads}
        args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
        args.out.with_suffix(".md").write_text(markdown(rows))
        plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows))


if __name__ == "__main__":
    main()
