"""Rerankers by name, and their scores fused with the first stage's: what the service calls.

A name is "" (or a default alias) for Sieve's shipped layered reranker, a folder holding a Sieve
artifact, or any Hugging Face cross-encoder (see artifact.py, layered.py, external.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from sieve.index.encoders import DEFAULT_ENCODER_ALIASES, loaded_once
from sieve.index.errors import InvalidArgument

from .artifact import ARTIFACT, is_artifact, load_artifact
from .base import Reranker, RerankResult
from .external import ExternalReranker


def choose_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":  # bf16 keeps the ranking (tau 0.995) and is ~2x faster where the CPU has bf16 units
        bf16_cpu = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if device == "cuda" or bf16_cpu else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}") from None


@loaded_once(maxsize=4)
def load_reranker(name_or_path: str = "", dtype: str = "auto", device: str | None = None) -> Reranker:
    """"" (or a default alias): the shipped artifact over the packaged MiniLM. A folder holding a Sieve
    artifact (config.json with checkpoint_layers, weights.safetensors): that artifact. Anything else:
    a Hugging Face cross-encoder by name or path (no early pruning)."""
    device = choose_device(device)
    torch_dtype = choose_dtype(dtype, device)
    if name_or_path in DEFAULT_ENCODER_ALIASES:
        return load_artifact(ARTIFACT, device, torch_dtype)
    path = Path(name_or_path).expanduser()
    if is_artifact(path):
        return load_artifact(path, device, torch_dtype)
    return ExternalReranker(str(path) if path.exists() else name_or_path, device, torch_dtype)


def fuse_with_first_stage(result: RerankResult, first_stage_scores: list[float], weight: float) -> list[tuple[int, float]]:
    """Every candidate, ranked by weight * reranker score + (1 - weight) * first-stage score, both min-max
    normalised; candidates pruned before the last layer get the lowest reranker contribution (none)."""
    from sieve.index.fusion import weighted_scores

    if not 0.0 <= weight <= 1.0:
        raise InvalidArgument(f"fusion weight must be in [0, 1], got {weight!r}")
    return weighted_scores({"reranker": list(zip(result.order, result.scores)),
                            "first_stage": list(enumerate(first_stage_scores))},
                           {"reranker": weight, "first_stage": 1.0 - weight})
