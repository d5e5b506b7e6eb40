"""Index name -> retriever class. Imports are lazy so that a collection loads only what it uses."""
from __future__ import annotations

import importlib

from .retriever import Retriever
from .settings import CollectionSettings

RETRIEVERS = {
    "dense": ("dense", "DenseRetriever"),
    "bm25": ("lexical", "BM25Retriever"),
    "impact": ("impact", "ImpactRetriever"),
    "multivector": ("multivector", "MultiVectorRetriever"),
}


def retriever_class(name: str) -> type[Retriever]:
    module, cls = RETRIEVERS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def make_retrievers(settings: CollectionSettings) -> dict[str, Retriever]:
    return {name: retriever_class(name)(settings) for name in settings.indexes}
