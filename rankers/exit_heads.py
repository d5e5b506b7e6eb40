"""Early-exit heads for any cross-encoder, trained without labels (self-distillation).

A cross-encoder from the hub has a score head only at its last layer, so it cannot prune early. Here
the model stays frozen: pseudo-queries made from a collection's own passages (titles, sentences) fetch
candidates from the collection's own first stage; the model runs once over them, keeping what a
ScoreHead reads at every earlier layer (pair_features) and its own final scores; a head per layer is
then fitted to reproduce the final ranking (listwise KL towards the distribution of the final scores,
standardised per query, plus MSE to them, so that a margin means the same whatever the model's logit
scale), and the pruning margins are calibrated on held-out pseudo-queries against a top-10 agreement
target, as calibration.py does on judged queries. The same final scores can distil a pre-ranker
(pre_ranker.py). The heads are a small artifact (heads.safetensors, config.json, optionally
pre_ranker.safetensors) tied to the model's weights by a fingerprint; loaded over other weights they
are refused, and the model reranks unpruned.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from sieve.index.errors import FailedPrecondition, InvalidArgument

from .calibration import cheapest_setting, margins_by_recall, pruning_frontier, scaled_candidates
from .model import LayeredCrossEncoder, ScoreHead, pair_features, segment_masks, weights_fingerprint

HEADS_FILE, CONFIG_FILE, PRE_RANKER_FILE = "heads.safetensors", "config.json", "pre_ranker.safetensors"
KIND = "sieve-exit-heads"


class ClassifierCrossEncoder(LayeredCrossEncoder):
    """A Hugging Face sequence-classification cross-encoder of the BERT family (BERT, MiniLM, RoBERTa,
    XLM-R, ELECTRA: a base model with .embeddings and .encoder.layer), run one layer at a time. Its own
    classifier scores the last layer; ScoreHeads, once trained, score earlier ones."""

    def __init__(self, classifier: nn.Module, tokenizer):
        nn.Module.__init__(self)
        base = classifier.base_model
        if not hasattr(base, "embeddings") or not hasattr(getattr(base, "encoder", None), "layer"):
            raise InvalidArgument(f"{type(classifier).__name__} is not a BERT-family encoder (.embeddings and "
                                  ".encoder.layer): it reranks, but early exit heads cannot be trained for it")
        self.classifier, self.bert = classifier, base
        self.num_layers = len(base.encoder.layer)
        self.checkpoint_layers = (self.num_layers,)
        self.heads = nn.ModuleDict()  # early heads come from attach_heads or fit_heads
        self.special_ids, self.separator = tuple(tokenizer.all_special_ids), tokenizer.sep_token_id

    def segment_masks(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return segment_masks(batch, self.special_ids, self.separator)

    def embed(self, batch: dict) -> torch.Tensor:
        return self.bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))

    def score(self, layer: int, hidden: torch.Tensor, query_mask, passage_mask) -> torch.Tensor:
        if layer < self.num_layers:
            return super().score(layer, hidden, query_mask, passage_mask)
        pooler = getattr(self.bert, "pooler", None)  # BERT scores its pooled [CLS]; RoBERTa's head pools itself
        logits = self.classifier.classifier(pooler(hidden) if pooler is not None else hidden).float()
        return logits[:, 0] if logits.shape[1] == 1 else logits.log_softmax(-1)[:, -1]

    def fingerprint(self) -> str:
        return weights_fingerprint(self.classifier.state_dict().items())


# Storing and attaching ------------------------------------------------------------------------------
def save_heads(model: LayeredCrossEncoder, folder: Path, config: dict, pre_ranker=None) -> None:
    """heads.safetensors (the early heads, float32), the pre-ranker if there is one, and config.json,
    written into a fresh folder that replaces `folder` whole, so a reader sees the old heads or the new ones."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.{time.time_ns()}")
    staging.mkdir(parents=True)
    try:
        early = {f"{name}": p.detach().float().contiguous() for name, p in model.heads.named_parameters()
                 if int(name.split(".")[0]) < model.num_layers}
        save_file(early, str(staging / HEADS_FILE))
        if pre_ranker is not None:
            save_file(pre_ranker.trainable_state(), str(staging / PRE_RANKER_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps({"kind": KIND, **config}, indent=2) + "\n")
        old = folder.with_name(f".{folder.name}.old.{time.time_ns()}")
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_heads_config(folder: Path) -> dict:
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"{folder} holds no readable exit heads ({error})") from None
    if not isinstance(config, dict) or config.get("kind") != KIND:
        raise InvalidArgument(f"{folder} holds no exit heads ({CONFIG_FILE} is not of kind {KIND!r})")
    return config


