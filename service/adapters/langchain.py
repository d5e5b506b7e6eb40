"""A LangChain retriever over a Sieve collection (`pip install "sieve[langchain]"`)."""
from __future__ import annotations

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from sieve.service.client import SieveClient, search_options, struct_dict


class SieveRetriever(BaseRetriever):
    """Each hit becomes a Document: its text as page_content, its metadata plus `title` and `score`.

    Empty `retrievers`, empty `fusion` and `rerank=None` keep the collection's defaults; `filter` admits
    only the documents whose metadata it matches (the plain form of the proto's Filter).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: SieveClient
    collection: str
    k: int = 10
    retrievers: list[str] = []
    fusion: str = ""
    rerank: bool | None = None
    filter: dict | None = None  # {"must": [{"field": "source", "match": "almanac"}]}, on filterable fields
    timeout: float = 30

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        response = self.client.search(self.collection, query, k=self.k, timeout=self.timeout,
                                      **search_options(self.retrievers, self.fusion, self.rerank, self.filter))
        return [Document(id=hit.id, page_content=hit.text,
                         metadata={**struct_dict(hit.metadata), "title": hit.title, "score": hit.score})
                for hit in response.results]
