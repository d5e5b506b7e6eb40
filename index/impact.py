"""Learned term weights in an inverted index (DeepCT): the model's weight replaces term frequency.

Each passage's analysed terms get a learned weight (index/term_weights.py); the index stores them
quantised as integer impacts, round(weight * 100), in the same scipy.sparse layout as BM25, and a
search scores them with BM25's formula (the collection's k1, b; document frequencies over live
rows). Queries are analysed exactly as for BM25, so both indexes share one vocabulary.
"""
from __future__ import annotations

import numpy as np

from .analysis import analyze
from .documents import Document
from .lexical import BM25Retriever, SparseRows
from .settings import CollectionSettings
from .term_weights import term_weight_model

IMPACT_SCALE = 100  # DeepCT: tf = round(weight * 100)


class ImpactRetriever(BM25Retriever):
    name = "impact"
    prefix = "impact"

    def __init__(self, settings: CollectionSettings):
        super().__init__(settings)
        self.model = term_weight_model(settings.term_weights)  # a missing artifact fails here, clearly

    def encode_documents(self, docs: list[Document]) -> SparseRows:
        weights = self.model.weights([doc.content for doc in docs])
        rows = [{t: float(q) for t, w in row.items() if (q := round(w * IMPACT_SCALE)) > 0} for row in weights]
        return SparseRows.from_counters(rows, [len(analyze(doc.content)) for doc in docs])

    def _query_columns(self, part, query):
        selected = super()._query_columns(part, query)
        if selected is not None:
            coo = selected[0]
            coo.data = coo.data.astype(np.float32) / IMPACT_SCALE  # back to term-frequency units for BM25
        return selected

    def stats(self, parts, live_rows: int) -> dict:
        return {**super().stats(parts, live_rows), "impact_scale": IMPACT_SCALE,
                "term_weights": self.settings.term_weights or "shipped"}
