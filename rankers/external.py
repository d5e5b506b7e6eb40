"""Any Hugging Face cross-encoder as a reranker: one score head, at its last layer, so no early pruning."""
from __future__ import annotations

import torch

from sieve.index.errors import NotFound

from .base import RerankResult
from .cross_encoder import CrossEncoderReranker


class ExternalReranker(CrossEncoderReranker):
    """Any Hugging Face / sentence-transformers cross-encoder: one score head, at its last layer."""

    def __init__(self, name: str, device: str, dtype: torch.dtype, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name).to(device=device, dtype=dtype).eval()
        except OSError as error:
            raise NotFound(f"cross-encoder {name!r} cannot be loaded: {error}") from error
        super().__init__(tokenizer, min(max_length, tokenizer.model_max_length))
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
