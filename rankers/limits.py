"""What one rerank request may hold, and the check every reranker runs before any model sees it."""
from __future__ import annotations

from sieve.index.errors import InvalidArgument

MAX_PASSAGES = 1000
MAX_QUERY_CHARS = 2_000
MAX_PASSAGE_CHARS = 100_000  # passages are truncated to max_length tokens; this only bounds tokenizer work


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
