"""The LangChain and LlamaIndex retrievers against a real server on loopback."""
from __future__ import annotations

import grpc
import pytest

from sieve.index.documents import Document

NOTES = [Document("owl", "Owls hunt small mammals at night.", "Owls", {"source": "field guide", "year": 1968}),
         Document("bee", "Bees make honey from nectar.", "Bees", {"source": "almanac"}),
         Document("oak", "Oaks drop acorns in autumn.", "Oaks", {"source": "almanac"})]


@pytest.fixture(scope="module")
def notes(client):
    client.create_collection("notes", {"indexes": ["dense", "bm25"], "filterable": {"source": "keyword"}})
    client.upsert("notes", [NOTES])
    return "notes"


def test_langchain_retriever_maps_hits_to_documents(client, notes):
    pytest.importorskip("langchain_core", reason="langchain-core is not installed (pip install 'sieve[langchain]')")
    from sieve.service.adapters.langchain import SieveRetriever

    documents = SieveRetriever(client=client, collection=notes, k=2).invoke("owls hunting at night")
    assert len(documents) == 2 and documents[0].id == "owl"
    assert documents[0].page_content == "Owls hunt small mammals at night."
    assert documents[0].metadata["year"] == 1968 and isinstance(documents[0].metadata["year"], int)
    assert documents[0].metadata["source"] == "field guide" and documents[0].metadata["title"] == "Owls"
    assert documents[0].metadata["score"] > documents[1].metadata["score"]
    lexical = SieveRetriever(client=client, collection=notes, k=3, retrievers=["bm25"], rerank=False)
    assert [d.id for d in lexical.invoke("acorns")] == ["oak"]  # BM25 alone: only the matching document
    almanac = SieveRetriever(client=client, collection=notes, filter={"must": [{"field": "source", "match": "almanac"}]})
    assert {d.id for d in almanac.invoke("owls hunting at night")} == {"bee", "oak"}
    with pytest.raises(grpc.RpcError, match="fusion"):
        SieveRetriever(client=client, collection=notes, fusion="average").invoke("owls")


def test_llamaindex_retriever_maps_hits_to_nodes(client, notes):
    pytest.importorskip("llama_index.core", reason="llama-index-core is not installed (pip install 'sieve[llamaindex]')")
    from sieve.service.adapters.llamaindex import SieveRetriever

    nodes = SieveRetriever(client, notes, k=2, fusion="rrf").retrieve("honey from nectar")
    assert len(nodes) == 2 and nodes[0].node.node_id == "bee" and nodes[0].score > nodes[1].score
    assert nodes[0].node.get_content() == "Bees make honey from nectar."
    assert nodes[0].node.metadata == {"source": "almanac", "title": "Bees"}
    assert [n.node.node_id for n in SieveRetriever(client, notes, retrievers=["bm25"]).retrieve("acorns")] == ["oak"]
    not_almanac = SieveRetriever(client, notes, filter={"must_not": [{"field": "source", "match": "almanac"}]})
    assert [n.node.node_id for n in not_almanac.retrieve("honey from nectar")] == ["owl"]
    with pytest.raises(grpc.RpcError, match="multivector"):
        SieveRetriever(client, notes, retrievers=["multivector"]).retrieve("owls")