def attach_heads(model: LayeredCrossEncoder, folder: Path, found: str) -> dict:
    """Replace the model's early heads with the trained ones in `folder`; their config. Refused
    (FAILED_PRECONDITION) when they were fitted to weights other than those with fingerprint `found`."""
    from safetensors.torch import load_file

    config = read_heads_config(folder)
    if config.get("fingerprint") != found:
        raise FailedPrecondition(f"the exit heads in {folder} were trained for {config.get('reranker')!r} with weights "
                                 f"{config.get('fingerprint')}, not these ({found}): retrain them "
                                 "(sieve train exit-heads)")
    try:  # a damaged folder is refused like a mismatched one: the model then reranks unpruned
        layers = [int(layer) for layer in config["early_layers"]]
        if not layers or max(layers) >= model.num_layers:
            raise ValueError(f"heads at layers {layers} do not fit a {model.num_layers}-layer model")
        heads = nn.ModuleDict({str(l): ScoreHead(model.bert.config.hidden_size) for l in layers})
        heads.load_state_dict(load_file(str(Path(folder) / HEADS_FILE)))
    except Exception as error:
        raise InvalidArgument(f"the exit heads in {folder} cannot be used: {error}") from None
    for name in [n for n in model.heads if int(n) < model.num_layers]:
        del model.heads[name]
    for name, head in heads.items():
        model.heads[name] = head
    model.checkpoint_layers = tuple(sorted({*layers, model.num_layers}))
    return config


# Pseudo-queries ----------------------------------------------------------------------------------------
def pick_sentence(text: str, rng: random.Random) -> tuple[list[str], int] | None:
    """A passage's sentences and one of 8-40 words chosen to serve as a query (None: no such sentence)."""
    parts = re.split(r"(?<=[.!?])\s+", text)
    usable = [i for i, s in enumerate(parts) if 8 <= len(s.split()) <= 40]
    return (parts, rng.choice(usable)) if len(parts) >= 3 and usable else None


def pseudo_queries(documents, count: int, seed: int = 13) -> list[tuple[str, str]]:
    """(query, source document id) from a collection's own passages: a title where there is one of at
    least three words, otherwise (and for every other document) a sentence of its text."""
    rng = random.Random(seed)
    docs = list(documents)
    rng.shuffle(docs)
    queries = []
    for n, doc in enumerate(docs):
        if len(queries) >= count:
            break
        if n % 2 == 0 and len(doc.title.split()) >= 3:
            queries.append((doc.title, doc.id))
            continue
        picked = pick_sentence(doc.text, rng)
        if picked:
            queries.append((picked[0][picked[1]], doc.id))
        elif len(doc.title.split()) >= 3:
            queries.append((doc.title, doc.id))
    return queries


# What the frozen model says ------------------------------------------------------------------------------
@dataclass
class Observed:
    """One query's candidates as the frozen model saw them: every layer's pair features (float16) and the
    last layer's scores (what the heads learn to reproduce)."""
    features: dict[int, tuple[torch.Tensor, ...]]  # layer -> (cls, query, passage, maxsim)
    final: torch.Tensor  # [n]


