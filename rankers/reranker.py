"""Rerankers: Sieve's layered cross-encoder with early candidate pruning, and any HF cross-encoder.

Pruning ("progressive cluster pruning"): all candidates of a request run through the model
together, one layer at a time. At a checkpoint layer the trained head scores the survivors; those
more than a margin below the k-th best score are dropped, the cut is moved down to the next clear
score gap so that a tight group is kept or dropped whole, and never fewer than k + safety survive.
Later layers run only on the survivors (rows are index-selected and padding trimmed), so their
cost really falls.
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sieve.index.encoders import DEFAULT_ENCODER_ALIASES, loaded_once, resolve_encoder
from sieve.index.errors import InvalidArgument, NotFound

from .model import LayeredCrossEncoder

ARTIFACT = Path(__file__).parent / "artifacts" / "minilm-l6-pruning"
MAX_PASSAGES = 1000
MAX_QUERY_CHARS = 2_000
MAX_PASSAGE_CHARS = 100_000  # passages are truncated to max_length tokens; this only bounds tokenizer work
TOKEN_BUDGET = 32_768  # tokens in one forward chunk: bounds memory whatever the request size


@dataclass(frozen=True)
class PruningOptions:
    """prune: drop candidates at checkpoint layers. checkpoints: 1-based layers to prune at (None: the
    reranker's defaults). margin: score units below the k-th best that a candidate may trail and
    survive, at every checkpoint; margins: the same per layer ({layer: margin}); neither: the per-layer
    margins calibrated on held-out training queries. safety: survivors beyond k that are always kept."""

    prune: bool = True
    checkpoints: tuple[int, ...] | None = None
    margin: float | None = None
    safety: int = 5
    margins: dict[int, float] | None = None

    def __post_init__(self):
        if not isinstance(self.prune, bool):
            raise InvalidArgument(f"prune must be true or false, got {self.prune!r}")
        if self.checkpoints is not None:
            if (not isinstance(self.checkpoints, (tuple, list)) or not self.checkpoints
                    or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in self.checkpoints)):
                raise InvalidArgument(f"checkpoints must be a non-empty list of layer numbers >= 1, got {self.checkpoints!r}")
            if list(self.checkpoints) != sorted(set(self.checkpoints)):
                raise InvalidArgument(f"checkpoints must be strictly increasing, got {self.checkpoints!r}")
            object.__setattr__(self, "checkpoints", tuple(self.checkpoints))
        if self.margin is not None and not _is_margin(self.margin):
            raise InvalidArgument(f"margin must be a finite number >= 0 or unset, got {self.margin!r}")
        if self.margins is not None:
            if self.margin is not None:
                raise InvalidArgument("set margin (every layer) or margins (per layer), not both")
            if (not isinstance(self.margins, dict) or not all(isinstance(l, int) and not isinstance(l, bool) and l >= 1
                                                              and _is_margin(m) for l, m in self.margins.items())):
                raise InvalidArgument(f"margins must map layer numbers >= 1 to finite numbers >= 0, got {self.margins!r}")
        if isinstance(self.safety, bool) or not isinstance(self.safety, int) or not 0 <= self.safety <= MAX_PASSAGES:
            raise InvalidArgument(f"safety must be an integer in [0, {MAX_PASSAGES}], got {self.safety!r}")


def _is_margin(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


NO_PRUNING = PruningOptions(prune=False)


@dataclass
class RerankResult:
    order: list[int]  # indices into the request's passages, best first: the final survivors
    scores: list[float]  # final-layer scores, aligned with order
    survivors: list[int]  # candidates alive after each checkpoint (first entry: all of them)


def validate_request(query: str, passages: list[str], k: int) -> None:
    if not isinstance(query, str) or not query.strip():
        raise InvalidArgument("query must be a non-empty string")
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidArgument(f"query has {len(query)} characters; at most {MAX_QUERY_CHARS}")
    if not isinstance(passages, (list, tuple)) or not passages:
        raise InvalidArgument("passages must be a non-empty list of strings")
    if len(passages) > MAX_PASSAGES:
        raise InvalidArgument(f"{len(passages)} passages; at most {MAX_PASSAGES} in one request")
    for i, passage in enumerate(passages):
        if not isinstance(passage, str):
            raise InvalidArgument(f"passage {i} is not a string")
        if len(passage) > MAX_PASSAGE_CHARS:
            raise InvalidArgument(f"passage {i} has {len(passage)} characters; at most {MAX_PASSAGE_CHARS}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgument(f"k must be an integer >= 1, got {k!r}")


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


class Reranker:
    """Shared request handling; subclasses score a stack of (query, passages, k, options) requests."""

    num_layers: int
    checkpoint_layers: tuple[int, ...]

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.lock = threading.Lock()  # on few cores one forward at a time is fastest

    def rerank(self, query: str, passages: list[str], k: int, options: PruningOptions = NO_PRUNING) -> RerankResult:
        return self.rerank_many([(query, passages, k, options)])[0]

    def rerank_many(self, requests: list[tuple[str, list[str], int, PruningOptions]]) -> list[RerankResult]:
        """Validate every request, then run them in stacks of at most TOKEN_BUDGET tokens each."""
        for query, passages, k, options in requests:
            validate_request(query, passages, k)
            self.check_options(options)
        encoded = [self.encode(query, passages) for query, passages, _, _ in requests]
        results: list[RerankResult | None] = [None] * len(requests)
        stack: list[int] = []
        for i in range(len(requests) + 1):
            tokens = sum(encoded[j]["attention_mask"].numel() for j in stack)
            if stack and (i == len(requests) or tokens + encoded[i]["attention_mask"].numel() > TOKEN_BUDGET):
                with self.lock, torch.inference_mode():
                    for j, result in zip(stack, self.score_stack([encoded[j] for j in stack],
                                                                 [requests[j][2:] for j in stack])):
                        results[j] = result
                stack = []
            if i < len(requests):
                stack.append(i)
        return results

    def encode(self, query: str, passages: list[str]) -> dict:
        return dict(self.tokenizer([query] * len(passages), list(passages), truncation="longest_first",
                                   max_length=self.max_length, padding=True, return_tensors="pt"))

    def check_options(self, options: PruningOptions) -> None:
        if not isinstance(options, PruningOptions):
            raise InvalidArgument("options must be a PruningOptions")
        if not options.prune:
            return
        requested = sorted(set(options.checkpoints or self.checkpoint_layers) | set(options.margins or ()))
        beyond = [c for c in requested if c > self.num_layers]
        if beyond:
            raise InvalidArgument(f"no trained score head at layer(s) {beyond}: this reranker has "
                                  f"{self.num_layers} layers, with heads at {list(self.checkpoint_layers)}")
        early = [c for c in requested if c < self.num_layers]
        if not early:
            raise InvalidArgument(f"this reranker has score heads only at its last layer ({self.num_layers}): "
                                  "early-layer pruning needs a trained head at each checkpoint layer; "
                                  "rerank with PruningOptions(prune=False), or use Sieve's shipped reranker")
        missing = [c for c in early if c not in self.checkpoint_layers]
        if missing:
            raise InvalidArgument(f"no trained score head at layer(s) {missing}; this reranker has heads at "
                                  f"layers {list(self.checkpoint_layers)} of {self.num_layers}")

    def score_stack(self, batches: list[dict], settings: list[tuple[int, PruningOptions]]) -> list[RerankResult]:
        raise NotImplementedError


def _stack(batches: list[dict]) -> dict:
    """Concatenate tokenised requests row-wise, padded to the longest row."""
    width = max(b["input_ids"].shape[1] for b in batches)
    return {key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1])) for b in batches])
            for key in batches[0]}


def keep_count(sorted_scores: torch.Tensor | np.ndarray, k: int, margin: float, safety: int) -> int:
    """How many of the (descending) scores survive: within `margin` of the k-th best, at least k + safety,
    and the cut moved down to the next gap of at least a tenth of the margin, so ties stay together."""
    n = len(sorted_scores)
    floor = min(n, k + safety)
    if floor >= n:
        return n
    kth = sorted_scores[min(k, n) - 1]
    keep = max(floor, int((sorted_scores >= kth - margin).sum()))
    gaps = sorted_scores[:-1] - sorted_scores[1:]
    while keep < n and gaps[keep - 1] < 0.1 * margin:
        keep += 1
    return keep


def simulate_pruning(layer_scores, k: int, checkpoints, margins: dict[int, float],
                     safety: int = 5) -> tuple[list[int], np.ndarray, int]:
    """What LayeredReranker's pruning does to one request, from every layer's unpruned scores [layers, n]
    (a candidate's score never depends on the others): (survivors per checkpoint, final order of the
    survivors, rows run through layers). Calibration searches pruning settings with it (numpy: fast)."""
    layer_scores = np.asarray(layer_scores, dtype=np.float32)
    num_layers, n = layer_scores.shape
    alive, survivors, rows = np.arange(n), [n], 0
    for layer in range(1, num_layers + 1):
        rows += len(alive)
        if layer in checkpoints and layer < num_layers:
            scores = layer_scores[layer - 1, alive]
            ranked = np.argsort(-scores, kind="stable")
            keep = keep_count(scores[ranked], k, margins.get(layer, math.inf), safety)
            alive = np.sort(alive[ranked[:keep]])
            survivors.append(keep)
    return survivors, alive[np.argsort(-layer_scores[-1, alive], kind="stable")], rows


class LayeredReranker(Reranker):
    """A LayeredCrossEncoder with calibrated pruning margins, layer by layer over a stack of requests."""

    def __init__(self, model: LayeredCrossEncoder, tokenizer, config: dict, device: str, dtype: torch.dtype):
        super().__init__(tokenizer, config.get("max_length", 256))
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


class ExternalReranker(Reranker):
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
    if (path / "weights.safetensors").exists() and "checkpoint_layers" in (path / "config.json").read_text():
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
