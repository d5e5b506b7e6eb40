"""A BERT cross-encoder with a score head at every checkpoint layer, run one layer at a time.

The heads read what a bi-encoder like all-MiniLM-L6-v2 already knows: the cosine of the mean-pooled
query and passage tokens, their late-interaction (MaxSim) score, and a small MLP over [CLS] and the
pooled pair. At early layers these are soft lexical matches, which is exactly what candidate
pruning needs; at the last layer they start from the bi-encoder's own similarity instead of noise.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ScoreHead(nn.Module):
    def __init__(self, hidden: int, width: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3 * hidden, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.mlp[2].weight)  # starts as the similarity features alone
        self.similarity_weights = nn.Parameter(torch.tensor([5.0, 5.0]))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor, query_mask: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # float32 in training, calibration and serving
            return self._score(hidden.float(), query_mask, passage_mask)

    def _score(self, hidden: torch.Tensor, query_mask: torch.Tensor, passage_mask: torch.Tensor) -> torch.Tensor:
        # Every product below is a batched matmul over what it needs, with no [B, T, D] temporaries: the
        # head runs on every survivor at every checkpoint, so its cost is pruning's overhead.
        q, p = _masked_mean(hidden, query_mask), _masked_mean(hidden, passage_mask)
        qn, pn = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
        cosine = (qn * pn).sum(-1)
        # the query leads every row ([CLS] query [SEP] passage [SEP]): only its rows of the token
        # cosine matrix are needed, [B, query width, T] instead of [B, T, T]
        width = int(query_mask.any(0).nonzero().max()) + 1 if query_mask.any() else 1
        norms = hidden.norm(dim=-1).clamp(min=1e-12)
        pairwise = (hidden[:, :width] @ hidden.transpose(1, 2)) / (norms[:, :width, None] * norms[:, None, :])
        pairwise = pairwise.masked_fill(~passage_mask[:, None, :], -1.0)
        query_rows = query_mask[:, :width]
        maxsim = (pairwise.max(-1).values * query_rows).sum(-1) / query_rows.sum(-1).clamp(min=1)
        features = torch.cat([hidden[:, 0], qn * pn, (qn - pn).abs()], dim=-1)
        similarity = torch.stack([cosine, maxsim], -1) @ self.similarity_weights
        return similarity + self.mlp(features).squeeze(-1) + self.bias


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype)
    return (weights[:, None] @ hidden).squeeze(1) / weights.sum(1, keepdim=True).clamp(min=1)


class LayeredCrossEncoder(nn.Module):
    """bert (a transformers BertModel) plus heads {layer number (1-based): ScoreHead}."""

    def __init__(self, bert: nn.Module, checkpoint_layers: tuple[int, ...]):
        super().__init__()
        self.bert = bert
        self.num_layers = len(bert.encoder.layer)
        self.checkpoint_layers = tuple(sorted(checkpoint_layers))
        self.heads = nn.ModuleDict({str(l): ScoreHead(bert.config.hidden_size) for l in self.checkpoint_layers})

    @staticmethod
    def segment_masks(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and passage token masks without [CLS] and [SEP] (token_type 0 is the query)."""
        ids, types, attention = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"].bool()
        content = attention & (ids != 101) & (ids != 102)  # BERT's [CLS], [SEP]
        return content & (types == 0), content & (types == 1)

    def additive_mask(self, attention: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (1.0 - attention[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def embed(self, batch: dict) -> torch.Tensor:
        return self.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])

    def run_layer(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Apply 1-based layer `layer`."""
        return self.bert.encoder.layer[layer - 1](hidden, attention_mask=mask)

    def score(self, layer: int, hidden: torch.Tensor, query_mask, passage_mask) -> torch.Tensor:
        return self.heads[str(layer)](hidden, query_mask, passage_mask)

    def forward(self, batch: dict, frozen_below: int = 0) -> torch.Tensor:
        """Scores of every checkpoint layer, [len(checkpoint_layers), B]; layers < frozen_below get no gradient."""
        query_mask, passage_mask = self.segment_masks(batch)
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_below <= 1):
            hidden = self.embed(batch)
        mask = self.additive_mask(batch["attention_mask"], hidden.dtype)
        scores = []
        for layer in range(1, self.num_layers + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and layer >= frozen_below):
                hidden = self.run_layer(layer, hidden, mask)
            if str(layer) in self.heads:
                scores.append(self.score(layer, hidden if layer >= frozen_below else hidden.detach(),
                                         query_mask, passage_mask))
        return torch.stack(scores)
