"""A distilled pre-ranker: SPLADE-tiny (2 layers, 128-d; by its size 1/15 of MiniLM-L6's cost per pair, on
2 CPU cores measured nearer 1/6) as a cross-encoder, trained to reproduce the main reranker's scores on
pseudo-queries, that cuts the candidate list before the main model runs.

It learns from what label-free exit-head training already has (exit_heads.observe): every held-in
pseudo-query's candidates with the main model's final scores; the loss is the heads' own
(distillation_loss). Its cut is a margin below its k-th best score, calibrated on the held-out
pseudo-queries together with the exit heads' default pruning, against the same top-10 agreement target,
with its cost measured against the main model's: a cut is kept only where it beats the heads alone.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sieve.index.errors import InvalidArgument
from sieve.index.term_weights import freeze_embeddings, load_backbone, load_tokenizer

from .base import Reranker, RerankResult
from .calibration import HEAD_COST, margins_by_recall
from .model import ScoreHead, segment_masks
from .limits import validate_request
from .pruning import NO_PRUNING, keep_count, simulate_pruning



def load_pre_ranker(path) -> PreRanker:
    from safetensors.torch import load_file

    model = PreRanker()
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    except Exception as error:  # unreadable or damaged
        raise InvalidArgument(f"{path} cannot be read as a pre-ranker: {error}") from None
    if unexpected or any("embeddings" not in key for key in missing):
        raise InvalidArgument(f"{path} does not fit the pre-ranker: {unexpected or missing}")
    return model.eval()


class PreRanker(nn.Module):
    """SPLADE-tiny's BERT over [CLS] query [SEP] passage [SEP], scored by a ScoreHead on its last layer."""

    def __init__(self, max_length: int = 256):
        super().__init__()
        self.bert = load_backbone()
        self.head = ScoreHead(self.bert.config.hidden_size)
        self.tokenizer = load_tokenizer()
        self.max_length = max_length

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.bert(**batch).last_hidden_state
        return self.head(hidden, *segment_masks(batch, (101, 102), 102))  # BERT's [CLS], [SEP]

    def encode(self, query: str, passages: list[str]) -> dict:
        return dict(self.tokenizer([query] * len(passages), list(passages), truncation="longest_first",
                                   max_length=self.max_length, padding=True, return_tensors="pt"))

    def serving(self, device, dtype: torch.dtype) -> "PreRanker":
        """On the main model's device and in its dtype; the head stays float32, as every ScoreHead does."""
        self.to(device=device, dtype=dtype)
        self.head.float()
        return self.eval()

    def scores(self, query: str, passages: list[str]) -> torch.Tensor:
        device = self.head.bias.device
        with torch.inference_mode():
            return self({k: v.to(device) for k, v in self.encode(query, passages).items()}).float().cpu()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What the artifact stores: all but the frozen word-piece embeddings (they come with the package)."""
        return {k: v.detach().float().contiguous() for k, v in self.state_dict().items() if "embeddings" not in k}


def train_pre_ranker(requests: list[tuple[str, list[str]]], finals: list[torch.Tensor], epochs: int = 3,
                     lr: float = 3e-4, seed: int = 13) -> tuple[PreRanker, dict]:
    """Fit a PreRanker to the main model's final scores of each request's passages (one query per step)."""
    from .exit_heads import distillation_loss

    torch.manual_seed(seed)
    model = PreRanker()
    freeze_embeddings(model.bert)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    rng, losses, started = np.random.default_rng(seed), [], time.perf_counter()
    model.train()
    with tqdm(total=epochs * len(requests), desc="distilling the pre-ranker", unit="query", mininterval=10) as bar:
        for _ in range(epochs):
            for i in rng.permutation(len(requests)):
                query, passages = requests[i]
                scores = model(model.encode(query, passages))[None]
                target = finals[i][None]
                loss = distillation_loss(scores, target, torch.ones_like(target, dtype=torch.bool))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update()
    model.eval()
    return model, {"epochs": epochs, "queries": len(requests), "final_loss": round(float(np.mean(losses[-100:])), 4),
                   "seconds": round(time.perf_counter() - started, 1)}


def calibrate_cut(pre_scores: list[np.ndarray], layer_scores: list[np.ndarray], checkpoints, margins: dict,
                  pre_cost: float, k: int = 10, min_overlap: float = 0.98, safety: int = 5) -> dict:
    """The pre-ranker's margin: of those calibrated at several recalls (how far below its k-th best score a
    member of the main model's final top k may fall), the cheapest whose cut, followed by the exit heads'
    own pruning, keeps `min_overlap` of the final top k on held-out pseudo-queries. `pre_cost`: what scoring
    a pair costs the pre-ranker, in main-model layers (measured, see measure_pre_cost). None: no cut beats
    the heads' pruning alone."""
    rows = [np.vstack([p[None], s]) for p, s in zip(pre_scores, layer_scores)]  # the pre-ranker as "layer 1"
    cut_margins = margins_by_recall(rows, [1], k)
    full = sum(s.size for s in layer_scores)
    alone = 0.0  # the heads' pruning without a cut: what a cut must beat
    for scores in layer_scores:
        survivors, _, run = simulate_pruning(scores, k, checkpoints, margins, safety)
        alone += run + HEAD_COST * sum(survivors[:-1])
    options = []
    for recall, by_layer in cut_margins.items():
        margin, cost, overlap = by_layer["1"], 0.0, 0.0
        for pre, scores in zip(pre_scores, layer_scores):
            ranked = np.argsort(-pre, kind="stable")
            kept = np.sort(ranked[:keep_count(pre[ranked], k, margin, safety)])
            survivors, order, run = simulate_pruning(scores[:, kept], k, checkpoints, margins, safety)
            cost += pre_cost * len(pre) + run + HEAD_COST * sum(survivors[:-1])
            top = set(np.argsort(-scores[-1], kind="stable")[:k].tolist())
            overlap += len(top & set(kept[order[:k]].tolist())) / len(top)
        options.append({"recall": recall, "margin": margin, "speedup": round(full / cost, 3),
                        "top10_overlap": round(overlap / len(pre_scores), 4)})
    safe = [o for o in options if o["top10_overlap"] >= min_overlap and o["speedup"] > full / alone]
    return {"options": options, "pre_cost_in_layers": round(pre_cost, 3), "heads_alone_speedup": round(full / alone, 3),
            "chosen": max(safe, key=lambda o: o["speedup"]) if safe else None}


