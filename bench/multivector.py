"""Token pooling x compression for the multi-vector index (BRIEF 1.1, targets in section 5).

For each dataset the raw token vectors are encoded once (cached under --cache); every pool factor
and compression is then built and searched through MultiVectorRetriever's own pool/write/open/
search, so the figures are the shipped code path minus the encoder. Reports stored vectors, index
bytes, bytes per vector, nDCG@10, R@100, search latency p50 (queries pre-encoded), and ratios to
pool factor 1 with the same compression.

    nice -n 10 python -m bench.multivector            # SciFact grid, then factor 1 vs 4 elsewhere
    python -m bench.multivector --speed               # the index against exact brute force, paired per query

--speed (bench/results/multivector_speed.*): SciFact at pool factors 2 and 4, k = 10 and 100, one query
at a time; for each search setting, per query, Sieve's search time over exact brute-force MaxSim in
torch (fp32, in memory, the same pooled vectors), top-10 agreement with it, nDCG@10 of both, documents
rescored and scored exactly; and the fused first stage (BM25 + dense [+ MaxSim], queries pre-encoded)
with and without MaxSim.
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
from sieve.index.multivector import MultiVectorRetriever, SearchParams, TokenBatch
from sieve.index.settings import CollectionSettings

from bench.common import mean_vector, prebuilt_collection

RESULTS = Path(__file__).parent / "results"


def cached_tokens(path: Path, texts: list[str], retriever: MultiVectorRetriever, what: str) -> list[np.ndarray]:
    """Normalised, unpooled token vectors per text, stored once as float16 (flat + lengths)."""
    if not path.exists():
        print(f"encoding {what}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
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


SPEED_GRID = {  # name -> multi-vector search overrides; "default" is the shipped settings
    "default": {},
    "exact 64": {"exact_candidates": 64},
    "exact 256, candidates 1024": {"exact_candidates": 256, "candidates": 1024},
    "nprobe 4, threshold 0.5": {"nprobe": 4, "centroid_threshold": 0.5},
}


def brute_force(vectors: torch.Tensor, lengths: torch.Tensor, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact MaxSim over every document, as a user without an index would: one matmul, a segmented max."""
    similarities = vectors @ torch.from_numpy(query).T  # (stored vectors, query tokens)
    scores = torch.segment_reduce(similarities, "max", lengths=lengths, axis=0).sum(1)
    best = torch.topk(scores, k)
    return best.indices.numpy(), best.values.numpy()


