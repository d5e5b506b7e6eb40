"""Per-collection settings: one validated, immutable record, stored with the collection."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import InvalidArgument
from .filters import check_schema
from .fusion import FUSIONS

RETRIEVER_NAMES = ("dense", "bm25", "impact", "multivector")
QUALITY_ESTIMATORS = ("none", "unique_terms", "lm_divergence", "embedding_norm", "supervised")
COMPRESSIONS = ("none", "pq", "residual")


@dataclass(frozen=True)
class CollectionSettings:
    # Encoders: a sentence-transformers / Hugging Face name or local path; "" is the packaged MiniLM.
    encoder: str = ""
    max_tokens: int = 256
    # Indexes built at ingestion, and the ones a search uses when the request names none.
    indexes: tuple[str, ...] = ("dense", "bm25")
    retrievers: tuple[str, ...] = ()  # empty: every built index, fused
    fusion: str = "rrf"
    rrf_k: int = 60
    fusion_weights: dict = field(default_factory=dict)  # retriever -> weight, for "weighted"
    # Dense: exact search up to this many vectors in a segment, HNSW above it.
    exact_search_max: int = 20_000
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    # BM25 (k1, b as bm25s/Lucene).
    bm25_k1: float = 0.9
    bm25_b: float = 0.4
    # Learned term weights: "" is the shipped artifact; any other value is a path.
    term_weights: str = ""
    # Multi-vector with token pooling.
    pool_factor: int = 2
    protected_tokens: int = 1
    compression: str = "residual"
    # Multi-vector search (PLAID-like; per-request overrides): centroids kept per query token, the lowest
    # centroid score kept, documents rescored by centroid interaction, documents scored exactly.
    nprobe: int = 8
    centroid_threshold: float | None = None
    candidates: int = 512
    exact_candidates: int = 128
    # Passage-quality pruning, before encoding.
    quality_estimator: str = "none"
    prune_ratio: float = 0.0
    prune_threshold: float | None = None
    # Metadata fields filters may use, and their types (keyword, integer, float, bool, datetime).
    filterable: dict = field(default_factory=dict)
    # Reranking: None means "on only where a measured run showed it helps" (see the README).
    reranker: str = ""
    rerank: bool | None = None
    rerank_candidates: int = 50
    rerank_checkpoints: tuple[int, ...] = ()
    rerank_margin: float | None = None

    def __post_init__(self) -> None:
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise InvalidArgument(f"invalid setting: {message}")

        for name in self.indexes:
            check(name in RETRIEVER_NAMES, f"unknown index {name!r}; choose from {', '.join(RETRIEVER_NAMES)}")
        check(len(self.indexes) > 0, "'indexes' must name at least one index")
        check(len(set(self.indexes)) == len(self.indexes), "'indexes' names an index twice")
        for name in self.retrievers:
            check(name in self.indexes, f"retriever {name!r} is not among the built indexes {list(self.indexes)}")
        check(self.fusion in FUSIONS, f"unknown fusion {self.fusion!r}; choose from {', '.join(FUSIONS)}")
        check(self.rrf_k > 0, "'rrf_k' must be positive")
        for name, weight in self.fusion_weights.items():
            check(name in self.indexes, f"fusion weight for {name!r}, which is not a built index")
            check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
                  and weight >= 0, f"fusion weight of {name!r} must be a finite number >= 0")
        check(16 <= self.max_tokens <= 8192, "'max_tokens' must be within 16..8192")
        check(self.exact_search_max >= 0, "'exact_search_max' must be >= 0")
        check(self.hnsw_m >= 4 and self.hnsw_ef_search >= 1, "'hnsw_m' must be >= 4 and 'hnsw_ef_search' >= 1")
        check(self.bm25_k1 >= 0 and 0 <= self.bm25_b <= 1, "'bm25_k1' must be >= 0 and 'bm25_b' within [0, 1]")
        check(self.pool_factor >= 1, f"'pool_factor' must be >= 1 (1 turns pooling off), not {self.pool_factor}")
        check(self.protected_tokens >= 0, "'protected_tokens' must be >= 0")
        check(self.nprobe >= 1 and self.candidates >= 1 and self.exact_candidates >= 1,
              "'nprobe', 'candidates' and 'exact_candidates' must be >= 1")
        check(self.centroid_threshold is None or -1 <= self.centroid_threshold <= 1,
              "'centroid_threshold' is a cosine within [-1, 1] (null: off)")
        check(self.compression in COMPRESSIONS, f"unknown compression {self.compression!r}; choose from {', '.join(COMPRESSIONS)}")
        check(
            self.quality_estimator in QUALITY_ESTIMATORS,
            f"unknown quality estimator {self.quality_estimator!r}; choose from {', '.join(QUALITY_ESTIMATORS)}",
        )
        check(0 <= self.prune_ratio < 1, f"'prune_ratio' must be within [0, 1), not {self.prune_ratio}")
        check(
            self.quality_estimator != "none" or (self.prune_ratio == 0 and self.prune_threshold is None),
            "pruning needs a 'quality_estimator'",
        )
        check(self.rerank_candidates >= 1, "'rerank_candidates' must be >= 1")
        check_schema(self.filterable)
        check(all(layer >= 1 for layer in self.rerank_checkpoints), "'rerank_checkpoints' are layer numbers >= 1")
        check(self.rerank_margin is None or self.rerank_margin >= 0, "'rerank_margin' must be >= 0")

    @property
    def search_retrievers(self) -> tuple[str, ...]:
        return self.retrievers or self.indexes

    def check_retrievers(self, names: list[str] | tuple[str, ...], collection: str) -> tuple[str, ...]:
        """The retrievers a search asks for (none: the search retrievers), each a built index."""
        names = tuple(names) or self.search_retrievers
        for name in names:
            if name not in self.indexes:
                raise InvalidArgument(f"collection {collection!r} has no {name!r} index; it has "
                                      f"{', '.join(self.indexes)}")
        return names

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict | None) -> "CollectionSettings":
        """Build from JSON-like values; unknown keys and wrong types are named in the error."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InvalidArgument(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(known)}")
        defaults = cls()
        converted = {}
        for name, value in values.items():
            default = getattr(defaults, name)
            try:
                converted[name] = _convert(value, default, name)
            except (TypeError, ValueError) as error:
                raise InvalidArgument(f"invalid setting {name!r}: {error}") from None
        return cls(**converted)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _convert(value, default, name):
    if value is None:
        if default is None or name in ("rerank", "prune_threshold", "rerank_margin", "centroid_threshold"):
            return None
        raise ValueError("must not be null")
    if isinstance(default, bool) or name == "rerank":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [part for part in value.split(",") if part]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        item_type = int if name == "rerank_checkpoints" else str
        return tuple(_whole(v) if item_type is int else str(v) for v in value)
    if isinstance(default, int) and not isinstance(default, bool):
        return _whole(value)
    if isinstance(default, float) or name in ("prune_threshold", "rerank_margin", "centroid_threshold"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return float(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {value!r}")
        return dict(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if not value.isprintable():
        raise ValueError(f"control characters (newlines, tabs) are not allowed: {value!r}")
    return value


def _whole(value) -> int:
    """Integers arrive as floats from protobuf Struct; accept 3.0, refuse 2.5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or float(value) != int(value):
        raise ValueError(f"expected a whole number, got {value!r}")
    return int(value)
