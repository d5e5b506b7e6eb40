"""The fused first stage over a BEIR corpus, for mining, calibration and benchmarks.

Training needs hard negatives and teacher scores, and the benchmark needs the exact candidates the
service would rerank; both come from here, composed of the index's own retrievers (BM25, exact dense
search over MiniLM, and with `multivector=True` pooled MaxSim at the collection defaults) and its RRF
(index/fusion.py). The built parts are kept in a folder, so reruns are cheap.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sieve.index.beir import DATASETS
from sieve.index.documents import Document
from sieve.index.fusion import reciprocal_rank
from sieve.index.registry import make_retrievers
from sieve.index.settings import CollectionSettings

SCIFACT_DIR = DATASETS / "scifact"
NOTHING_DELETED = [np.zeros(0, "int64")]


@dataclass
class Candidates:
    """One query's fused list: ids best first with RRF, BM25 and dense scores (BM25 0 where absent)."""

    ids: list[str]
    rrf: np.ndarray
    bm25: np.ndarray
    dense: np.ndarray


class FirstStage:
    def __init__(self, corpus: dict[str, dict[str, str]], cache: str | Path | None = None, multivector: bool = False):
        """`cache`: the folder that keeps the built parts (a temporary one if None)."""
        self.ids = list(corpus)
        docs = [Document(i, corpus[i]["text"], corpus[i]["title"]) for i in self.ids]
        indexes = ("bm25", "dense", "multivector") if multivector else ("bm25", "dense")
        # Exact dense search at any size: the reference the service's HNSW is measured against.
        self.retrievers = make_retrievers(CollectionSettings(indexes=indexes, exact_search_max=len(docs)))
        folder = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="sieve-first-stage-"))
        self.parts = {name: self._part(name, docs, folder / name) for name in indexes}

    def _part(self, name: str, docs: list[Document], folder: Path):
        retriever, done = self.retrievers[name], folder / "complete"
        if not (done.exists() and done.read_text() == str(len(docs))):  # none yet, or for a corpus of another size
            folder.mkdir(parents=True, exist_ok=True)
            retriever.write(folder, retriever.encode_documents(docs))
            done.write_text(str(len(docs)))
        return retriever.open(folder)

    def ranking(self, name: str, query, depth: int) -> list[tuple[int, float]]:
        hits = self.retrievers[name].search([self.parts[name]], NOTHING_DELETED, query, depth)
        return [(hit.row, hit.score) for hit in hits]

    def search(self, queries: list[str], depth: int = 100, rrf_k: int = 60) -> list[Candidates]:
        """Each retriever's top `depth`, fused by RRF (every document any list holds)."""
        depth = min(depth, len(self.ids))
        encoded = {name: retriever.encode_queries(queries) for name, retriever in self.retrievers.items()}
        vectors = self.parts["dense"].vectors
        results = []
        for q in range(len(queries)):
            rankings = {name: self.ranking(name, encoded[name][q], depth) for name in self.retrievers}
            fused = reciprocal_rank(rankings, rrf_k)
            rows = [row for row, _ in fused]
            bm25_of = dict(rankings["bm25"])
            results.append(Candidates(
                ids=[self.ids[row] for row in rows],
                rrf=np.array([score for _, score in fused], "float32"),
                bm25=np.array([bm25_of.get(row, 0.0) for row in rows], "float32"),
                dense=(np.asarray(vectors[rows], "float32") @ encoded["dense"][q]).astype("float32"),
            ))
        return results