def speed(dataset: str, factors: list[int], compressions: list[str], cache: Path, scratch: Path,
          queries: int) -> tuple[list, list]:
    from sieve.index.multivector import prune_and_gather

    folder = DATASETS / dataset
    corpus = [d for d in read_jsonl(folder / "corpus.jsonl") if isinstance(d, Document)]
    judged, qrels = load_judged_queries(folder)
    qids = list(judged)[:queries]
    qrels = {q: qrels[q] for q in qids}  # a query without results would count as 0
    doc_ids = [d.id for d in corpus]
    base = MultiVectorRetriever(CollectionSettings())
    tag = f"{dataset}-minilm-{base.settings.max_tokens}"
    tokens = cached_tokens(cache / f"{tag}-corpus.npz", [d.content for d in corpus], base, f"{dataset} corpus")
    query_vectors = cached_tokens(cache / f"{tag}-queries.npz", list(judged.values()), base, "queries")[:queries]
    rows, fused_rows = [], []
    for factor in factors:
        batch = cached_pooled(cache / f"{tag}-pool{factor}.npz", tokens,
                              MultiVectorRetriever(CollectionSettings(indexes=("multivector",), pool_factor=factor)))
        vectors, lengths = torch.from_numpy(batch.vectors), torch.from_numpy(batch.lengths)
        brute = []  # the top 100 of each query; its time is the same for k = 10 (one pass either way)
        for query in tqdm(query_vectors, desc=f"brute force x{factor}"):
            started = time.perf_counter()
            found = brute_force(vectors, lengths, query, 100)
            brute.append((found, time.perf_counter() - started))
        for k in (10, 100):
            exact_runs = {q: {doc_ids[r]: float(s) for r, s in zip(rows_[:k], scores[:k])}
                          for q, ((rows_, scores), _) in zip(qids, brute)}
            exact_top = {q: set(rows_[:10].tolist()) for q, ((rows_, _), _) in zip(qids, brute)}
            exact_seconds = [seconds for _, seconds in brute]
            exact_ndcg = ir_measures.calc_aggregate([nDCG @ 10], qrels, exact_runs)[nDCG @ 10]
            for compression in compressions:
                settings = CollectionSettings(indexes=("multivector",), pool_factor=factor, compression=compression)
                retriever = MultiVectorRetriever(settings)
                directory = Path(tempfile.mkdtemp(dir=scratch))
                retriever.write(directory, batch)
                part = retriever.open(directory)
                gone = [np.zeros(0, "int64")]
                for name, overrides in SPEED_GRID.items():
                    knobs = SearchParams.of(settings, overrides)
                    run, ratios, seconds, agreement, gathered = {}, [], [], [], []
                    for qid, query, brute_s in zip(qids, query_vectors, exact_seconds):
                        started = time.perf_counter()
                        hits = retriever.search([part], gone, query, k, overrides)
                        seconds.append(time.perf_counter() - started)
                        ratios.append(seconds[-1] / brute_s)
                        run[qid] = {doc_ids[h.row]: h.score for h in hits}
                        agreement.append(len({h.row for h in hits[:10]} & exact_top[qid]) / 10)
                        table = torch.from_numpy(query).to(part.device) @ part.centroids_on_device.T
                        gathered.append(len(prune_and_gather(part, table, knobs.nprobe,
                                                             knobs.centroid_threshold)[0]))
                    ndcg = ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10]
                    rows.append({
                        "dataset": dataset, "pool_factor": factor, "k": k, "compression": compression,
                        "setting": name, "params": vars(knobs), "vectors": part.vectors,
                        "bytes_per_vector": part.code_bytes(),
                        "p50_ms": 1000 * float(np.median(seconds)), "exact_p50_ms": 1000 * float(np.median(exact_seconds)),
                        "p50_ratio_to_exact": float(np.median(ratios)),
                        "top10_agreement": float(np.mean(agreement)), "ndcg@10": ndcg, "exact_ndcg@10": exact_ndcg,
                        "ndcg_ratio_to_exact": ndcg / exact_ndcg,
                        "candidates_gathered_p50": float(np.median(gathered)),
                        "candidates_rescored": min(max(knobs.candidates, knobs.exact_candidates, k), len(corpus)),
                        "scored_exactly": min(max(knobs.exact_candidates, k), len(corpus)),
                        "documents": len(corpus),
                    })
                    print(json.dumps(rows[-1]), flush=True)
                del part
                shutil.rmtree(directory)
        fused_rows.append(fused_cost(dataset, corpus, judged, qids, query_vectors, batch, factor, scratch))
    return rows, fused_rows


def fused_cost(dataset, corpus, judged, qids, query_vectors, batch: TokenBatch, factor: int, scratch: Path) -> dict:
    """RRF(BM25, dense) against RRF(BM25, dense, MaxSim) through Collection.search, queries pre-encoded.
    The dense vectors are the mean of each passage's token vectors (timing only: exact search costs the
    same for any vectors)."""
    dense = np.stack([mean_vector(batch.vectors[a:b]) for a, b in zip(batch.offsets[:-1], batch.offsets[1:])])
    collection = prebuilt_collection(Path(tempfile.mkdtemp(dir=scratch)) / dataset, CollectionSettings(
        indexes=("dense", "bm25", "multivector"), pool_factor=factor), corpus, {"dense": dense, "multivector": batch})
    timings = {"without": [], "with": []}
    for qid, query in zip(qids, query_vectors):
        encoded = {"bm25": collection.encode_queries("bm25", [judged[qid]])[0], "dense": mean_vector(query),
                   "multivector": query}
        for label, names in (("without", ("bm25", "dense")), ("with", ("bm25", "dense", "multivector"))):
            started = time.perf_counter()
            collection.search({n: encoded[n] for n in names}, 10)
            timings[label].append(time.perf_counter() - started)
    shutil.rmtree(collection.directory.parent)
    without, with_ = (1000 * float(np.median(timings[label])) for label in ("without", "with"))
    return {"dataset": dataset, "pool_factor": factor, "fused_p50_ms_without_maxsim": without,
            "fused_p50_ms_with_maxsim": with_, "ratio": with_ / without,
            "paired_median_ratio": float(np.median(np.array(timings["with"]) / np.array(timings["without"])))}


