"""Single-vector dense retrieval with faiss: exact for small segments, HNSW above a size."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .documents import Document
from .encoders import load_encoder
from .errors import InvalidArgument
from .retriever import Hit, Retriever, excluded, top_hits

log = logging.getLogger(__name__)


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass
class DensePart:
    vectors: np.ndarray  # memory-mapped, the source of truth for compaction
    index: faiss.Index


def search_skipping(index: faiss.Index, query: np.ndarray, k: int, gone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best k rows but `gone` (tombstones, rows a filter leaves out): inside faiss with an id selector,
    so the cost stays that of an unfiltered search; GPU indexes, which take no selector, over-fetch."""
    if not len(gone):
        scores, rows = index.search(query, k)
        return scores[0], rows[0]
    hnsw = isinstance(index, faiss.IndexHNSW)
    if gpu_count() and not hnsw:
        scores, rows = index.search(query, min(k + len(gone), index.ntotal))
        live = ~np.isin(rows[0], gone)
        return scores[0][live][:k], rows[0][live][:k]
    keep = np.ones(index.ntotal, bool)
    keep[gone] = False
    bitmap = np.packbits(keep, bitorder="little")  # referenced until the search returns
    selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bitmap))
    params = faiss.SearchParametersHNSW(sel=selector, efSearch=index.hnsw.efSearch) if hnsw \
        else faiss.SearchParameters(sel=selector)
    scores, rows = index.search(query, k, params=params)
    return scores[0], rows[0]


class DenseRetriever(Retriever):
    name = "dense"

    @property
    def encoder(self):
        return load_encoder(self.settings.encoder, self.settings.max_tokens)

    def encode_documents(self, docs: list[Document]) -> np.ndarray:
        return self.encoder.embed([doc.content for doc in docs])

    def write(self, directory: Path, encoded: np.ndarray) -> None:
        np.save(directory / "dense.npy", encoded)
        if len(encoded) > self.settings.exact_search_max:
            index = faiss.IndexHNSWFlat(encoded.shape[1], self.settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.add(encoded)
            faiss.write_index(index, str(directory / "dense.hnsw"))

    def open(self, directory: Path) -> DensePart:
        vectors = np.load(directory / "dense.npy", mmap_mode="r")
        hnsw = directory / "dense.hnsw"
        if hnsw.exists():
            index = faiss.read_index(str(hnsw), faiss.IO_FLAG_MMAP)
            index.hnsw.efSearch = self.settings.hnsw_ef_search
        else:
            index = faiss.IndexFlatIP(vectors.shape[1])
            index.add(np.ascontiguousarray(vectors))
            if gpu_count():
                index = faiss.index_cpu_to_all_gpus(index)
        return DensePart(vectors, index)

    def take(self, part: DensePart, rows: np.ndarray) -> np.ndarray:
        return np.asarray(part.vectors[rows], dtype="float32")

    def concat(self, encoded: list[np.ndarray]) -> np.ndarray:
        return np.vstack(encoded).astype("float32", copy=False)

    def encode_queries(self, texts: list[str]) -> list[np.ndarray]:
        return [sentence for sentence, _ in self.encoder.queries(texts)]

    def search(self, parts, deleted, query: np.ndarray, k: int, params: dict | None = None,
               hidden: list[np.ndarray] | None = None) -> list[Hit]:
        hits: list[Hit] = []
        query = np.asarray(query, "float32").reshape(1, -1)
        if parts and query.shape[1] != parts[0].vectors.shape[1]:
            raise InvalidArgument(f"a dense query has dimension {query.shape[1]}, the index {parts[0].vectors.shape[1]}")
        for segment, (part, gone) in enumerate(zip(parts, excluded(deleted, hidden))):
            allowed = part.index.ntotal - len(gone)
            if allowed <= 0:
                continue
            found = []
            selective = allowed <= max(part.index.ntotal // 10, self.settings.exact_search_max)
            if not (selective and isinstance(part.index, faiss.IndexHNSW)):
                scores, rows = search_skipping(part.index, query, min(k, allowed), gone)
                found = [Hit(segment, int(r), float(s)) for s, r in zip(scores, rows) if r >= 0]
            if len(found) < min(k, allowed):
                # HNSW's graph walks past the few rows a selective filter allows (recall collapses): exact
                # search of those rows instead, at a cost that falls with them; a search always returns
                # min(k, matching) documents.
                rows = np.setdiff1d(np.arange(part.index.ntotal), gone, assume_unique=True)
                scores = np.asarray(part.vectors[rows], "float32") @ query[0]
                best = np.argsort(-scores)[:k]
                found = [Hit(segment, int(rows[i]), float(scores[i])) for i in best]
            hits.extend(found)
        return top_hits(hits, k)

    def stats(self, parts, live_rows: int) -> dict:
        return {
            "vectors": live_rows,
            "dimension": parts[0].vectors.shape[1] if parts else None,
            "hnsw_segments": sum(isinstance(p.index, faiss.IndexHNSW) for p in parts),
            "gpu": gpu_count() > 0,
        }
