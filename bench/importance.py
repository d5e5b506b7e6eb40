"""Importance-aware indexing: quality pruning and learned term weights, in one run.

    python bench/importance.py [--datasets scifact,cranfield,cisi,medline] [--cache-only]

For every dataset (SciFact test; the others zero-shot): BM25, learned impacts and MiniLM dense,
alone and fused with RRF; and static pruning at 0/10/25/40% by each quality estimator, with
nDCG@10, a paired t-test over per-query nDCG@10 against the unpruned index, indexing time and
index size. On SciFact the supervised estimator is cross-fitted: each half of the corpus is scored
by a model trained on the other half's train labels (it never saw a passage it scores; the shipped
model is trained on all of them). Dense embeddings and per-passage encoding times are cached under
$SIEVE_CACHE/importance/ (default ~/.cache/sieve), so reruns are cheap. Writes bench/results/importance.{json,md,png}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ir_measures
import numpy as np
import torch
from ir_measures import R, nDCG
from scipy.stats import ttest_rel

from sieve.index.beir import DATASETS as DATA, cache_dir, load_beir, load_judged_queries, relevant
from sieve.index.documents import Document
from sieve.index.encoders import load_encoder
from sieve.index.fusion import reciprocal_rank
from sieve.index.impact import ImpactRetriever
from sieve.index.lexical import BM25Retriever, SparseRows
from sieve.index.quality import score_passages, supervised
from sieve.index.settings import CollectionSettings
from sieve.index.term_weights import TERM_WEIGHTS_ARTIFACT

CACHE = cache_dir("importance")
SHARED_DENSE = cache_dir("reranker")
RESULTS = Path(__file__).parent / "results"
ESTIMATORS = ("unique_terms", "lm_divergence", "embedding_norm", "supervised", "random")  # random: the floor
PRUNE_RATIOS = (0.0, 0.10, 0.25, 0.40)
DEPTH = 100


def load(name: str):
    with open(DATA / name / "corpus.jsonl") as lines:
        docs = [Document.from_json(json.loads(line)) for line in lines]
    queries, qrels = load_judged_queries(DATA / name, "test")
    return docs, queries, [ir_measures.Qrel(q, d, grade) for q, judged in qrels.items() for d, grade in judged.items()]


def cached(path: Path, compute):
    """(value, seconds it took when computed): numpy arrays and their timing, kept on disk."""
    array, meta = Path(f"{path}.npy"), Path(f"{path}.json")
    if array.exists():
        return np.load(array), json.loads(meta.read_text())["seconds"]
    start = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(array, value)
    meta.write_text(json.dumps({"seconds": seconds, "rows": len(value)}))
    return value, seconds


def dense_embeddings(name: str, texts: list[str]) -> tuple[np.ndarray, float]:
    """MiniLM passage embeddings, and the seconds encoding all of them takes.

    The reranker helper caches the same embeddings (same model, same passage text and order) under
    $SIEVE_CACHE/reranker/; those are reused, and the encoding time is measured on a sample."""
    encoder = load_encoder("")
    shared = SHARED_DENSE / f"{name}_dense.npy"
    if shared.exists() and not Path(f"{CACHE / name}.dense.npy").exists():
        vectors = np.load(shared)
        if len(vectors) == len(texts):
            sample = texts[:: max(1, len(texts) // 128)][:128]
            start = time.perf_counter()
            check = encoder.embed(sample)
            seconds = (time.perf_counter() - start) * len(texts) / len(sample)
            assert np.allclose(check, vectors[:: max(1, len(texts) // 128)][:128], atol=1e-3), "not the same passages"
            return vectors, seconds
    return cached(CACHE / f"{name}.dense", lambda: encoder.embed(texts, progress=True))


def artifact_tag(directory: str = "") -> str:
    directory = Path(directory or TERM_WEIGHTS_ARTIFACT)
    tf_floor = json.loads((directory / "config.json").read_text()).get("tf_floor", 0.0)
    return hashlib.sha1((directory / "model.safetensors").read_bytes() + str(tf_floor).encode()).hexdigest()[:10]


class Dataset:
    """Everything encoded once; every pipeline below searches subsets of these rows."""

    def __init__(self, name: str, settings: CollectionSettings):
        self.name = name
        self.docs, self.queries, self.qrels = load(name)
        self.ids = [d.id for d in self.docs]
        self.texts = [d.content for d in self.docs]
        encoder = load_encoder("")
        self.dense, self.dense_seconds = dense_embeddings(name, self.texts)
        self.query_vectors, _ = cached(CACHE / f"{name}.queries", lambda: encoder.embed(list(self.queries.values())))
        self.bm25 = BM25Retriever(settings)
        start = time.perf_counter()
        self.bm25_rows = self.bm25.encode_documents(self.docs)
        self.bm25_seconds = time.perf_counter() - start
        self.impact = ImpactRetriever(settings)
        self.impact_rows, self.impact_seconds = self._cached_rows(f"{name}.impact-{artifact_tag(settings.term_weights)}")
        self.bm25_queries = self.bm25.encode_queries(list(self.queries.values()))

    def _cached_rows(self, key: str):
        path = CACHE / f"{key}.npz"
        if path.exists():
            saved = np.load(path, allow_pickle=False)
            import scipy.sparse as sp

            matrix = sp.csr_matrix((saved["data"], saved["indices"], saved["indptr"]), shape=tuple(saved["shape"]))
            return SparseRows(matrix, saved["terms"], saved["lengths"]), float(saved["seconds"])
        start = time.perf_counter()
        rows = self.impact.encode_documents(self.docs)
        seconds = time.perf_counter() - start
        m = rows.matrix
        np.savez(path, data=m.data, indices=m.indices, indptr=m.indptr, shape=np.array(m.shape),
                 terms=rows.terms, lengths=rows.lengths, seconds=seconds)
        return rows, seconds

    # Searching a subset of rows ------------------------------------------------------------------
    def lexical_run(self, retriever, rows: SparseRows, kept: np.ndarray) -> dict:
        part = _part(rows, kept)
        run = {}
        for qid, query in zip(self.queries, self.bm25_queries):
            hits = retriever.search([part], [np.array([], "int64")], query, DEPTH)
            run[qid] = [(self.ids[kept[h.row]], h.score) for h in hits]
        return run

    def dense_run(self, kept: np.ndarray) -> dict:
        scores = self.query_vectors @ self.dense[kept].T
        run = {}
        for qid, row in zip(self.queries, scores):
            top = np.argsort(-row)[:DEPTH]
            run[qid] = [(self.ids[kept[i]], float(row[i])) for i in top]
        return run

    def runs(self, kept: np.ndarray) -> dict[str, dict]:
        runs = {"bm25": self.lexical_run(self.bm25, self.bm25_rows, kept),
                "impact": self.lexical_run(self.impact, self.impact_rows, kept),
                "dense": self.dense_run(kept)}
        for combo in (("bm25", "dense"), ("impact", "dense"), ("bm25", "impact"), ("bm25", "impact", "dense")):
            runs["rrf(" + "+".join(combo) + ")"] = {
                qid: reciprocal_rank({name: runs[name][qid] for name in combo}, 60)[:DEPTH] for qid in self.queries}
        return runs

    def per_query(self, run: dict) -> dict[str, dict[str, float]]:
        """Per-query nDCG@10 and R@100; queries with nothing retrieved score 0."""
        trec = [ir_measures.ScoredDoc(qid, doc_id, score) for qid, hits in run.items() for doc_id, score in hits]
        out = {str(m): {q: 0.0 for q in self.queries} for m in (nDCG @ 10, R @ 100)}
        for metric in ir_measures.iter_calc([nDCG @ 10, R @ 100], self.qrels, trec):
            out[str(metric.measure)][metric.query_id] = metric.value
        return out

    def index_bytes(self, kept: np.ndarray) -> dict[str, int]:
        def sparse(rows):
            m = rows.matrix[kept]
            return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
        return {"bm25": sparse(self.bm25_rows), "impact": sparse(self.impact_rows),
                "dense": int(len(kept) * self.dense.shape[1] * 4)}


def _part(rows: SparseRows, kept: np.ndarray):
    from sieve.index.lexical import SparsePart

    sub = SparseRows(rows.matrix[kept], rows.terms, rows.lengths[kept])
    return SparsePart(sub, sub.matrix.tocsc(), {t: i for i, t in enumerate(sub.terms.tolist())})


def quality_scores(data: Dataset, estimator: str) -> tuple[np.ndarray, float]:
    """Scores of every passage, and the seconds scoring took (cached for the neural estimators)."""
    if estimator == "random":  # what pruning costs when the scores know nothing
        return np.random.default_rng(0).random(len(data.texts)).astype("float32"), 0.0
    if estimator in ("unique_terms", "lm_divergence"):
        start = time.perf_counter()
        return score_passages(data.texts, estimator), time.perf_counter() - start
    if estimator == "supervised" and data.name == "scifact":
        def cross_fitted():
            scores = np.zeros(len(data.texts), "float32")
            order = np.argsort(data.ids, kind="stable")  # train_quality's folds: position in sorted ids
            for fold in range(2):
                rows = order[np.arange(len(order)) % 2 == fold]
                scores[rows] = supervised([data.texts[r] for r in rows], str(CACHE / f"quality_fold{fold}"))
            return scores
        return cached(CACHE / f"{data.name}.quality-supervised-crossfit", cross_fitted)
    return cached(CACHE / f"{data.name}.quality-{estimator}", lambda: score_passages(data.texts, estimator))


def held_out_check(data: Dataset) -> dict:
    """BM25 against impacts on the SciFact train queries that term-weight training held out."""
    held_out = json.loads((Path(data.impact.settings.term_weights or TERM_WEIGHTS_ARTIFACT)
                           / "held_out_queries.json").read_text())
    corpus, queries, qrels = load_beir(DATA / data.name, "train")
    qrels = relevant(qrels, corpus)
    check = Dataset.__new__(Dataset)
    check.__dict__.update(data.__dict__)
    check.queries = {q: queries[q] for q in held_out}
    check.qrels = [ir_measures.Qrel(q, d, 1) for q in held_out for d in qrels[q]]
    check.bm25_queries = data.bm25.encode_queries(list(check.queries.values()))
    everything = np.arange(len(data.docs))
    out = {"queries": len(held_out)}
    for name, retriever, rows in (("bm25", data.bm25, data.bm25_rows), ("impact", data.impact, data.impact_rows)):
        out[name] = check.per_query(check.lexical_run(retriever, rows, everything))["nDCG@10"]
    out["p_impact_vs_bm25"] = float(ttest_rel(list(out["impact"].values()), list(out["bm25"].values())).pvalue)
    out["bm25"], out["impact"] = mean(out["bm25"].values()), mean(out["impact"].values())
    print(f"held-out train queries ({len(held_out)}): BM25 {out['bm25']:.4f} impact {out['impact']:.4f} "
          f"p={out['p_impact_vs_bm25']:.3g}", flush=True)
    return out


def mean(values) -> float:
    return float(np.mean(list(values)))


def evaluate(name: str, settings: CollectionSettings) -> dict:
    data = Dataset(name, settings)
    n = len(data.docs)
    everything = np.arange(n)
    base_runs = data.runs(everything)
    base = {k: data.per_query(run) for k, run in base_runs.items()}
    ndcg = "nDCG@10"
    systems = {}
    for system, metrics in base.items():
        entry = {ndcg: mean(metrics[ndcg].values()), "R@100": mean(metrics["R@100"].values())}
        for reference in ("bm25", "dense", "impact"):
            if reference != system and (reference in system or system == "impact"):
                q = list(data.queries)
                entry[f"p_vs_{reference}"] = float(ttest_rel([metrics[ndcg][x] for x in q],
                                                             [base[reference][ndcg][x] for x in q]).pvalue)
        systems[system] = entry
    seconds_per_doc = {"bm25": data.bm25_seconds / n, "impact": data.impact_seconds / n,
                       "dense": data.dense_seconds / n}
    pruning = []
    for estimator in ESTIMATORS:
        scores, estimator_seconds = quality_scores(data, estimator)
        order = np.argsort(scores, kind="stable")
        for ratio in PRUNE_RATIOS:
            kept = np.sort(order[int(ratio * n):])
            if ratio == 0:
                metrics = {k: base[k] for k in ("bm25", "impact", "dense", "rrf(bm25+dense)")}
            else:
                runs = data.runs(kept)
                metrics = {k: data.per_query(runs[k]) for k in ("bm25", "impact", "dense", "rrf(bm25+dense)")}
            row = {"estimator": estimator, "prune_ratio": ratio, "kept": int(len(kept)),
                   "estimator_seconds": round(estimator_seconds, 2), "index_bytes": data.index_bytes(kept)}
            for system, values in metrics.items():
                q = list(data.queries)
                full = mean(base[system][ndcg].values())
                pruned = mean(values[ndcg].values())
                p = float(ttest_rel([values[ndcg][x] for x in q], [base[system][ndcg][x] for x in q]).pvalue) if ratio else 1.0
                row[system] = {ndcg: pruned, "ratio_to_unpruned": pruned / full if full else None, "p_vs_unpruned": p}
            # Indexing time: estimator over every passage + each index's measured per-passage cost on the kept.
            row["indexing_seconds"] = {k: round(estimator_seconds * (ratio > 0) + s * len(kept), 2)
                                       for k, s in seconds_per_doc.items()}
            pruning.append(row)
            print(f"{name:9s} {estimator:14s} {ratio:4.0%}  " + "  ".join(
                f"{k} {row[k][ndcg]:.4f} ({row[k]['ratio_to_unpruned']:.3f}, p={row[k]['p_vs_unpruned']:.2f})"
                for k in ("bm25", "impact", "dense")), flush=True)
    for system, entry in systems.items():
        print(f"{name:9s} {system:24s} nDCG@10 {entry[ndcg]:.4f} R@100 {entry['R@100']:.4f} "
              + " ".join(f"{k}={v:.3g}" for k, v in entry.items() if k.startswith("p_")), flush=True)
    extra = {"held_out_train_queries": held_out_check(data)} if name == "scifact" else {}
    return {**extra, "documents": n, "queries": len(data.queries), "systems": systems, "pruning": pruning,
            "encode_seconds_per_passage": seconds_per_doc}


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Importance-aware indexing (bench/importance.py)", "",
             "## Learned term weights and fusion (nDCG@10 / R@100; p: paired t-test over queries)", "",
             "| dataset | " + " | ".join(next(iter(results.values()))["systems"]) + " |",
             "|---|" + "---|" * len(next(iter(results.values()))["systems"])]
    for name, r in results.items():
        cells = [f"{e['nDCG@10']:.3f} / {e['R@100']:.3f}" for e in r["systems"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "p-values: " + "; ".join(
        f"{name} {system} vs {k[5:]}: {v:.3g}" for name, r in results.items()
        for system, e in r["systems"].items() for k, v in e.items() if k.startswith("p_vs_")), ""]
    for name, r in results.items():
        if "held_out_train_queries" in r:
            h = r["held_out_train_queries"]
            lines += [f"Held-out SciFact train queries ({h['queries']}): BM25 {h['bm25']:.3f}, impact {h['impact']:.3f} "
                      f"(p={h['p_impact_vs_bm25']:.3g}).", ""]
    lines += ["Indexing time: the estimator over every passage plus each index's per-passage encoding time "
              "(measured over the whole corpus once) times the passages kept.", ""]
    for name, r in results.items():
        lines += [f"## Quality pruning, {name} (nDCG@10, ratio to unpruned, p vs unpruned)", "",
                  "| estimator | pruned | BM25 | impact | dense | RRF(BM25, dense) | estimator s | indexing s (dense) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["pruning"]:
            cells = [f"{row[k]['nDCG@10']:.3f} ({row[k]['ratio_to_unpruned']:.3f}, p={row[k]['p_vs_unpruned']:.2f})"
                     for k in ("bm25", "impact", "dense", "rrf(bm25+dense)")]
            lines.append(f"| {row['estimator']} | {row['prune_ratio']:.0%} | " + " | ".join(cells)
                         + f" | {row['estimator_seconds']:.1f} | {row['indexing_seconds']['dense']:.0f} |")
        lines.append("")
    path.write_text("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for estimator in ESTIMATORS:
            for system, marker in (("bm25", "o"), ("impact", "s"), ("dense", "^")):
                rows = [r for r in results[name]["pruning"] if r["estimator"] == estimator]
                ax.plot([r["index_bytes"][system] / 2**20 for r in rows], [r[system]["nDCG@10"] for r in rows],
                        marker=marker, label=f"{system}, {estimator}", alpha=0.7)
        ax.set_xscale("log")
        ax.set_title(f"{name}: pruning 0-40%")
        ax.set_xlabel("index size (MiB, log)")
        ax.set_ylabel("nDCG@10")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="scifact,cranfield,cisi,medline")
    parser.add_argument("--cache-only", action="store_true", help="only fill the embedding and impact caches")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--term-weights", default="", help="a term-weight artifact folder (default: the shipped one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = CollectionSettings(indexes=("bm25", "impact"), term_weights=args.term_weights)
    if args.cache_only:
        for name in args.datasets.split(","):
            Dataset(name, settings)
        return
    started = time.time()
    results = {name: evaluate(name, settings) for name in args.datasets.split(",")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"datasets": results, "settings": {"bm25_k1": settings.bm25_k1, "bm25_b": settings.bm25_b,
                                                 "rrf_k": 60, "depth": DEPTH},
               "term_weights_artifact": artifact_tag(args.term_weights), "seconds": round(time.time() - started, 1)}
    (RESULTS / "importance.json").write_text(json.dumps(payload, indent=2))
    write_markdown(results, RESULTS / "importance.md")
    plot(results, RESULTS / "importance.png")
    print(f"wrote {RESULTS}/importance.{{json,md,png}} in {payload['seconds']} s")


if __name__ == "__main__":
    main()
