"""The reranker interface: what the service calls on any reranker, and what a rerank returns."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .pruning import NO_PRUNING, PruningOptions


@dataclass
class RerankResult:
    order: list[int]  # indices into the request's passages, best first: the final survivors
    scores: list[float]  # final-layer scores, aligned with order
    survivors: list[int]  # candidates alive after each checkpoint (first entry: all of them)


class Reranker(ABC):
    """Scores (query, passages, k, options) requests. Every reranker has the two attributes below; a
    reranker with no early score heads or no calibration keeps the defaults."""

    default_checkpoints: tuple[int, ...] = ()  # layers pruned at when the options name none
    fusion_weight: float | None = None  # calibrated weight against the first stage (None: not calibrated)

    def rerank(self, query: str, passages: list[str], k: int, options: PruningOptions = NO_PRUNING) -> RerankResult:
        return self.rerank_many([(query, passages, k, options)])[0]

    @abstractmethod
    def rerank_many(self, requests: list[tuple[str, list[str], int, PruningOptions]]) -> list[RerankResult]:
        """One result per request, in order; an invalid request fails the whole call before any scoring."""
