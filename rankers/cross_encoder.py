"""What Sieve's cross-encoders share: request checks, tokenising, and scoring in token-bounded stacks."""
from __future__ import annotations

import threading
from abc import abstractmethod

import torch

from sieve.index.errors import InvalidArgument

from .base import Reranker, RerankResult
from .limits import validate_request
from .pruning import NO_PRUNING, PruningOptions

TOKEN_BUDGET = 32_768  # tokens in one forward chunk: bounds memory whatever the request size


class CrossEncoderReranker(Reranker):
    """Shared request handling; subclasses score a stack of (query, passages, k, options) requests."""

    num_layers: int
    checkpoint_layers: tuple[int, ...]

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.lock = threading.Lock()  # on few cores one forward at a time is fastest

    def rerank_many(self, requests: list[tuple[str, list[str], int, PruningOptions]]) -> list[RerankResult]:
        """Validate every request, then run them in stacks of at most TOKEN_BUDGET tokens each."""
        requests = [(query, passages, k, self.effective_options(options)) for query, passages, k, options in requests]
        for query, passages, k, options in requests:
            validate_request(query, passages, k)
        encoded = [self.encode(query, passages) for query, passages, _, _ in requests]
        results: list[RerankResult | None] = [None] * len(requests)
        stack: list[int] = []
        for i in range(len(requests) + 1):
            tokens = sum(encoded[j]["attention_mask"].numel() for j in stack)
            if stack and (i == len(requests) or tokens + encoded[i]["attention_mask"].numel() > TOKEN_BUDGET):
                with self.lock, torch.inference_mode():
                    for j, result in zip(stack, self.score_stack([encoded[j] for j in stack],
                                                                 [requests[j][2:] for j in stack])):
                        results[j] = result
                stack = []
            if i < len(requests):
                stack.append(i)
        return results

    def encode(self, query: str, passages: list[str]) -> dict:
        return dict(self.tokenizer([query] * len(passages), list(passages), truncation="longest_first",
                                   max_length=self.max_length, padding=True, return_tensors="pt"))

    def effective_options(self, options: PruningOptions) -> PruningOptions:
        """The options checked. A request that asks for pruning but names no layers or margins reranks
        unpruned on a reranker with no early heads (pruning is the default, and a model without trained
        heads must still rerank); one that names them is refused with the reason."""
        if not isinstance(options, PruningOptions):
            raise InvalidArgument("options must be a PruningOptions")
        if (options.prune and options.checkpoints is None and options.margin is None and options.margins is None
                and not any(c < self.num_layers for c in self.checkpoint_layers)):
            return NO_PRUNING
        self.check_options(options)
        return options

    def check_options(self, options: PruningOptions) -> None:
        if not options.prune:
            return
        requested = sorted(set(options.checkpoints or self.checkpoint_layers) | set(options.margins or ()))
        beyond = [c for c in requested if c > self.num_layers]
        if beyond:
            raise InvalidArgument(f"no trained score head at layer(s) {beyond}: this reranker has "
                                  f"{self.num_layers} layers, with heads at {list(self.checkpoint_layers)}")
        if not any(c < self.num_layers for c in self.checkpoint_layers):
            raise InvalidArgument(f"this reranker has score heads only at its last layer ({self.num_layers}): "
                                  "early-layer pruning needs a trained head at each checkpoint layer; train "
                                  "them without labels (sieve train exit-heads --collection C), or rerank "
                                  "with pruning off")
        early = [c for c in requested if c < self.num_layers]
        if not early:
            raise InvalidArgument(f"pruning needs a checkpoint below the last layer ({self.num_layers}), got {requested}")
        missing = [c for c in early if c not in self.checkpoint_layers]
        if missing:
            raise InvalidArgument(f"no trained score head at layer(s) {missing}; this reranker has heads at "
                                  f"layers {list(self.checkpoint_layers)} of {self.num_layers}")

    @abstractmethod
    def score_stack(self, batches: list[dict], settings: list[tuple[int, PruningOptions]]) -> list[RerankResult]:
        """One result per tokenised request of the stack; settings[i] is request i's (k, options)."""
