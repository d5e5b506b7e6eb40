"""Fusing ranked lists from several retrievers: reciprocal-rank fusion and weighted score fusion."""
from __future__ import annotations

from collections import defaultdict
from typing import Hashable


def reciprocal_rank(rankings: dict[str, list[tuple[Hashable, float]]], k: int = 60,
                    weights: dict[str, float] | None = None) -> list[tuple[Hashable, float]]:
    """RRF (Cormack et al., 2009): sum of weight / (k + rank) over the lists a document appears in."""
    fused: dict[Hashable, float] = defaultdict(float)
    for name, ranking in rankings.items():
        weight = (weights or {}).get(name, 1.0)
        for rank, (key, _) in enumerate(ranking, start=1):
            fused[key] += weight / (k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


def weighted_scores(rankings: dict[str, list[tuple[Hashable, float]]],
                    weights: dict[str, float] | None = None) -> list[tuple[Hashable, float]]:
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
