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
rescored and scored exactly; and the fused first stage (BM25 + dense [+ MaxSim]) with and without MaxSim,
per compression, queries pre-encoded and end to end from the text (`--fused-only`: that alone).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
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
          queries: int, peers: list[str], fused_only: bool = False) -> tuple[list, list]:
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
        if not fused_only:
            rows += search_rows(dataset, factor, compressions, batch, query_vectors, qids, qrels, doc_ids, scratch)
            rows += peer_rows(dataset, factor, cache / f"{tag}-pool{factor}.npz", cache / f"{tag}-queries.npz", qids,
                              qrels, doc_ids, scratch, peers)
        fused_rows += [fused_cost(dataset, corpus, judged, qids, query_vectors, batch, factor, compression, scratch)
                       for compression in compressions]
    return rows, fused_rows


def search_rows(dataset: str, factor: int, compressions: list[str], batch: TokenBatch, query_vectors, qids, qrels,
                doc_ids: list[str], scratch: Path) -> list[dict]:
    """Every SPEED_GRID setting of each compression at k = 10 and 100, each query paired with brute force."""
    from sieve.index.multivector import prune_and_gather

    rows = []
    vectors, lengths = torch.from_numpy(batch.vectors), torch.from_numpy(batch.lengths)
    brute = []  # the top 100 of each query; its time is the same for k = 10 (one pass either way)
    for query in tqdm(query_vectors, desc=f"brute force x{factor}"):
        started = time.perf_counter()
        found = brute_force(vectors, lengths, query, 100)
        brute.append((found, time.perf_counter() - started))
    exact_seconds = [seconds for _, seconds in brute]
    for compression in compressions:  # each index is built once, then searched at both k
        settings = CollectionSettings(indexes=("multivector",), pool_factor=factor, compression=compression)
        retriever = MultiVectorRetriever(settings)
        directory = Path(tempfile.mkdtemp(dir=scratch))
        retriever.write(directory, batch)
        part = retriever.open(directory)
        gone = [np.zeros(0, "int64")]
        for k in (10, 100):
            exact_runs = {q: {doc_ids[r]: float(s) for r, s in zip(rows_[:k], scores[:k])}
                          for q, ((rows_, scores), _) in zip(qids, brute)}
            exact_top = {q: set(rows_[:10].tolist()) for q, ((rows_, _), _) in zip(qids, brute)}
            exact_ndcg = ir_measures.calc_aggregate([nDCG @ 10], qrels, exact_runs)[nDCG @ 10]
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
                    gathered.append(len(prune_and_gather(part, table, knobs.nprobe, knobs.centroid_threshold)[0]))
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
                    "candidates_rescored": min(max(knobs.candidates, knobs.exact_candidates, k), len(doc_ids)),
                    "scored_exactly": min(max(knobs.exact_candidates, k), len(doc_ids)),
                    "documents": len(doc_ids),
                })
                print(json.dumps(rows[-1]), flush=True)
        del part
        shutil.rmtree(directory)
    return rows


PEER_SETTINGS = {"lancedb": ("default", "fast", "refine 2"), "fast-plaid": ("default", "fast", "faster")}
PEER_PYTHONS = {"lancedb": sys.executable, "fast-plaid": str(Path(__file__).parents[1] / ".venv-fastplaid/bin/python")}


