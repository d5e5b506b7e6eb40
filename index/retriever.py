"""The one interface every index implements (dense, BM25, learned impact, multi-vector).

A collection is a list of immutable segments. Each retriever encodes a batch of documents once,
writes its part of a new segment, opens parts for search, and can copy a subset of a part's rows
into a new one (compaction), so nothing is re-encoded after ingestion.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .documents import Document
from .settings import CollectionSettings


@dataclass(frozen=True)
class Hit:
    segment: int  # position of the segment in the snapshot searched
    row: int  # row inside that segment
    score: float


class Retriever(ABC):
    name: ClassVar[str]
    needs_corpus_statistics: ClassVar[bool] = False  # scores depend on more than each document (see statistics)

    def __init__(self, settings: CollectionSettings):
        self.settings = settings

    # Ingestion -----------------------------------------------------------------------------
    @abstractmethod
    def encode_documents(self, docs: list[Document]) -> Any:
        """The costly step; runs before the collection's write lock is taken."""

    @abstractmethod
    def write(self, directory: Path, encoded: Any) -> None:
        """Write this retriever's files of a new segment into `directory`."""

    @abstractmethod
    def open(self, directory: Path) -> Any:
        """Open this retriever's part of a segment for search (memory-mapped where possible)."""

    @abstractmethod
    def take(self, part: Any, rows: np.ndarray) -> Any:
        """The encoded form of `rows` of an opened part, for compaction."""

    @abstractmethod
    def concat(self, encoded: list[Any]) -> Any:
        """Join encoded batches, in order."""

    # Search --------------------------------------------------------------------------------
    @abstractmethod
    def encode_queries(self, texts: list[str]) -> list[Any]:
        """One query representation per text; the service batches concurrent queries here."""

    @abstractmethod
    def search(self, parts: list[Any], deleted: list[np.ndarray], query: Any, k: int, params: dict | None = None,
               hidden: list[np.ndarray] | None = None) -> list[Hit]:
        """Best k live rows over all parts; deleted[i] holds the deleted rows of parts[i]. `params`: this
        search's overrides of the retriever's settings (the multi-vector knobs). `hidden[i]`: rows of
        parts[i] a filter leaves out; they are never returned, but count in ranking statistics."""

    def statistics(self, parts: list[Any], deleted: list[np.ndarray], query: Any) -> Any | None:
        """What this query's scores depend on beyond each document (BM25's document frequencies), for a
        sharded collection to add up over its shards and pass back as `params["corpus"]`; None where a
        score is the document's alone."""
        return None

    def stats(self, parts: list[Any], live_rows: int) -> dict:
        """Figures for DescribeCollection (vectors, bytes, ...)."""
        return {}


def excluded(deleted: list[np.ndarray], hidden: list[np.ndarray] | None) -> list[np.ndarray]:
    """Per part, the sorted rows a search must not return: tombstones and rows a filter leaves out."""
    if hidden is None:
        return deleted
    return [np.union1d(gone, out) for gone, out in zip(deleted, hidden)]


def top_hits(candidates: list[Hit], k: int) -> list[Hit]:
    return sorted(candidates, key=lambda hit: -hit.score)[:k]


def dir_bytes(directory: Path, prefix: str) -> int:
    """Bytes of a segment's files with this prefix (0 for files a compaction removed meanwhile)."""
    total = 0
    for path in directory.glob(f"{prefix}*"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total
