"""BEIR folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): the one loader that training,
evaluation and benchmarks share, and evaluating runs on them."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .errors import InvalidArgument

MEASURES = ("nDCG@10", "R@100")
# the shared test collections sit beside the checkout (../shared/datasets) unless SIEVE_DATASETS says otherwise
DATASETS = Path(os.environ.get("SIEVE_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def cache_dir(part: str) -> Path:
    """Where training and benchmarks keep what they derive from datasets ($SIEVE_CACHE, read at call time)."""
    return Path(os.environ.get("SIEVE_CACHE", Path.home() / ".cache" / "sieve")) / part


def load_corpus(folder: str | Path) -> dict[str, dict[str, str]]:
    """{document id: {"title", "text"}}."""
    with open(Path(folder) / "corpus.jsonl") as lines:
        return {str(row["_id"]): {"title": row.get("title") or "", "text": row.get("text") or ""}
                for row in map(json.loads, lines)}


def load_judged_queries(folder: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """(queries that have judgements in the split, qrels {query id: {document id: grade}})."""
    folder = Path(folder)
    qrels: dict[str, dict[str, int]] = {}
    path = folder / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"no judgements at {path}")
    with open(path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            qrels.setdefault(str(row["query-id"]), {})[str(row["corpus-id"])] = int(float(row["score"]))
    queries = {}
    with open(folder / "queries.jsonl") as f:
        for line in f:
            query = json.loads(line)
            if str(query["_id"]) in qrels:
                queries[str(query["_id"])] = query["text"]
    return queries, qrels


def load_beir(folder: str | Path, split: str) -> tuple[dict, dict[str, str], dict[str, dict[str, int]]]:
    """(corpus, judged queries, qrels) of one split; a folder that is not BEIR is an InvalidArgument."""
    folder = Path(folder)
    if not (folder / "corpus.jsonl").is_file() or not (folder / "qrels" / f"{split}.tsv").is_file():
        raise InvalidArgument(f"{folder} is not a BEIR folder with corpus.jsonl and qrels/{split}.tsv")
    return (load_corpus(folder), *load_judged_queries(folder, split))


def relevant(qrels: dict[str, dict[str, int]], corpus: dict) -> dict[str, set[str]]:
    """{query id: ids of its relevant documents that the corpus holds}."""
    found = {q: {d for d, grade in judged.items() if grade > 0 and d in corpus} for q, judged in qrels.items()}
    return {q: docs for q, docs in found.items() if docs}


def passage_text(document: dict[str, str]) -> str:
    return f"{document['title']} {document['text']}".strip()


def evaluate(run: dict[str, dict[str, float]], qrels: dict) -> dict[str, float]:
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    scores = ir_measures.calc_aggregate(measures, qrels, run)
    return {name: round(scores[m], 4) for name, m in zip(MEASURES, measures)}


def per_query(run: dict, qrels: dict, measure: str = "nDCG@10") -> dict[str, float]:
    import ir_measures

    return {m.query_id: m.value for m in ir_measures.iter_calc([ir_measures.parse_measure(measure)], qrels, run)}
