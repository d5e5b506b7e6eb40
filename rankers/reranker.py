"""Rerankers by name, and their scores fused with the first stage's: what the service calls.

A name is "" (or a default alias) for Sieve's shipped layered reranker, a folder holding a Sieve
artifact, or any Hugging Face cross-encoder (see artifact.py, layered.py, external.py), optionally with
exit heads trained for it (exit_heads.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from sieve.index.encoders import DEFAULT_ENCODER_ALIASES, loaded_once
from sieve.index.errors import InvalidArgument

from .artifact import ARTIFACT, is_artifact, load_artifact
from .base import Reranker, RerankResult
from .exit_heads import PRE_RANKER_FILE, attach_heads
from .external import load_cross_encoder
from .layered import LayeredReranker
from .pre_ranker import PreRankedReranker, load_pre_ranker


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
def load_reranker(name_or_path: str = "", dtype: str = "auto", device: str | None = None, heads: str = "",
                  heads_version: str = "") -> Reranker:
    """"" (or a default alias): the shipped artifact over the packaged MiniLM. A folder holding a Sieve
    artifact (config.json with checkpoint_layers, weights.safetensors): that artifact. Anything else:
    a Hugging Face cross-encoder by name or path. `heads`: a folder of exit heads trained for that model
    (exit_heads.py), laid over it; `heads_version` only keys the cache, so retrained heads are reloaded."""
    reranker = open_reranker(name_or_path, dtype, device)
    return with_exit_heads(reranker, Path(heads)) if heads else reranker


def open_reranker(name_or_path: str = "", dtype: str = "auto", device: str | None = None) -> Reranker:
    """A fresh load (load_reranker caches; training exit heads changes the model it is given)."""
    device = choose_device(device)
    torch_dtype = choose_dtype(dtype, device)
    if name_or_path in DEFAULT_ENCODER_ALIASES:
        return load_artifact(ARTIFACT, device, torch_dtype)
    path = Path(name_or_path).expanduser()
    if is_artifact(path):
        return load_artifact(path, device, torch_dtype)
    return load_cross_encoder(str(path) if path.exists() else name_or_path, device, torch_dtype)


def with_exit_heads(reranker: Reranker, folder: Path) -> Reranker:
    """The reranker with the early heads in `folder` instead of its own and their calibrated pruning, behind
    the folder's pre-ranker where one was trained and its cut pays."""
    if not isinstance(reranker, LayeredReranker):
        raise InvalidArgument("exit heads need a BERT-family cross-encoder, run layer by layer")
    config = attach_heads(reranker.model, folder, reranker.fingerprint)
    calibrated = {key: config[key] for key in ("default_checkpoints", "margins", "margins_by_recall")}
    headed = LayeredReranker(reranker.model, reranker.tokenizer, {**reranker.config, **calibrated},
                             reranker.device, reranker.dtype)
    cut = (config.get("pre_ranker") or {}).get("chosen")
    if cut is None or not (folder / PRE_RANKER_FILE).is_file():
        return headed
    pre = load_pre_ranker(folder / PRE_RANKER_FILE).serving(reranker.device, reranker.dtype)
    return PreRankedReranker(headed, pre, cut["margin"])


def fuse_with_first_stage(result: RerankResult, first_stage_scores: list[float], weight: float) -> list[tuple[int, float]]:
    """Every candidate, ranked by weight * reranker score + (1 - weight) * first-stage score, both min-max
    normalised; candidates pruned before the last layer get the lowest reranker contribution (none)."""
    from sieve.index.fusion import weighted_scores

    if not 0.0 <= weight <= 1.0:
        raise InvalidArgument(f"fusion weight must be in [0, 1], got {weight!r}")
    return weighted_scores({"reranker": list(zip(result.order, result.scores)),
                            "first_stage": list(enumerate(first_stage_scores))},
                           {"reranker": weight, "first_stage": 1.0 - weight})
