"""Can a distilled pre-ranker cut top-100 candidates to a few dozen and keep the main reranker's top 10?

The pre-ranker (rankers/pre_ranker.py) distilled from the main model's final scores on `--pseudo-queries`
pseudo-queries x `--depth` first-stage candidates of SciFact; then, on the first `--queries` SciFact test
queries' RRF(BM25, dense) top 100, the share of the main model's top 10 that lands in the pre-ranker's top
N, against the first stage's own order and the reciprocal-rank fusion of both. No timing: recall is what
decides whether a cut can pay.

    python -m bench.pre_ranker_recall          # about 20 minutes on 2 cores; prints one JSON line per ranking
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from sieve.index.beir import cache_dir, passage_text
from sieve.index.documents import Document
from sieve.index.fusion import reciprocal_rank
from sieve.rankers.exit_heads import observe, pseudo_queries
from sieve.rankers.first_stage import FirstStage
from sieve.rankers.pre_ranker import train_pre_ranker
from sieve.rankers.reranker import open_reranker

from .rerank import first_stage_run

CUTS = (20, 30, 40, 50, 60)


def recall_at_cuts(orders: list[list[int]], finals: list[torch.Tensor], k: int = 10) -> dict[int, float]:
    """For each cut N: the mean share of the final top k found in the first N of each order."""
    shares = {n: [] for n in CUTS}
    for order, final in zip(orders, finals):
        top = set(torch.argsort(final, descending=True)[:k].tolist())
        for n in CUTS:
            shares[n].append(len(top & set(order[:n])) / k)
    return {n: round(float(np.mean(v)), 3) for n, v in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pseudo-queries", type=int, default=200)
    parser.add_argument("--depth", type=int, default=100, help="candidates per pseudo-query the pre-ranker learns from")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    corpus, queries, _, qids, candidates, _ = first_stage_run("scifact", 100)
    stage = FirstStage(corpus, cache=cache_dir("reranker") / "scifact_first_stage")
    main_model = open_reranker("")

    def final_scores(requests):
        seen = observe(main_model.model, main_model.tokenizer, requests, (), main_model.max_length, main_model.dtype)
        return [o.final for o in seen]

    made = pseudo_queries([Document(d, corpus[d]["text"], corpus[d]["title"]) for d in corpus], args.pseudo_queries)
    found = stage.search([q for q, _ in made], args.depth)
    train = [(q, [passage_text(corpus[d]) for d in c.ids[:args.depth]]) for (q, _), c in zip(made, found)]
    test = [(queries[q], [passage_text(corpus[d]) for d in c.ids[:100]])
            for q, c in zip(qids[:args.queries], candidates[:args.queries])]
    train_finals, test_finals = final_scores(train), final_scores(test)
    print(json.dumps({"ranking": "first stage", "recall_of_top10_within": recall_at_cuts(
        [list(range(len(p))) for _, p in test], test_finals)}), flush=True)
    pre, record = train_pre_ranker(train, train_finals, epochs=args.epochs)
    pre.serving(main_model.device, main_model.dtype)
    orders = [torch.argsort(pre.scores(q, p), descending=True).tolist() for q, p in test]
    print(json.dumps({"ranking": "pre-ranker", "pseudo_queries": args.pseudo_queries, "depth": args.depth,
                      "training": record, "recall_of_top10_within": recall_at_cuts(orders, test_finals)}), flush=True)
    # Both orders know something the other does not: does a cut on their reciprocal-rank fusion keep more?
    # (The first stage's order goes in first, so ties keep its order.)
    fused = [[position for position, _ in reciprocal_rank({"first stage": [(i, 0) for i in range(len(order))],
                                                           "pre-ranker": [(i, 0) for i in order]}, RRF_K)]
             for order in orders]
    print(json.dumps({"ranking": f"RRF(pre-ranker, first stage), k={RRF_K}",
                      "recall_of_top10_within": recall_at_cuts(fused, test_finals)}), flush=True)


RRF_K = 60

if __name__ == "__main__":
    main()
