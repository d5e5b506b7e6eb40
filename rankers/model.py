"""A BERT cross-encoder with a score head at every checkpoint layer, run one layer at a time.

The heads read what a bi-encoder like all-MiniLM-L6-v2 already knows: the cosine of the mean-pooled
query and passage tokens, their late-interaction (MaxSim) score, and a small MLP over [CLS] and the
pooled pair. At early layers these are soft lexical matches, which is exactly what candidate
pruning needs; at the last layer they start from the bi-encoder's own similarity instead of noise.
"""
from __future__ import annotations

import torch
import xxhash
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
            return self.from_features(*pair_features(hidden, query_mask, passage_mask))

    def from_features(self, cls: torch.Tensor, query: torch.Tensor, passage: torch.Tensor,
                      maxsim: torch.Tensor) -> torch.Tensor:
        """The score from pair_features' output: label-free training caches those once per checkpoint
        layer, so that fitting a head never runs the model again."""
        qn, pn = F.normalize(query, dim=-1), F.normalize(passage, dim=-1)
        cosine = (qn * pn).sum(-1)
        features = torch.cat([cls, qn * pn, (qn - pn).abs()], dim=-1)
        similarity = torch.stack([cosine, maxsim], -1) @ self.similarity_weights
        return similarity + self.mlp(features).squeeze(-1) + self.bias


def pair_features(hidden: torch.Tensor, query_mask: torch.Tensor, passage_mask: torch.Tensor):
    """What a ScoreHead reads of one layer's hidden states, in float32: ([CLS], mean query token, mean
    passage token, MaxSim of query over passage tokens), each [B, hidden] but MaxSim [B]."""
    with torch.autocast(hidden.device.type, enabled=False):
        hidden = hidden.float()
        # Every product below is a batched matmul over what it needs, with no [B, T, D] temporaries: the
        # head runs on every survivor at every checkpoint, so its cost is pruning's overhead.
        q, p = _masked_mean(hidden, query_mask), _masked_mean(hidden, passage_mask)
        # the query leads every row ([CLS] query [SEP] passage [SEP]): only its rows of the token
        # cosine matrix are needed, [B, query width, T] instead of [B, T, T]
        width = int(query_mask.any(0).nonzero().max()) + 1 if query_mask.any() else 1
        norms = hidden.norm(dim=-1).clamp(min=1e-12)
        pairwise = (hidden[:, :width] @ hidden.transpose(1, 2)) / (norms[:, :width, None] * norms[:, None, :])
        pairwise = pairwise.masked_fill(~passage_mask[:, None, :], -1.0)
        query_rows = query_mask[:, :width]
        maxsim = (pairwise.max(-1).values * query_rows).sum(-1) / query_rows.sum(-1).clamp(min=1)
        return hidden[:, 0], q, p, maxsim


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype)
    return (weights[:, None] @ hidden).squeeze(1) / weights.sum(1, keepdim=True).clamp(min=1)


def weights_fingerprint(named_tensors) -> str:
    """xxh3 over every weight, in name order: heads fitted to one model's layers mean nothing on another's."""
    digest = xxhash.xxh3_64()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def segment_masks(batch: dict, special_ids, separator: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and passage token masks without special tokens: the query is what precedes the first
    separator ([CLS] q [SEP] p [SEP] in BERT, <s> q </s></s> p </s> in RoBERTa), so token types are not needed."""
    ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    content = attention & ~torch.isin(ids, torch.tensor(list(special_ids), device=ids.device))
    after_separator = (ids == separator).cumsum(1) > 0
    return content & ~after_separator, content & after_separator


class LayeredCrossEncoder(nn.Module):
    """bert (a transformers BertModel) plus heads {layer number (1-based): ScoreHead}."""

    def __init__(self, bert: nn.Module, checkpoint_layers: tuple[int, ...]):
        super().__init__()
        self.bert = bert
        self.num_layers = len(bert.encoder.layer)
        self.checkpoint_layers = tuple(sorted(checkpoint_layers))
        self.heads = nn.ModuleDict({str(l): ScoreHead(bert.config.hidden_size) for l in self.checkpoint_layers})

    def segment_masks(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return segment_masks(batch, special_ids=(101, 102), separator=102)  # BERT's [CLS], [SEP]

    def fingerprint(self) -> str:
        """The weights exit heads read and reproduce: the encoder and the last layer's head, not the early heads."""
        last = f"heads.{self.num_layers}."
        return weights_fingerprint((name, t) for name, t in self.state_dict().items()
                                   if not name.startswith("heads.") or name.startswith(last))

    def additive_mask(self, attention: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (1.0 - attention[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def embed(self, batch: dict) -> torch.Tensor:
        return self.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])

    def run_layer(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Apply 1-based layer `layer`."""
        return self.bert.encoder.layer[layer - 1](hidden, attention_mask=mask)

    def score(self, layer: int, hidden: torch.Tensor, query_mask, passage_mask) -> torch.Tensor:
        return self.heads[str(layer)](hidden, query_mask, passage_mask)

    def hidden_states(self, batch: dict, frozen_below: int = 0):
        """(layer, its output) for every layer in turn, unpruned; layers < frozen_below get no gradient."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_below <= 1):
            hidden = self.embed(batch)
        mask = self.additive_mask(batch["attention_mask"], hidden.dtype)
        for layer in range(1, self.num_layers + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and layer >= frozen_below):
                hidden = self.run_layer(layer, hidden, mask)
            yield layer, hidden

    def forward(self, batch: dict, frozen_below: int = 0) -> torch.Tensor:
        """Scores of every checkpoint layer, [len(checkpoint_layers), B]; layers < frozen_below get no gradient."""
        query_mask, passage_mask = self.segment_masks(batch)
        return torch.stack([self.score(layer, hidden if layer >= frozen_below else hidden.detach(), query_mask,
                                       passage_mask)
                            for layer, hidden in self.hidden_states(batch, frozen_below) if str(layer) in self.heads])
