"""Rerankers: Sieve's cross-encoder with early-layer candidate pruning, and any HF cross-encoder."""
from .base import Reranker, RerankResult
from .external import ExternalReranker
from .layered import LayeredReranker
from .pruning import NO_PRUNING, PruningOptions
from .reranker import fuse_with_first_stage, load_reranker

__all__ = ["NO_PRUNING", "ExternalReranker", "LayeredReranker", "PruningOptions", "Reranker", "RerankResult",
           "fuse_with_first_stage", "load_reranker"]