def peer_rows(dataset: str, factor: int, pooled: Path, queries: Path, qids: list[str], qrels: dict,
              doc_ids: list[str], scratch: Path, peers: list[str]) -> list[dict]:
    """bench/multivector_peers.py for each peer and setting, in the peer's own interpreter (fast-plaid pins
    its torch, so it has a virtual environment of its own), at k = 100 on the same vectors and queries, each
    query timed against brute force in the peer's process; a peer that cannot run is reported, not hidden."""
    rows = []
    for peer in peers:
        settings = PEER_SETTINGS[peer]
        out = scratch / f"peer-{peer}-{factor}-{{setting}}.json"
        command = [PEER_PYTHONS[peer], str(Path(__file__).with_name("multivector_peers.py")), "--peer", peer,
                   "--settings", ",".join(settings), "--pooled", str(pooled), "--queries", str(queries), "--k", "100",
                   "--n-queries", str(len(qids)), "--threads", str(torch.get_num_threads()), "--out", str(out)]
        try:
            subprocess.run(command, check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            rows.append({"dataset": dataset, "pool_factor": factor, "k": 100, "compression": peer,
                         "setting": ",".join(settings), "error": str(error)})
            print(f"{peer} did not run: {error}", flush=True)
            continue
        for setting in settings:
            found = json.loads(Path(str(out).replace("{setting}", setting)).read_text())
            per_query = found["per_query"]
            run = {qid: {doc_ids[r]: float(s) for r, s in zip(q["rows"], q["scores"])} for qid, q in zip(qids, per_query)}
            exact = {qid: {doc_ids[r]: float(s) for r, s in zip(q["exact_rows"], q["exact_scores"])}
                     for qid, q in zip(qids, per_query)}
            ndcg, exact_ndcg = (ir_measures.calc_aggregate([nDCG @ 10], qrels, r)[nDCG @ 10] for r in (run, exact))
            rows.append({
                "dataset": dataset, "pool_factor": factor, "k": 100, "compression": f"{peer} {found['version']}",
                "setting": setting, "params": found["params"], "vectors": found["vectors"],
                "bytes_per_vector": round(found["bytes_per_vector"], 1),
                "p50_ms": found["summary"]["p50_peer_ms"], "exact_p50_ms": found["summary"]["p50_brute_ms"],
                "p50_ratio_to_exact": found["summary"]["p50_ratio_peer_to_brute"],
                "top10_agreement": found["summary"]["top10_agreement"], "ndcg@10": ndcg, "exact_ndcg@10": exact_ndcg,
                "ndcg_ratio_to_exact": ndcg / exact_ndcg, "candidates_gathered_p50": float("nan"),
                "candidates_rescored": "?", "scored_exactly": "?", "documents": found["documents"],
                "build_s": found["build_s"],
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def fused_cost(dataset, corpus, judged, qids, query_vectors, batch: TokenBatch, factor: int, compression: str,
               scratch: Path) -> dict:
    """RRF(BM25, dense) against RRF(BM25, dense, MaxSim), paired per query, two ways: Collection.search
    with the queries pre-encoded (the index work alone), and end to end through the engine from the text
    (what a caller waits for: the query's encoding, which the dense and multi-vector indexes share, then
    the search). The encoder's recent-query memo is emptied before each end-to-end search, so every one
    pays its own forward pass. The dense vectors are the mean of each passage's token vectors (timing
    only: exact search costs the same for any vectors)."""
    from sieve.index.encoders import load_encoder
    from sieve.service.engine import RerankOptions, SearchQuery
    from sieve.service.sync_engine import SyncEngine

    dense = np.stack([mean_vector(batch.vectors[a:b]) for a, b in zip(batch.offsets[:-1], batch.offsets[1:])])
    data = Path(tempfile.mkdtemp(dir=scratch))
    settings = CollectionSettings(indexes=("dense", "bm25", "multivector"), pool_factor=factor, compression=compression)
    prebuilt_collection(data / dataset, settings, corpus, {"dense": dense, "multivector": batch}).close()
    plans = {"without": ("bm25", "dense"), "with": ("bm25", "dense", "multivector")}
    timings = {f"{way} {label}": [] for way in ("encoded", "text") for label in plans}
    encoder = load_encoder(settings.encoder, settings.max_tokens)
    with SyncEngine(data=str(data)) as engine:
        collection = engine.collection(dataset)
        for qid, query in tqdm(list(zip(qids, query_vectors)), desc=f"fused x{factor}"):
            encoded = {"bm25": collection.encode_queries("bm25", [judged[qid]])[0], "dense": mean_vector(query),
                       "multivector": query}
            for label, names in plans.items():
                started = time.perf_counter()
                collection.search({n: encoded[n] for n in names}, 10)
                timings[f"encoded {label}"].append(time.perf_counter() - started)
                encoder.recent_queries.clear()
                started = time.perf_counter()
                engine.search(SearchQuery(dataset, judged[qid], k=10, retrievers=names,
                                          rerank=RerankOptions(enabled=False)))
                timings[f"text {label}"].append(time.perf_counter() - started)
    shutil.rmtree(data)
    row = {"dataset": dataset, "pool_factor": factor, "compression": compression}
    for way in ("encoded", "text"):
        without, with_ = (np.array(timings[f"{way} {label}"]) for label in plans)
        row[way] = {"p50_ms_without_maxsim": 1000 * float(np.median(without)),
                    "p50_ms_with_maxsim": 1000 * float(np.median(with_)),
                    "ratio": float(np.median(with_) / np.median(without)),
                    "paired_median_ratio": float(np.median(with_ / without))}
    return row


def speed_markdown(rows: list[dict], fused: list[dict]) -> str:
    lines = [  # no search table for --fused-only
        "| pool factor | k | compression | setting | p50 ms | exact p50 ms | p50 ratio to exact (paired) "
        "| top-10 = exact | nDCG@10 | vs exact | gathered | rescored | scored exactly | bytes/vector |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ] if rows else []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['pool_factor']} | {r['k']} | {r['compression']} | {r['setting']} | did not run: {r['error']} |")
            continue
        lines.append(
            f"| {r['pool_factor']} | {r['k']} | {r['compression']} | {r['setting']} | {r['p50_ms']:.1f} "
            f"| {r['exact_p50_ms']:.1f} | {r['p50_ratio_to_exact']:.3f} | {r['top10_agreement']:.3f} "
            f"| {r['ndcg@10']:.3f} | {r['ndcg_ratio_to_exact']:.3f} | {r['candidates_gathered_p50']:.0f} "
            f"| {r['candidates_rescored']} | {r['scored_exactly']} | {r['bytes_per_vector']} |")
    lines += ["", "| pool factor | compression | fused, queries | p50 ms, BM25 + dense | with MaxSim | ratio (p50s) "
              "| paired median ratio |", "|---|---|---|---|---|---|---|"]
    for f in fused:
        compression = f.get("compression", "residual")  # older results measured the default codec only
        for way, what in (("encoded", "pre-encoded (search only)"), ("text", "text, through the engine")):
            r = f[way]
            lines.append(f"| {f['pool_factor']} | {compression} | {what} "
                         f"| {r['p50_ms_without_maxsim']:.1f} | {r['p50_ms_with_maxsim']:.1f} "
                         f"| {r['ratio']:.2f} | {r['paired_median_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def speed_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    panels = list(dict.fromkeys((r["pool_factor"], r["k"]) for r in rows))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for axis, (factor, k) in zip(axes[0], panels):
        for compression in dict.fromkeys(r["compression"] for r in rows):
            points = [r for r in rows if (r["pool_factor"], r["k"], r["compression"]) == (factor, k, compression)]
            axis.plot([r["p50_ratio_to_exact"] for r in points], [r["ndcg_ratio_to_exact"] for r in points], "o",
                      label=compression)
            for r in points:
                axis.annotate(r["setting"], (r["p50_ratio_to_exact"], r["ndcg_ratio_to_exact"]), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
        axis.plot([1.0], [1.0], "k*", markersize=10, label="exact brute force")
        axis.axvline(0.1, color="grey", linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_xlabel("p50 time / exact brute force, paired per query (log)")
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
    parser.add_argument("--out", type=Path, help="results path without suffix (default: bench/results/multivector, "
                        "or multivector_speed with --speed)")
    parser.add_argument("--speed", action="store_true", help="the index against exact brute force instead")
    parser.add_argument("--queries", type=int, default=300, help="--speed: the first this many test queries")
    parser.add_argument("--fused-only", action="store_true",
                        help="--speed: only the fused first stage's cost with and without MaxSim, per compression")
    parser.add_argument("--peers", default="lancedb,fast-plaid",
                        help="--speed: peers run by bench/multivector_peers.py (fast-plaid from .venv-fastplaid)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    scratch = args.cache / "scratch"
    scratch.mkdir(exist_ok=True)
    compressions = args.compressions.split(",")
    if args.speed:
        rows, fused = speed(args.grid_dataset, [2, 4], compressions, args.cache, scratch, args.queries,
                            [peer for peer in args.peers.split(",") if peer], args.fused_only)
        out = args.out or RESULTS / "multivector_speed"
        out.with_suffix(".json").write_text(json.dumps({"threads": args.threads, "rows": rows, "fused": fused}, indent=2))
        out.with_suffix(".md").write_text(speed_markdown(rows, fused))
        if rows:  # --fused-only has no search rows to plot
            speed_plot(rows, out.with_suffix(".png"))
        print(speed_markdown(rows, fused))
        return
    args.out = args.out or RESULTS / "multivector"
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
