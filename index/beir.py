"""Judged query sets in BEIR layout (queries.jsonl, qrels/<split>.tsv), and evaluating runs on them."""
from __future__ import annotations

import csv
import json
from pathlib import Path

MEASURES = ("nDCG@10", "R@100")


def load_judged_queries(folder: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """(queries that have judgements in the split, qrels)."""
    folder = Path(folder)
    qrels: dict[str, dict[str, int]] = {}
    path = folder / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"no judgements at {path}")
    with open(path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    queries = {}
    with open(folder / "queries.jsonl") as f:
        for line in f:
            query = json.loads(line)
            if query["_id"] in qrels:
                queries[query["_id"]] = query["text"]
    return queries, qrels


def evaluate(run: dict[str, dict[str, float]], qrels: dict) -> dict[str, float]:
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    scores = ir_measures.calc_aggregate(measures, qrels, run)
    return {name: round(scores[m], 4) for name, m in zip(MEASURES, measures)}


def per_query(run: dict, qrels: dict, measure: str = "nDCG@10") -> dict[str, float]:
    import ir_measures

    return {m.query_id: m.value for m in ir_measures.iter_calc([ir_measures.parse_measure(measure)], qrels, run)}
