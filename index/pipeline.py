"""The steps of ingestion, one implementation each, for every path that runs them: Collection.prepare
(one batch, in the writer) and the Ray Data stages of service/ray_ingest.py (many batches, on workers).

    documents -> check_documents -> split_by_quality -> encode (each index) -> segment
"""
from __future__ import annotations

import numpy as np

from .documents import Document, validate_batch
from .filters import check_metadata
from .retriever import Retriever
from .settings import CollectionSettings


def check_documents(docs: list[Document], settings: CollectionSettings, max_docs: int | None = None,
                    max_chars: int | None = None) -> None:
    """The whole batch is refused on its first problem (INVALID_ARGUMENT), before any work."""
    validate_batch(docs, max_docs, max_chars)
    for doc in docs:
        check_metadata(doc.metadata, settings.filterable, doc.id)


def split_pruned(docs: list[Document], settings: CollectionSettings,
                 prune: bool = True) -> tuple[list[Document], list[Document], np.ndarray | None]:
    """(kept, pruned, quality scores of kept + pruned): quality pruning, before any costly encoder."""
    if not prune or settings.quality_estimator == "none":
        return docs, [], None
    from .quality import split_by_quality

    return split_by_quality(docs, settings)


def encode(kept: list[Document], retrievers: dict[str, Retriever]) -> dict:
    """Each index's encoding of the kept documents (none when every passage was pruned)."""
    return {name: r.encode_documents(kept) for name, r in retrievers.items()} if kept else {}