def speed_markdown(rows: list[dict], fused: list[dict]) -> str:
    lines = [
        "| pool factor | k | compression | setting | p50 ms | exact p50 ms | p50 ratio to exact (paired) "
        "| top-10 = exact | nDCG@10 | vs exact | gathered | rescored | scored exactly | bytes/vector |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pool_factor']} | {r['k']} | {r['compression']} | {r['setting']} | {r['p50_ms']:.1f} "
            f"| {r['exact_p50_ms']:.1f} | {r['p50_ratio_to_exact']:.3f} | {r['top10_agreement']:.3f} "
            f"| {r['ndcg@10']:.3f} | {r['ndcg_ratio_to_exact']:.3f} | {r['candidates_gathered_p50']:.0f} "
            f"| {r['candidates_rescored']} | {r['scored_exactly']} | {r['bytes_per_vector']} |")
    lines += ["", "| pool factor | fused p50 ms, BM25 + dense | with MaxSim | ratio (p50s) | paired median ratio |",
              "|---|---|---|---|---|"]
    for f in fused:
        lines.append(f"| {f['pool_factor']} | {f['fused_p50_ms_without_maxsim']:.1f} | {f['fused_p50_ms_with_maxsim']:.1f} "
                     f"| {f['ratio']:.2f} | {f['paired_median_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def speed_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["pool_factor"], r["k"]) for r in rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for axis, (factor, k) in zip(axes[0], panels):
        for compression in dict.fromkeys(r["compression"] for r in rows):
            points = [r for r in rows if (r["pool_factor"], r["k"], r["compression"]) == (factor, k, compression)]
            axis.plot([r["p50_ms"] for r in points], [r["ndcg_ratio_to_exact"] for r in points], "o", label=compression)
            for r in points:
                axis.annotate(r["setting"], (r["p50_ms"], r["ndcg_ratio_to_exact"]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
        exact = next(r for r in rows if (r["pool_factor"], r["k"]) == (factor, k))
        axis.plot([exact["exact_p50_ms"]], [1.0], "k*", markersize=10, label="exact brute force")
        axis.set_xscale("log")
        axis.set_xlabel("p50 ms per query (log)")
        axis.set_ylabel("nDCG@10 / exact")
        axis.set_title(f"SciFact, pool factor {factor}, k={k}")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


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
    parser.add_argument("--others", default="cranfield,cisi,medline", help="datasets run at --other-factors")
    parser.add_argument("--other-factors", default="1,4")
    parser.add_argument("--compressions", default="none,residual")
    parser.add_argument("--cache", type=Path, default=cache_dir("mv"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "multivector")
    parser.add_argument("--speed", action="store_true", help="the index against exact brute force instead")
    parser.add_argument("--queries", type=int, default=300, help="--speed: the first this many test queries")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.cache / "scratch"
    scratch.mkdir(exist_ok=True)
    compressions = args.compressions.split(",")
    if args.speed:
        rows, fused = speed(args.grid_dataset, [2, 4], compressions, args.cache, scratch, args.queries)
        out = RESULTS / "multivector_speed"
        out.with_suffix(".json").write_text(json.dumps({"threads": args.threads, "rows": rows, "fused": fused}, indent=2))
        out.with_suffix(".md").write_text(speed_markdown(rows, fused))
        speed_plot(rows, out.with_suffix(".png"))
        print(speed_markdown(rows, fused))
        return
    plan = [(args.grid_dataset, [int(f) for f in args.factors.split(",")])]
    plan += [(dataset, [int(f) for f in args.other_factors.split(",")]) for dataset in args.others.split(",") if dataset]

    rows: list[dict] = []
    for dataset, factors in plan:
        rows += evaluate(dataset, factors, compressions, args.cache, scratch)
        settings = {"encoder": "all-MiniLM-L6-v2 (packaged)", "max_tokens": 256, "protected_tokens": 1,
                    "search": vars(SearchParams.of(CollectionSettings())),
                    "k": 100, "threads": args.threads}
        args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
        args.out.with_suffix(".md").write_text(markdown(rows))
        plot(rows, args.out.with_suffix(".png"))
    print(markdown(rows))


if __name__ == "__main__":
    main()
