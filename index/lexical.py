"""Inverted indexes over scipy.sparse: BM25 on term frequencies, and the base for learned impacts.

A segment's part is a documents x terms CSR matrix with its own sorted vocabulary; its CSC form is
the posting lists. Corpus statistics (document frequencies, average length) are taken over the live
rows of every segment at query time, so deletes and new segments never leave BM25 stale.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .analysis import analyze
from .documents import Document
from .retriever import Hit, Retriever, top_hits


@dataclass
class SparseRows:
    """Documents x terms weights with the sorted vocabulary naming the columns."""

    matrix: sp.csr_matrix
    terms: np.ndarray
    lengths: np.ndarray  # analysed tokens per document (BM25 length normalisation)

    @classmethod
    def from_counters(cls, rows: list[dict[str, float]], lengths: list[int]) -> "SparseRows":
        terms = np.array(sorted({t for row in rows for t in row}), dtype=str)
        column = {t: i for i, t in enumerate(terms.tolist())}
        indptr, indices, data = [0], [], []
        for row in rows:
            indices.extend(column[t] for t in row)
            data.extend(row.values())
            indptr.append(len(indices))
        matrix = sp.csr_matrix(
            (np.array(data, "float32"), np.array(indices, "int64"), np.array(indptr, "int64")),
            shape=(len(rows), len(terms)),
        )
        return cls(matrix, terms, np.asarray(lengths, "float32"))


@dataclass
class CorpusStatistics:
    """BM25's view of a corpus for one query: live documents, their analysed tokens, and how many hold
    each query term. Shards' statistics add up to their collection's."""

    documents: int
    length: float
    frequencies: dict[str, float]

    @classmethod
    def total(cls, parts: list["CorpusStatistics"]) -> "CorpusStatistics":
        frequencies: dict[str, float] = {}
        for part in parts:
            for term, count in part.frequencies.items():
                frequencies[term] = frequencies.get(term, 0.0) + count
        return cls(sum(p.documents for p in parts), sum(p.length for p in parts), frequencies)


@dataclass
class SparsePart:
    rows: SparseRows
    postings: sp.csc_matrix
    column: dict[str, int]


class LexicalRetriever(Retriever):
    """Shared machinery; subclasses say how documents and queries become term weights."""

    prefix: str

    def write(self, directory: Path, encoded: SparseRows) -> None:
        sp.save_npz(directory / f"{self.prefix}.npz", encoded.matrix, compressed=False)
        np.save(directory / f"{self.prefix}.terms.npy", encoded.terms)
        np.save(directory / f"{self.prefix}.lengths.npy", encoded.lengths)

    def open(self, directory: Path) -> SparsePart:
        rows = SparseRows(
            sp.load_npz(directory / f"{self.prefix}.npz").tocsr(),
            np.load(directory / f"{self.prefix}.terms.npy"),
            np.load(directory / f"{self.prefix}.lengths.npy"),
        )
        return SparsePart(rows, rows.matrix.tocsc(), {t: i for i, t in enumerate(rows.terms.tolist())})

    def take(self, part: SparsePart, rows: np.ndarray) -> SparseRows:
        return SparseRows(part.rows.matrix[rows], part.rows.terms, part.rows.lengths[rows])

    def concat(self, encoded: list[SparseRows]) -> SparseRows:
        terms = np.unique(np.concatenate([e.terms for e in encoded])) if encoded else np.array([], str)
        blocks = []
        for e in encoded:
            coo = e.matrix.tocoo()
            cols = np.searchsorted(terms, e.terms)[coo.col] if len(e.terms) else coo.col
            blocks.append(sp.csr_matrix((coo.data, (coo.row, cols)), shape=(e.matrix.shape[0], len(terms))))
        return SparseRows(sp.vstack(blocks, format="csr"), terms, np.concatenate([e.lengths for e in encoded]))

    def stats(self, parts, live_rows: int) -> dict:
        return {"postings": int(sum(p.rows.matrix.nnz for p in parts)),
                "terms": int(len(set().union(*(p.column for p in parts)))) if parts else 0}

    def _query_columns(self, part: SparsePart, query: dict[str, float]):
        """(columns present in this part, their query weights, their positions in the query)."""
        found = [(part.column[t], w, i) for i, (t, w) in enumerate(query.items()) if t in part.column]
        if not found:
            return None
        cols, weights, positions = zip(*found)
        return part.postings[:, list(cols)].tocoo(), np.array(weights, "float32"), np.array(positions)

    @staticmethod
    def _live_mask(part: SparsePart, gone: np.ndarray) -> np.ndarray:
        live = np.ones(part.rows.matrix.shape[0], bool)
        live[gone] = False
        return live

    @staticmethod
    def _best(hits_per_part: list[tuple[int, np.ndarray]], k: int) -> list[Hit]:
        hits: list[Hit] = []
        for segment, scores in hits_per_part:
            candidates = np.flatnonzero(scores > 0)
            if len(candidates) > k:
                candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
            hits.extend(Hit(segment, int(r), float(scores[r])) for r in candidates)
        return top_hits(hits, k)


class BM25Retriever(LexicalRetriever):
    name = "bm25"
    prefix = "bm25"
    needs_corpus_statistics = True

    def encode_documents(self, docs: list[Document]) -> SparseRows:
        tokens = [analyze(doc.content) for doc in docs]
        return SparseRows.from_counters([Counter(t) for t in tokens], [len(t) for t in tokens])

    def encode_queries(self, texts: list[str]) -> list[dict[str, float]]:
        return [dict(Counter(analyze(text))) for text in texts]

    def statistics(self, parts, deleted, query: dict[str, float]) -> CorpusStatistics:
        """What BM25 needs of the corpus for this query, over the live rows of every part."""
        lives = [self._live_mask(p, g) for p, g in zip(parts, deleted)]
        return self._statistics(parts, lives, [self._query_columns(p, query) for p in parts], query)

    @staticmethod
    def _statistics(parts, lives, selected, query) -> CorpusStatistics:
        df = np.zeros(len(query), "float64")
        for sel, live in zip(selected, lives):
            if sel is not None:
                coo, _, positions = sel
                np.add.at(df, positions[coo.col], live[coo.row].astype("float64"))
        return CorpusStatistics(sum(int(live.sum()) for live in lives),
                                sum(float(p.rows.lengths[live].sum()) for p, live in zip(parts, lives)),
                                dict(zip(query, df.tolist())))

    def search(self, parts, deleted, query: dict[str, float], k: int, params: dict | None = None,
               hidden: list[np.ndarray] | None = None) -> list[Hit]:
        """`params["corpus"]`: statistics of a larger corpus this one is part of (a shard of a
        collection), so that scores mean the same on every shard."""
        if not query or not parts:
            return []
        k1, b = self.settings.bm25_k1, self.settings.bm25_b
        lives = [self._live_mask(p, g) for p, g in zip(parts, deleted)]
        selected = [self._query_columns(p, query) for p in parts]
        corpus = (params or {}).get("corpus") or self._statistics(parts, lives, selected, query)
        n_docs = corpus.documents
        if n_docs == 0 or not any(live.any() for live in lives):
            return []
        avg_length = corpus.length / n_docs
        df = np.array([corpus.frequencies.get(term, 0.0) for term in query], "float64")
        idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5))  # Lucene's BM25 idf, as bm25s
        scored = []
        for segment, (part, sel, live) in enumerate(zip(parts, selected, lives)):
            if sel is None:
                continue
            coo, weights, positions = sel
            tf = coo.data
            norm = k1 * (1 - b + b * part.rows.lengths[coo.row] / avg_length)
            contribution = idf[positions[coo.col]] * weights[coo.col] * tf / (tf + norm)  # Lucene drops (k1 + 1)
            scores = np.bincount(coo.row, weights=contribution, minlength=part.rows.matrix.shape[0])
            scores[~live] = 0
            if hidden is not None:  # filtered out after scoring: the statistics above stay the collection's
                scores[hidden[segment]] = 0
            scored.append((segment, scores))
        return self._best(scored, k)