def observe(model: LayeredCrossEncoder, tokenizer, requests: list[tuple[str, list[str]]], layers: tuple[int, ...],
            max_length: int = 256, dtype: torch.dtype = torch.float32) -> list[Observed]:
    """Run the frozen model once over each (query, passages), in the dtype it serves in: the features of
    `layers` and the final scores."""
    observed, device = [], next(model.parameters()).device
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for query, passages in tqdm(requests, desc="frozen model over pseudo-queries", unit="query", mininterval=10):
            batch = {key: value.to(device) for key, value in tokenizer(
                [query] * len(passages), passages, truncation="longest_first", max_length=max_length,
                padding=True, return_tensors="pt").items()}
            query_mask, passage_mask = model.segment_masks(batch)
            features = {}
            for layer, hidden in model.hidden_states(batch):
                if layer in layers:
                    features[layer] = tuple(f.half().cpu() for f in pair_features(hidden, query_mask, passage_mask))
            final = model.score(model.num_layers, hidden, query_mask, passage_mask).float().cpu()
            observed.append(Observed(features, final))
    return observed


def layer_scores(model: LayeredCrossEncoder, observed: list[Observed]) -> list[np.ndarray]:
    """[num_layers, n] per query, as calibration reads them: each early layer's head score, the final scores
    last (a layer without a head gets its final scores: it is never a checkpoint)."""
    rows = []
    with torch.inference_mode():
        for seen in observed:
            per_layer = [model.heads[str(l)].from_features(*(f.float() for f in seen.features[l]))
                         if str(l) in model.heads and l in seen.features else seen.final
                         for l in range(1, model.num_layers)]
            rows.append(torch.stack([*per_layer, seen.final]).numpy())
    return rows


# Fitting and calibrating -----------------------------------------------------------------------------------
def _padded(observed: list[Observed], layer: int):
    """One layer's features and final scores of every query, padded to the longest list: [Q, n, ...], mask."""
    n = max(len(o.final) for o in observed)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t.float(), (0, 0) * (t.dim() - 1) + (0, n - len(t)))

    features = [torch.stack([pad(o.features[layer][i]) for o in observed]) for i in range(4)]
    final = torch.stack([pad(o.final) for o in observed])
    mask = torch.stack([torch.arange(n) < len(o.final) for o in observed])
    return features, final, mask


