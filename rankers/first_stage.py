"""The fused first stage (BM25 + MiniLM dense, RRF) over a BEIR folder, for mining and benchmarks.

Training needs hard negatives and teacher scores, and the benchmark needs the exact candidates the
service would rerank; both come from here. Dense embeddings are cached on disk, so reruns are cheap.
With `multivector=True` a third list joins the fusion: MaxSim over the collection's default
multi-vector index (pool factor 2, residual compression), built and searched by the service's own
MultiVectorRetriever and kept beside the dense cache.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import Stemmer

from sieve.index.beir import DATASETS, passage_text
from sieve.index.encoders import load_encoder
from sieve.index.multivector import MultiVectorRetriever
from sieve.index.settings import CollectionSettings

SCIFACT_DIR = DATASETS / "scifact"


@dataclass
class Candidates:
    """One query's fused list: ids best first with RRF, BM25 and dense scores (0 / -1 where absent)."""

    ids: list[str]
    rrf: np.ndarray
    bm25: np.ndarray
    dense: np.ndarray


class FirstStage:
    """bm25s (k1 0.9, b 0.4, English stop words, Snowball stemmer) and exact cosine over MiniLM, fused by
    RRF; with `multivector`, pooled MaxSim as well."""

    def __init__(self, corpus: dict[str, dict[str, str]], cache: str | Path | None = None, multivector: bool = False):
        self.ids = list(corpus)
        texts = [passage_text(corpus[i]) for i in self.ids]
        self.stemmer = Stemmer.Stemmer("english")
        self.bm25 = bm25s.BM25(k1=0.9, b=0.4)
        self.bm25.index(bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=False),
                        show_progress=False)
        self.encoder = load_encoder("")
        cached = Path(cache) if cache else None
        if cached and cached.exists() and len(np.load(cached, mmap_mode="r")) == len(texts):
            self.embeddings = np.load(cached)
        else:  # no cache, or one written for a corpus of another size
            self.embeddings = self.encoder.embed(texts, progress=True)
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.save(cached, self.embeddings)
        self.multivector = None
        if multivector:
            self.multivector = MultiVectorRetriever(CollectionSettings(indexes=("multivector",)))
            self.multivector_part = self._multivector_part(texts, cached)

    def _multivector_part(self, texts: list[str], cached: Path | None):
        folder = cached.with_name(f"{cached.stem}_multivector") if cached else Path(tempfile.mkdtemp(prefix="sieve-mv-"))
        done = folder / "complete"
        if not (done.exists() and done.read_text() == str(len(texts))):
            folder.mkdir(parents=True, exist_ok=True)
            tokens = self.multivector.token_vectors(texts, progress=True)
            self.multivector.write(folder, self.multivector.pool(tokens, progress=True))
            done.write_text(str(len(texts)))
        return self.multivector.open(folder)

    def search(self, queries: list[str], depth: int = 100, rrf_k: int = 60) -> list[Candidates]:
        depth = min(depth, len(self.ids))
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, show_progress=False)
        bm25_rows, bm25_scores = self.bm25.retrieve(tokens, k=depth, show_progress=False, n_threads=1)
        dense_all = self.encoder.embed(queries) @ self.embeddings.T
        query_tokens = self.multivector.encode_queries(queries) if self.multivector else None
        results = []
        for q in range(len(queries)):
            rankings = [bm25_rows[q], np.argsort(-dense_all[q])[:depth]]
            if self.multivector:
                hits = self.multivector.search([self.multivector_part], [np.zeros(0, "int64")], query_tokens[q], depth)
                rankings.append([hit.row for hit in hits])
            fused: dict[int, float] = {}
            for ranking in rankings:
                for rank, row in enumerate(ranking, start=1):
                    fused[int(row)] = fused.get(int(row), 0.0) + 1.0 / (rrf_k + rank)
            order = sorted(fused, key=lambda row: -fused[row])
            bm25_of = dict(zip(map(int, bm25_rows[q]), bm25_scores[q]))
            results.append(Candidates(
                ids=[self.ids[row] for row in order],
                rrf=np.array([fused[row] for row in order], "float32"),
                bm25=np.array([bm25_of.get(row, 0.0) for row in order], "float32"),
                dense=dense_all[q, order].astype("float32"),
            ))
        return results
