"""(placeholder, being written)"""
from __future__ import annotations

import torch

from sieve.index.encoders import resolve_encoder

from .model import LayeredCrossEncoder


def base_model(checkpoint_layers: tuple[int, ...] | None = None):
    """The packaged all-MiniLM-L6-v2 as a LayeredCrossEncoder with fresh heads, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder("")
    bert = AutoModel.from_pretrained(path, attn_implementation="sdpa", add_pooling_layer=False)
    layers = checkpoint_layers or tuple(range(1, bert.config.num_hidden_layers + 1))
    return LayeredCrossEncoder(bert, layers).eval(), AutoTokenizer.from_pretrained(path)
