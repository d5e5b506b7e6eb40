"""A LlamaIndex retriever over a Sieve collection (`pip install "sieve[llamaindex]"`)."""
from __future__ import annotations

from typing import Sequence

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from sieve.service.client import SieveClient, search_options, struct_dict


class SieveRetriever(BaseRetriever):
    """Each hit becomes a NodeWithScore: a TextNode with the hit's id, text and metadata plus `title`.

    Empty `retrievers`, empty `fusion` and `rerank=None` keep the collection's defaults; `filter` admits
    only the documents whose metadata it matches (the plain form of the proto's Filter).
    """

    def __init__(self, client: SieveClient, collection: str, k: int = 10, retrievers: Sequence[str] = (),
                 fusion: str = "", rerank: bool | None = None, filter: dict | None = None, timeout: float = 30,
                 **kwargs):
        super().__init__(**kwargs)
        self.client, self.collection, self.k, self.timeout = client, collection, k, timeout
        self.options = search_options(retrievers, fusion, rerank, filter)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        response = self.client.search(self.collection, query_bundle.query_str, k=self.k, timeout=self.timeout,
                                      **self.options)
        return [NodeWithScore(node=TextNode(id_=hit.id, text=hit.text,
                                            metadata={**struct_dict(hit.metadata), "title": hit.title}),
                              score=hit.score)
                for hit in response.results]
