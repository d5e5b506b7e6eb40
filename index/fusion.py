"""Fusing ranked lists from several retrievers: reciprocal-rank fusion and weighted score fusion.

`FUSIONS` is the one registry of methods; settings and requests are checked against it here.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable

from .errors import InvalidArgument

Ranking = list[tuple[Hashable, float]]


def reciprocal_rank(rankings: dict[str, Ranking], k: int = 60, weights: dict[str, float] | None = None) -> Ranking:
    """RRF (Cormack et al., 2009): sum of weight / (k + rank) over the lists a document appears in."""
    fused: dict[Hashable, float] = defaultdict(float)
    for name, ranking in rankings.items():
        weight = (weights or {}).get(name, 1.0)
        for rank, (key, _) in enumerate(ranking, start=1):
            fused[key] += weight / (k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


def weighted_scores(rankings: dict[str, Ranking], weights: dict[str, float] | None = None) -> Ranking:
    """Min-max normalise each list's scores, then sum them with per-retriever weights."""
    fused: dict[Hashable, float] = defaultdict(float)
    for name, ranking in rankings.items():
        if not ranking:
            continue
        scores = [score for _, score in ranking]
        low, span = min(scores), (max(scores) - min(scores)) or 1.0
        weight = (weights or {}).get(name, 1.0)
        for key, score in ranking:
            fused[key] += weight * (score - low) / span
    return sorted(fused.items(), key=lambda item: -item[1])


FUSIONS = {
    "rrf": lambda rankings, rrf_k, weights: reciprocal_rank(rankings, rrf_k, weights),
    "weighted": lambda rankings, rrf_k, weights: weighted_scores(rankings, weights),
}


def check_fusion(method: str) -> str:
    if method not in FUSIONS:
        raise InvalidArgument(f"unknown fusion {method!r}; choose from {', '.join(FUSIONS)}")
    return method


def fuse(method: str, rankings: dict[str, Ranking], rrf_k: int = 60,
         weights: dict[str, float] | None = None) -> Ranking:
    """One list: a single ranking as it is, several by `method`."""
    if len(rankings) == 1:
        return next(iter(rankings.values()))
    return FUSIONS[check_fusion(method)](rankings, rrf_k, weights or None)
