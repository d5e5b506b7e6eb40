"""Sieve's layered reranker: a LayeredCrossEncoder run layer by layer, pruning at its checkpoint heads."""
from __future__ import annotations

import math

import torch

from .base import RerankResult
from .cross_encoder import TOKEN_BUDGET, CrossEncoderReranker
from .model import LayeredCrossEncoder
from .pruning import PruningOptions, keep_count


def _stack(batches: list[dict]) -> dict:
    """Concatenate tokenised requests row-wise, padded to the longest row."""
    width = max(b["input_ids"].shape[1] for b in batches)
    return {key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1])) for b in batches])
            for key in batches[0]}


class LayeredReranker(CrossEncoderReranker):
    """A LayeredCrossEncoder with calibrated pruning margins, layer by layer over a stack of requests."""

    def __init__(self, model: LayeredCrossEncoder, tokenizer, config: dict, device: str, dtype: torch.dtype):
        super().__init__(tokenizer, config.get("max_length", 256))
        self.config = config
        self.fingerprint = model.fingerprint()  # before the cast: exit heads are matched to these weights
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.heads.float()  # heads are tiny and read float32 features: no precision lost there
        self.device, self.dtype = device, dtype
        self.num_layers = model.num_layers
        self.checkpoint_layers = model.checkpoint_layers
        self.default_checkpoints = tuple(config["default_checkpoints"] if "default_checkpoints" in config
                                         else [c for c in self.checkpoint_layers if c < self.num_layers])
        self.margins = {int(layer): float(m) for layer, m in config.get("margins", {}).items()}
        # a checkpoint outside the default setting: the margin that kept 99% of the dev top 10 there
        self.single_layer_margins = {int(layer): float(m) for layer, m in
                                     config.get("margins_by_recall", {}).get("0.99", {}).items()}
        self.fusion_weight = config.get("fusion_weight")
        self.rows_processed = [0] * (self.num_layers + 1)  # rows run through each layer (for tests, metrics)

    def _chunks(self, lengths: torch.Tensor) -> list[tuple[int, int, int]]:
        """(start, stop, width) row ranges of at most TOKEN_BUDGET tokens; rows are sorted by length."""
        chunks, start = [], 0
        while start < len(lengths):
            width = int(lengths[start])
            stop = min(len(lengths), start + max(1, TOKEN_BUDGET // max(width, 1)))
            chunks.append((start, stop, width))
            start = stop
        return chunks

    def score_stack(self, batches, settings):
        batch = {key: value.to(self.device) for key, value in _stack(batches).items()}
        owner = torch.cat([torch.full((len(b["input_ids"]),), i) for i, b in enumerate(batches)]).to(self.device)
        row_in_request = torch.cat([torch.arange(len(b["input_ids"])) for b in batches]).to(self.device)
        lengths = batch["attention_mask"].sum(1)
        by_length = torch.argsort(lengths, descending=True, stable=True)  # chunks of similar length, little padding
        batch = {key: value[by_length] for key, value in batch.items()}
        owner, row_in_request, lengths = owner[by_length], row_in_request[by_length], lengths[by_length]
        query_mask, passage_mask = self.model.segment_masks(batch)
        mask = self.model.additive_mask(batch["attention_mask"], self.dtype)
        hidden = self.model.embed(batch)
        survivors = [[len(b["input_ids"])] for b in batches]
        checkpoints = [set(o.checkpoints or self.default_checkpoints) if o.prune else set() for _, o in settings]
        for layer in range(1, self.num_layers + 1):
            for start, stop, width in self._chunks(lengths):
                hidden[start:stop, :width] = self.model.run_layer(layer, hidden[start:stop, :width],
                                                                 mask[start:stop, ..., :width])
            self.rows_processed[layer] += len(hidden)
            pruning_here = [i for i, c in enumerate(checkpoints) if layer in c and layer < self.num_layers]
            if not pruning_here:
                continue
            scores = self._score(layer, hidden, lengths, query_mask, passage_mask)
            alive = torch.ones(len(hidden), dtype=torch.bool, device=self.device)
            for i in pruning_here:
                k, options = settings[i]
                rows = (owner == i).nonzero().squeeze(1)
                ranked = torch.argsort(scores[rows], descending=True, stable=True)
                margin = self.margin_at(layer, options)
                keep = keep_count(scores[rows][ranked], k, margin, options.safety)
                alive[rows[ranked[keep:]]] = False
                survivors[i].append(keep)
            if not alive.all():
                index = alive.nonzero().squeeze(1)
                width = int(lengths[index].max())
                hidden, mask = hidden[index, :width], mask[index, ..., :width]
                query_mask, passage_mask = query_mask[index, :width], passage_mask[index, :width]
                owner, row_in_request, lengths = owner[index], row_in_request[index], lengths[index]
        scores = self._score(self.num_layers, hidden, lengths, query_mask, passage_mask)
        results = []
        for i, (k, _) in enumerate(settings):
            rows = (owner == i).nonzero().squeeze(1)
            ranked = torch.argsort(scores[rows], descending=True, stable=True)
            results.append(RerankResult(order=row_in_request[rows][ranked].tolist(),
                                        scores=scores[rows][ranked].tolist(), survivors=survivors[i]))
        return results

    def margin_at(self, layer: int, options: PruningOptions) -> float:
        if options.margin is not None:
            return options.margin
        if options.margins is not None:
            return options.margins.get(layer, math.inf)
        return self.margins.get(layer, self.single_layer_margins.get(layer, math.inf))

    def _score(self, layer, hidden, lengths, query_mask, passage_mask) -> torch.Tensor:
        return torch.cat([self.model.score(layer, hidden[start:stop, :width], query_mask[start:stop, :width],
                                           passage_mask[start:stop, :width])
                          for start, stop, width in self._chunks(lengths)]).float()

