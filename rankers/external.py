"""Hugging Face cross-encoders by name or path: the BERT family runs layer by layer (so that exit heads
can prune it, see exit_heads.py); any other architecture runs whole, with its one head, unpruned."""
from __future__ import annotations

import torch

from sieve.index.errors import InvalidArgument, NotFound

from .base import RerankResult
from .cross_encoder import CrossEncoderReranker
from .exit_heads import ClassifierCrossEncoder
from .layered import LayeredReranker


def load_cross_encoder(name: str, device: str, dtype: torch.dtype, max_length: int = 512) -> CrossEncoderReranker:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        try:
            classifier = AutoModelForSequenceClassification.from_pretrained(name, attn_implementation="sdpa")
        except ValueError:  # an architecture without SDPA attention
            classifier = AutoModelForSequenceClassification.from_pretrained(name)
    except OSError as error:
        raise NotFound(f"cross-encoder {name!r} cannot be loaded: {error}") from error
    max_length = min(max_length, tokenizer.model_max_length)
    try:
        model = ClassifierCrossEncoder(classifier.eval(), tokenizer)
    except InvalidArgument:
        return ExternalReranker(classifier, tokenizer, device, dtype, max_length)
    return LayeredReranker(model, tokenizer, {"max_length": max_length, "source": name}, device, dtype)


class ExternalReranker(CrossEncoderReranker):
    """A cross-encoder outside the BERT family: one forward per request, its one head at its last layer."""

    def __init__(self, model, tokenizer, device: str, dtype: torch.dtype, max_length: int):
        super().__init__(tokenizer, max_length)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = device
        self.num_layers = self.model.config.num_hidden_layers
        self.checkpoint_layers = (self.num_layers,)

    def score_stack(self, batches, settings):
        results = []
        for batch in batches:
            logits = self.model(**{key: value.to(self.device) for key, value in batch.items()}).logits.float()
            scores = logits[:, 0] if logits.shape[1] == 1 else logits.log_softmax(-1)[:, -1]
            ranked = torch.argsort(scores, descending=True, stable=True)
            results.append(RerankResult(order=ranked.tolist(), scores=scores[ranked].tolist(),
                                        survivors=[len(scores)]))
        return results
