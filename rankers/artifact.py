"""Reranker artifacts on disk: the packaged base model, and trained layers stored as int8 deltas over it.

An artifact is a folder: weights.safetensors (the trained matrices as int8 deltas with a scale per
row, trained vectors in fp16, the heads in float32) and config.json (checkpoint layers, calibrated
margins, fusion weight, the training record).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sieve.index.encoders import resolve_encoder
from sieve.index.errors import InvalidArgument

from .layered import LayeredReranker
from .model import LayeredCrossEncoder

ARTIFACT = Path(__file__).parent / "artifacts" / "minilm-l6-pruning"


def is_artifact(folder: Path) -> bool:
    """Whether `folder` holds a Sieve artifact rather than, say, a Hugging Face cross-encoder."""
    return (folder / "weights.safetensors").exists() and "checkpoint_layers" in (folder / "config.json").read_text()


def load_artifact(directory: Path, device: str, dtype: torch.dtype) -> LayeredReranker:
    """The packaged MiniLM with the artifact's trained layers and heads laid over it."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    model, tokenizer = base_model(tuple(config["checkpoint_layers"]))
    stored = load_file(str(directory / "weights.safetensors"))
    base = model.state_dict()
    state = {key: value.float() for key, value in stored.items() if not key.endswith(("delta_int8", "delta_scale"))}
    for key in (k.removesuffix(".delta_int8") for k in stored if k.endswith(".delta_int8")):
        if key not in base:
            raise InvalidArgument(f"{directory} does not match the base model (unexpected {key})")
        state[key] = base[key] + stored[f"{key}.delta_int8"].float() * stored[f"{key}.delta_scale"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(key.startswith("heads.") for key in missing):
        raise InvalidArgument(f"{directory} does not match the base model (unexpected {unexpected[:3]})")
    return LayeredReranker(model, tokenizer, config, device, dtype)


def base_model(checkpoint_layers: tuple[int, ...] | None = None):
    """The packaged all-MiniLM-L6-v2 as a LayeredCrossEncoder with fresh heads, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder("")
    bert = AutoModel.from_pretrained(path, attn_implementation="sdpa")  # its pooler is loaded, never run
    layers = checkpoint_layers or tuple(range(1, bert.config.num_hidden_layers + 1))
    return LayeredCrossEncoder(bert, layers).eval(), AutoTokenizer.from_pretrained(path)


def save_artifact(model, out: Path, config: dict, base: dict) -> None:
    """Only what training changed over the packaged weights `base` (a BERT state dict): each trained
    matrix as an int8 delta with a scale per row (a fine-tune moves weights by a few percent, so the
    rounding error is a few ten-thousandths of a weight), the trained vectors in fp16, the heads, a config."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    trained = set(config["training"]["trainable_layers"])
    weights = {}
    for name, p in model.bert.named_parameters():
        if not (name.startswith("encoder.layer.") and int(name.split(".")[2]) + 1 in trained):
            continue
        if p.ndim == 2:
            delta = p.detach().float() - base[name].float()
            scale = delta.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
            weights[f"bert.{name}.delta_int8"] = torch.round(delta / scale).to(torch.int8).contiguous()
            weights[f"bert.{name}.delta_scale"] = scale.contiguous()
        else:
            weights[f"bert.{name}"] = p.detach().half().contiguous()
    weights.update({f"heads.{name}": p.detach().float().contiguous() for name, p in model.heads.named_parameters()})
    save_file(weights, str(out / "weights.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
