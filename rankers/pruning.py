"""Pruning options and rules: which candidates survive a checkpoint layer, live or simulated.

Pruning ("progressive cluster pruning"): all candidates of a request run through the model
together, one layer at a time. At a checkpoint layer the trained head scores the survivors; those
more than a margin below the k-th best score are dropped, the cut is moved down to the next clear
score gap so that a tight group is kept or dropped whole, and never fewer than k + safety survive.
Later layers run only on the survivors (rows are index-selected and padding trimmed), so their
cost really falls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sieve.index.errors import InvalidArgument

from .limits import MAX_PASSAGES


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
