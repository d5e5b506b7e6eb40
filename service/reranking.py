"""Reranking in the service: options from request and collection, the measured default, batching.

Sieve never turns on a reranker that makes a collection worse: with `rerank` unset in its settings,
a collection reranks only if `sieve evaluate` measured that the reranker beats the collection's
fused first stage on judged queries; the decision and its figures are in DescribeCollection.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from sieve.index.errors import InvalidArgument

EVALUATION_FILE = "evaluation.json"


def rerank_default(collection) -> tuple[bool, str]:
    """(on by default?, why) for a collection."""
    if collection.settings.rerank is not None:
        return collection.settings.rerank, f"set by the collection's settings (rerank={collection.settings.rerank})"
    path = Path(collection.directory) / EVALUATION_FILE
    if not path.exists():
        return False, ("off: no measured run on this collection; `sieve evaluate` turns reranking on only "
                       "if it beats the fused first stage")
    try:
        figures = json.loads(path.read_text())
        on = figures["reranked_ndcg@10"] > figures["first_stage_ndcg@10"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return False, f"off: {collection.name}/{EVALUATION_FILE} cannot be read ({error}); run `sieve evaluate` again"
    verdict = "beat" if on else "did not beat"
    return on, (f"{'on' if on else 'off'}: the reranker {verdict} the fused first stage on "
                f"{figures['queries']} judged queries (nDCG@10 {figures['reranked_ndcg@10']:.4f} vs "
                f"{figures['first_stage_ndcg@10']:.4f}, measured {figures['measured_at']})")


def record_evaluation(collection_dir: Path, figures: dict) -> None:
    (Path(collection_dir) / EVALUATION_FILE).write_text(json.dumps(figures, indent=2))


def pruning_options(request_options, settings):
    """The reranker's PruningOptions from a request's RerankOptions over the collection's settings."""
    from sieve.rankers import PruningOptions

    checkpoints = tuple(request_options.checkpoints) or tuple(settings.rerank_checkpoints) or None
    given = [*request_options.margins.values(), *([request_options.margin] if request_options.HasField("margin") else [])]
    if not all(math.isfinite(value) for value in given):
        raise InvalidArgument("rerank margins must be finite numbers")
    margin = request_options.margin if request_options.HasField("margin") else settings.rerank_margin
    prune = request_options.prune if request_options.HasField("prune") else True
    margins = dict(request_options.margins) or None
    if margins and request_options.HasField("margin"):
        raise InvalidArgument("set margin (every checkpoint) or margins (per layer), not both")
    if margins:
        margin = None  # the request's per-layer margins replace the collection's single one
    return PruningOptions(prune=prune, checkpoints=checkpoints, margin=margin, margins=margins)


def candidate_count(request_options, settings, k: int, limit: int) -> int:
    candidates = request_options.candidates or settings.rerank_candidates
    if candidates < 0 or candidates > limit:
        raise InvalidArgument(f"rerank candidates must be within 1..{limit}, not {candidates}")
    return max(candidates, k)