def measure_pre_cost(pre: PreRanker, main, requests: list[tuple[str, list[str]]]) -> tuple[list[np.ndarray], float]:
    """The pre-ranker's scores of each request, and its cost per pair in layers of the main model: both
    timed on the same requests, as they serve (a small model is bound by overheads, not by its size)."""
    began = time.perf_counter()
    scores = [pre.scores(q, p).numpy() for q, p in requests]
    pre_seconds = time.perf_counter() - began
    began = time.perf_counter()
    main.rerank_many([(q, p, 10, NO_PRUNING) for q, p in requests])
    main_seconds = time.perf_counter() - began
    return scores, pre_seconds / (main_seconds / main.num_layers)


class PreRankedReranker(Reranker):
    """A pre-ranker's cut, then the main reranker (with its own pruning) on what survives. A request with
    pruning off skips the cut: unpruned means the main model on every candidate."""

    def __init__(self, main: Reranker, pre: PreRanker, margin: float, safety: int = 5):
        self.main, self.pre, self.margin, self.safety = main, pre, margin, safety
        self.default_checkpoints, self.fusion_weight = main.default_checkpoints, main.fusion_weight
        self.num_layers, self.checkpoint_layers = main.num_layers, main.checkpoint_layers

    def rerank_many(self, requests):
        checked = []
        for query, passages, k, options in requests:  # every request checked before any model runs
            validate_request(query, passages, k)
            checked.append((query, passages, k, self.main.effective_options(options)))
        cuts = []
        for query, passages, k, options in checked:
            if not options.prune or len(passages) <= k + max(self.safety, options.safety):
                cuts.append(list(range(len(passages))))
                continue
            scores = self.pre.scores(query, passages)
            ranked = torch.argsort(scores, descending=True, stable=True)
            keep = keep_count(scores[ranked], k, self.margin, max(self.safety, options.safety))
            cuts.append(sorted(ranked[:keep].tolist()))
        results = self.main.rerank_many([(q, [p[i] for i in cut], k, o) for (q, p, k, o), cut in zip(checked, cuts)])
        return [RerankResult(order=[cut[i] for i in r.order], scores=r.scores,
                             survivors=[len(p), *r.survivors] if o.prune else r.survivors)
                for r, cut, (_, p, _, o) in zip(results, cuts, checked)]