def standardised(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-query z-scores over the unmasked entries (0 where masked): a cross-encoder's logits may span 20
    units or 0.02, and the heads should learn its ranking, not its scale."""
    counts = mask.sum(-1, keepdim=True).clamp(min=1)
    mean = (scores * mask).sum(-1, keepdim=True) / counts
    spread = ((((scores - mean) * mask) ** 2).sum(-1, keepdim=True) / counts).sqrt().clamp(min=1e-6)
    return (scores - mean) / spread * mask


def distillation_loss(scores: torch.Tensor, final: torch.Tensor, mask: torch.Tensor, temperature: float = 0.5,
                      mse_weight: float = 0.1) -> torch.Tensor:
    """Listwise KL from the distribution of the final scores (standardised per query) to the head's, plus
    MSE of the head's centred scores to them, so that a margin means the same at every layer."""
    target_scores = standardised(final, mask)
    neg = torch.finfo(scores.dtype).min
    target = F.softmax((target_scores / temperature).masked_fill(~mask, neg), -1)
    predicted = F.log_softmax((scores / temperature).masked_fill(~mask, neg), -1)
    kl = (target * (target.clamp(min=1e-12).log() - predicted)).masked_fill(~mask, 0).sum(-1).mean()
    counts = mask.sum(-1, keepdim=True).clamp(min=1)
    centred = (scores - (scores * mask).sum(-1, keepdim=True) / counts) * mask
    return kl + mse_weight * F.mse_loss(centred, target_scores, reduction="sum") / mask.sum()


def fit_heads(model: LayeredCrossEncoder, observed: list[Observed], layers: tuple[int, ...], epochs: int = 60,
              lr: float = 2e-3, batch_queries: int = 32, seed: int = 13) -> dict[int, float]:
    """A fresh ScoreHead per layer in `layers`, fitted on the cached features; installed in model.heads.
    Returns the last epoch's mean loss per layer."""
    torch.manual_seed(seed)
    losses = {}
    for layer in tqdm(layers, desc="fitting exit heads", unit="layer"):
        head = ScoreHead(model.bert.config.hidden_size)
        features, final, mask = _padded(observed, layer)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            epoch = []
            for rows in torch.randperm(len(final), generator=generator).split(batch_queries):
                scores = head.from_features(*(f[rows] for f in features))
                loss = distillation_loss(scores, final[rows], mask[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch.append(loss.item())
        losses[layer] = float(np.mean(epoch))
        model.heads[str(layer)] = head.eval()
    model.checkpoint_layers = tuple(sorted({*layers, model.num_layers}))
    return losses


def calibrate_heads(model: LayeredCrossEncoder, held_out: list[Observed], k: int = 10,
                    min_overlap: float = 0.98) -> dict:
    """Pruning margins, frontier and default setting on held-out pseudo-queries (their final ranking is the
    truth a pruned rerank must keep), in the same form as calibrate() writes for Sieve's own reranker."""
    scores = layer_scores(model, held_out)
    early = [l for l in model.checkpoint_layers if l < model.num_layers]
    margins = margins_by_recall(scores, early, k)
    frontier = pruning_frontier(scores, margins, k, candidates=scaled_candidates(model.num_layers))
    chosen = cheapest_setting(frontier, min_overlap) or {"checkpoints": [], "margins": {}, "speedup": 1.0}
    return {"margins_by_recall": margins, "pruning_frontier": frontier, "pruning": chosen,
            "default_checkpoints": chosen["checkpoints"], "margins": chosen["margins"]}


def train_exit_heads(reranker, requests: list[tuple[str, list[str]]], held_out_share: float = 0.25,
                     min_overlap: float = 0.98, epochs: int = 60, pre_ranker: bool = False):
    """Observe a freshly loaded LayeredReranker's frozen model over (pseudo-query, candidates) requests, fit
    a head at every layer below the last on most of them (installed in reranker.model) and calibrate on the
    rest; with `pre_ranker`, distil a PreRanker from the same final scores and calibrate its cut in front of
    the heads' default pruning. Returns (the config save_heads stores, the PreRanker or None)."""
    from .layered import LayeredReranker
    from .pre_ranker import calibrate_cut, measure_pre_cost, train_pre_ranker

    if not isinstance(reranker, LayeredReranker):
        raise InvalidArgument(f"{type(reranker.model).__name__} is not a BERT-family cross-encoder run layer by "
                              "layer: it reranks, but exit heads cannot be trained for it")
    if len(requests) < 8:
        raise InvalidArgument(f"{len(requests)} pseudo-queries with candidates; exit heads need at least 8")
    model = reranker.model
    started = time.perf_counter()
    layers = tuple(range(1, model.num_layers))
    observed = observe(model, reranker.tokenizer, requests, layers, reranker.max_length, reranker.dtype)
    observed_at = time.perf_counter()
    held = max(2, int(len(observed) * held_out_share))
    losses = fit_heads(model, observed[held:], layers, epochs=epochs)
    calibration = calibrate_heads(model, observed[:held], min_overlap=min_overlap)
    config = {**calibration, "early_layers": list(layers), "fingerprint": reranker.fingerprint,
              "training": {"pseudo_queries": len(requests), "held_out": held,
                           "pairs": int(sum(len(p) for _, p in requests)), "epochs": epochs,
                           "final_losses": {str(l): round(v, 4) for l, v in losses.items()},
                           "observe_seconds": round(observed_at - started, 1),
                           "fit_seconds": round(time.perf_counter() - observed_at, 1),
                           "min_overlap": min_overlap, "trained_at": time.strftime("%Y-%m-%d %H:%M:%S")}}
    if not pre_ranker:
        return config, None
    pre, record = train_pre_ranker(requests[held:], [o.final for o in observed[held:]])
    pre.serving(reranker.device, reranker.dtype)  # measured and calibrated as it will serve
    pre_scores, pre_cost = measure_pre_cost(pre, reranker, requests[:held])
    chosen = calibration["pruning"]
    cut = calibrate_cut(pre_scores, layer_scores(model, observed[:held]), chosen["checkpoints"],
                        {int(l): m for l, m in chosen["margins"].items()}, pre_cost, min_overlap=min_overlap)
    config["pre_ranker"] = {**cut, "training": record}
    return config, pre


def heads_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())

