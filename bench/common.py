"""What every benchmark shares: BEIR loading, evaluation with ir-measures, result files."""
from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path

import ir_measures
from ir_measures import R, nDCG

from sieve.index.documents import Document, read_jsonl

DATASETS = Path(os.environ.get("SIEVE_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
RESULTS = Path(__file__).resolve().parent / "results"
MEASURES = [nDCG @ 10, R @ 100]


def load_corpus(name: str) -> list[Document]:
    return [d for d in read_jsonl(DATASETS / name / "corpus.jsonl") if isinstance(d, Document)]


def load_queries(name: str, split: str = "test") -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """(queries with judgements in the split, qrels)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(DATASETS / name / "qrels" / f"{split}.tsv") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    queries = {}
    with open(DATASETS / name / "queries.jsonl") as f:
        for line in f:
            q = json.loads(line)
            if q["_id"] in qrels:
                queries[q["_id"]] = q["text"]
    return queries, qrels


def evaluate(run: dict[str, dict[str, float]], qrels: dict) -> dict[str, float]:
    scores = ir_measures.calc_aggregate(MEASURES, qrels, run)
    return {"nDCG@10": round(scores[nDCG @ 10], 4), "R@100": round(scores[R @ 100], 4)}


def per_query_ndcg(run: dict, qrels: dict) -> dict[str, float]:
    return {m.query_id: m.value for m in ir_measures.iter_calc([nDCG @ 10], qrels, run)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def write_results(name: str, figures: dict, markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    figures = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
               "date": time.strftime("%Y-%m-%d %H:%M"), **figures}
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
