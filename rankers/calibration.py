"""Calibration on held-out judged queries: per-layer pruning margins, the default pruning setting, and
the weight of the reranker against the first stage."""
from __future__ import annotations

import itertools
import random

import numpy as np
import torch
from tqdm import tqdm

from sieve.index.beir import passage_text

from .first_stage import FirstStage
from .pruning import simulate_pruning


def split_train_queries(query_ids, seed: int = 13, dev_size: int = 100) -> tuple[list[str], list[str]]:
    """Train query ids, split into (train, dev); dev tunes fusion and pruning margins."""
    ids = sorted(query_ids)
    random.Random(seed).shuffle(ids)
    dev_size = min(dev_size, len(ids) // 5)  # small folders keep most queries for training
    return ids[dev_size:], ids[:dev_size]


PRUNING_CANDIDATES = ((1, 2, 3, 4, 5), (1, 3, 5), (2, 4), (1, 3), (1, 2), (2, 3), (1,), (2,), (3,))
HEAD_COST = 0.03  # measured: a checkpoint head scores a row for about 3% of a layer's work


def scaled_candidates(num_layers: int) -> tuple[tuple[int, ...], ...]:
    """PRUNING_CANDIDATES (chosen for 6 layers) at the same relative depths of a num_layers-layer model."""
    scaled = []
    for checkpoints in PRUNING_CANDIDATES:
        layers = tuple(sorted({min(num_layers - 1, max(1, round(c * num_layers / 6))) for c in checkpoints}))
        if layers not in scaled and num_layers > 1:
            scaled.append(layers)
    return tuple(scaled)


def margins_by_recall(layer_scores: list, layers, k: int = 10, recalls=(0.9, 0.95, 0.98, 0.99, 0.995)) -> dict:
    """{recall: {layer: margin}} from unpruned scores ([num_layers, n] per query): a layer's margin for
    recall r is how far below that layer's k-th best score a member of the final top k may fall and still
    survive, such that a share r of all final top-k members survive it."""
    needed = {layer: [] for layer in layers}
    for scores in layer_scores:
        scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
        top = torch.argsort(scores[-1], descending=True)[:k]
        for layer in layers:
            kth = torch.sort(scores[layer - 1], descending=True).values[min(k, scores.shape[1]) - 1]
            needed[layer].extend((kth - scores[layer - 1][top]).tolist())
    return {str(r): {str(layer): max(0.0, float(np.quantile(v, r, method="higher"))) for layer, v in needed.items()}
            for r in recalls}


def pruning_frontier(layer_scores: list, margins_by_recall: dict, k: int = 10,
                     candidates=PRUNING_CANDIDATES) -> list[dict]:
    """Simulate every checkpoint set of `candidates` with every per-layer choice of calibrated margin;
    keep the settings no other beats on both speedup and top-k overlap with the unpruned ranking."""
    layer_scores = [np.asarray(s, dtype=np.float32) for s in layer_scores]
    full_rows = sum(s.size for s in layer_scores)
    full_tops = [set(np.argsort(-s[-1], kind="stable")[:k].tolist()) for s in layer_scores]
    recalls = sorted(margins_by_recall)
    settings = []
    for checkpoints in candidates:
        if not all(str(c) in margins_by_recall[recalls[0]] for c in checkpoints):
            continue
        for chosen in itertools.product(recalls, repeat=len(checkpoints)):
            margins = {c: margins_by_recall[r][str(c)] for c, r in zip(checkpoints, chosen)}
            rows, overlap = 0.0, 0.0
            for scores, full in zip(layer_scores, full_tops):
                survivors, order, run = simulate_pruning(scores, k, checkpoints, margins)
                rows += run + HEAD_COST * sum(survivors[:-1])
                overlap += len(full & set(order[:k].tolist())) / len(full)
            settings.append({"checkpoints": list(checkpoints), "recalls": dict(zip(map(str, checkpoints), chosen)),
                             "margins": {str(c): m for c, m in margins.items()}, "speedup": round(full_rows / rows, 3),
                             "top10_overlap": round(overlap / len(layer_scores), 4)})
    settings.sort(key=lambda s: (-s["top10_overlap"], -s["speedup"]))
    frontier, fastest = [], 0.0
    for setting in settings:  # by falling overlap: keep each that is faster than every safer one
        if setting["speedup"] > fastest:
            frontier.append(setting)
            fastest = setting["speedup"]
    return frontier


def cheapest_setting(frontier: list[dict], min_overlap: float) -> dict | None:
    """The fastest frontier setting whose dev top-k overlap is at least `min_overlap` (None: none is, or none
    is faster than not pruning: with so few candidates that k + safety keeps nearly all, heads only cost)."""
    safe = [s for s in frontier if s["top10_overlap"] >= min_overlap and s["speedup"] > 1]
    return max(safe, key=lambda s: s["speedup"]) if safe else None


def calibrate(model, tokenizer, first_stage: FirstStage, corpus: dict, queries: dict, qrels: dict, depth: int = 30,
              k: int = 10, recalls=(0.9, 0.95, 0.98, 0.99, 0.995), dev_queries: int = 100,
              min_overlap: float = 0.98) -> dict:
    """On held-out SciFact train queries: per-layer pruning margins, the default pruning setting, and the
    first-stage fusion weight.

    Margins come from margins_by_recall; pruning settings built from them are then simulated on the
    same scores (exact: a candidate's score does not depend on the others); the default is the cheapest
    whose top-k overlap with the unpruned ranking is at least `min_overlap`. The fusion weight (> 0)
    maximises dev nDCG@10 of the reranker's final scores interpolated with the RRF scores (both min-max
    normalised)."""
    import ir_measures

    from sieve.index.fusion import weighted_scores

    _, dev = split_train_queries(queries)
    dev = dev[:dev_queries]
    candidates = first_stage.search([queries[q] for q in dev], depth)
    layer_scores = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for q, cands in tqdm(list(zip(dev, candidates)), desc="calibrating", mininterval=10):
            batch = tokenizer([queries[q]] * len(cands.ids), [passage_text(corpus[d]) for d in cands.ids],
                              truncation="longest_first", max_length=256, padding=True, return_tensors="pt")
            layer_scores.append(model(dict(batch)).float())
    margins = margins_by_recall(layer_scores, model.checkpoint_layers[:-1], k, recalls)

    frontier = pruning_frontier(layer_scores, margins, k)
    chosen = cheapest_setting(frontier, min_overlap) or {"checkpoints": [], "margins": {}, "speedup": 1.0}

    qrel_list = [ir_measures.Qrel(q, d, r) for q in dev for d, r in qrels[q].items()]
    by_weight = {}
    for weight in np.round(np.arange(0, 1.01, 0.1), 2):
        run = []
        for q, cands, scores in zip(dev, candidates, layer_scores):
            fused = weighted_scores({"reranker": list(zip(cands.ids, scores[-1].tolist())),
                                     "first": list(zip(cands.ids, cands.rrf))},
                                    {"reranker": float(weight), "first": float(1 - weight)})
            run += [ir_measures.ScoredDoc(q, d, float(s)) for d, s in fused]
        by_weight[float(weight)] = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], qrel_list, run)[ir_measures.nDCG @ 10]
    with_reranker = {w: v for w, v in by_weight.items() if w > 0}  # weight 0 is the first stage alone
    return {"margins_by_recall": margins, "pruning_frontier": frontier, "pruning": chosen,
            "dev_ndcg10_by_fusion_weight": by_weight, "fusion_weight": max(with_reranker, key=with_reranker.get),
            "dev_queries": len(dev), "dev_depth": depth}
