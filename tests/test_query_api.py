"""The query API RAG apps need: metadata filters inside every retriever, get by id, batch search,
delete by filter, snapshots. In-process on a real collection, then through a real server."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sieve.index.collection import Collection
from sieve.index.documents import Document
from sieve.index.errors import InvalidArgument
from sieve.index.settings import CollectionSettings

from conftest import corpus

FILTERABLE = {"tenant": "keyword", "year": "integer", "published": "datetime", "tags": "keyword", "public": "bool"}


def with_metadata(doc: Document, n: int) -> Document:
    metadata = {"tenant": ["acme", "globex", "initech"][n % 3], "year": 1960 + n % 20,
                "published": f"19{60 + n % 20}-0{1 + n % 9}-15T12:00:00Z", "public": n % 2 == 0}
    if n % 4 == 0:
        metadata["tags"] = ["indexing", "survey"] if n % 8 == 0 else ["indexing"]
    return replace(doc, metadata=metadata)


@pytest.fixture(scope="module")
def docs():
    return [with_metadata(d, n) for n, d in enumerate(corpus("adi"))]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, docs):
    settings = CollectionSettings(indexes=("dense", "bm25", "multivector"), filterable=FILTERABLE)
    collection = Collection.create(tmp_path_factory.mktemp("q") / "c", settings)
    collection.upsert(docs[:40])
    collection.upsert(docs[40:])  # two segments: filters hold across them
    return collection


def search(collection, text, k=10, names=("dense", "bm25", "multivector"), filter=None):
    queries = {n: collection.encode_queries(n, [text])[0] for n in names}
    return collection.search(queries, k, filter=collection.filter(filter) if filter else None).hits


def matching(docs, test):
    return {d.id for d in docs if test(d.metadata)}


CASES = {
    "keyword": ({"must": [{"field": "tenant", "match": "acme"}]}, lambda m: m["tenant"] == "acme"),
    "any of": ({"must": [{"field": "tenant", "any": ["acme", "initech"]}]}, lambda m: m["tenant"] != "globex"),
    "range": ({"must": [{"field": "year", "range": {"gte": 1965, "lt": 1970}}]}, lambda m: 1965 <= m["year"] < 1970),
    "time range": ({"must": [{"field": "published", "range": {"gt": "1975-01-01T00:00:00Z"}}]},
                   lambda m: m["year"] >= 1975),
    "list field": ({"must": [{"field": "tags", "match": "survey"}]}, lambda m: "survey" in m.get("tags", [])),
    "exists": ({"must": [{"field": "tags", "exists": False}]}, lambda m: "tags" not in m),
    "bool, must_not": ({"must": [{"field": "public", "match": True}],
                        "must_not": [{"field": "tenant", "match": "acme"}]},
                       lambda m: m["public"] and m["tenant"] != "acme"),
    "should, nested": ({"should": [{"field": "year", "range": {"lte": 1961}},
                                   {"must": [{"field": "tenant", "match": "globex"}, {"field": "public", "match": True}]}]},
                       lambda m: m["year"] <= 1961 or (m["tenant"] == "globex" and m["public"])),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("names", [("dense",), ("bm25",), ("multivector",), ("dense", "bm25", "multivector")])
def test_filters_apply_inside_every_retriever(collection, docs, case, names):
    spec, test = CASES[case]
    allowed = matching(docs, test)
    hits = search(collection, "computer indexing of scientific documents", k=10, names=names, filter=spec)
    assert {h.id for h in hits} <= allowed
    if names != ("bm25",):  # BM25 returns only documents with a query term; the others min(k, matching)
        assert len(hits) == min(10, len(allowed))


def test_a_very_selective_filter_still_returns_every_match(collection, docs):
    spec = {"must": [{"ids": [docs[5].id, docs[70].id]}]}
    for names in (("dense",), ("multivector",)):
        assert {h.id for h in search(collection, "anything at all", names=names, filter=spec)} == {docs[5].id, docs[70].id}


def test_filtered_bm25_scores_keep_the_collections_statistics(collection, docs):
    plain = {h.id: h.score for h in search(collection, "information retrieval", k=82, names=("bm25",))}
    spec, test = CASES["keyword"]
    filtered = search(collection, "information retrieval", k=82, names=("bm25",), filter=spec)
    assert filtered and all(abs(h.score - plain[h.id]) < 1e-6 for h in filtered)
    assert [h.id for h in filtered] == [i for i in plain if i in matching(docs, test)]


@pytest.mark.parametrize("spec, words", [
    ({"must": [{"field": "author", "match": "x"}]}, "not filterable"),
    ({"must": [{"field": "year", "match": "nineteen"}]}, "finite number"),
    ({"must": [{"field": "tenant", "range": {"gt": 1}}]}, "no order"),
    ({"must": [{"field": "published", "range": {"gt": "yesterday"}}]}, "RFC 3339"),
    ({"must": [{"field": "year", "near": 3}]}, "one of match, any, range, exists"),
    ({"maybe": []}, "unknown key"),
])
def test_bad_filters_are_invalid_argument(collection, spec, words):
    with pytest.raises(InvalidArgument, match=words):
        search(collection, "q", filter=spec)


def test_metadata_of_the_wrong_type_for_a_filterable_field_is_refused(collection):
    with pytest.raises(InvalidArgument, match="'year'"):
        collection.upsert([Document("bad", "text", metadata={"year": "1999"})])


def test_compaction_keeps_the_filter_columns(tmp_path, docs):
    collection = Collection.create(tmp_path / "c", CollectionSettings(indexes=("bm25",), filterable=FILTERABLE))
    collection.upsert(docs[:30])
    collection.upsert(docs[30:60])
    collection.delete([docs[0].id])
    spec, test = CASES["range"]
    before = [h.id for h in search(collection, "computer systems", k=50, names=("bm25",), filter=spec)]
    collection.compact()
    assert collection.stats()["segments"] == 1
    assert [h.id for h in search(collection, "computer systems", k=50, names=("bm25",), filter=spec)] == before


def test_delete_by_filter_get_by_id_and_snapshots(tmp_path, docs):
    collection = Collection.create(tmp_path / "c", CollectionSettings(indexes=("bm25",), filterable=FILTERABLE))
    collection.upsert(docs)
    generation = collection.copy_to(tmp_path / "backup")  # before the delete
    deleted, _ = collection.delete_matching(collection.filter({"must": [{"field": "tenant", "match": "globex"}]}))
    assert deleted == len(matching(docs, lambda m: m["tenant"] == "globex"))
    found, missing, _ = collection.get_many([docs[0].id, docs[1].id, "nope"])
    assert [d.id for d in found] == [docs[0].id] and missing == [docs[1].id, "nope"]  # docs[1] was globex
    assert found[0].metadata == docs[0].metadata
    backup = Collection.open(tmp_path / "backup")
    assert backup.snapshot.generation == generation and len(backup.snapshot.id_map) == len(docs)
    assert backup.health.state == "ok"
    backup.close()
    from sieve.index.catalog import Catalog
    from sieve.index.errors import CorruptIndex

    catalog = Catalog(tmp_path / "data")
    assert len(catalog.restore(tmp_path / "backup", "restored").snapshot.id_map) == len(docs)
    damaged = next((tmp_path / "backup" / "segments").iterdir()) / "docs.jsonl"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 1
    damaged.unlink()  # a new file: the hard-linked original stays intact
    damaged.write_bytes(bytes(data))
    with pytest.raises(CorruptIndex, match="docs.jsonl"):
        catalog.restore(tmp_path / "backup", "again")
    assert "again" not in catalog.names() and not (tmp_path / "data" / "again").exists()


@pytest.mark.parametrize("case", CASES)
def test_filters_survive_the_trip_through_protobuf(case):
    from sieve.service.client import filter_message, filter_spec

    spec = CASES[case][0]
    assert filter_spec(filter_message(spec)) == spec
    with_ids = {"must": [{"ids": ["a", "b"]}, spec]}
    assert filter_spec(filter_message(with_ids)) == with_ids


# Through a real server --------------------------------------------------------------------------
def test_query_api_over_grpc(server, client, docs):
    import grpc
    from google.protobuf.struct_pb2 import Value

    from sieve.v1 import sieve_pb2 as pb

    client.create_collection("rag", {"indexes": ["dense", "bm25"], "filterable": FILTERABLE})
    client.upsert("rag", [docs])
    acme = pb.Filter(must=[pb.Condition(field="tenant", match=Value(string_value="acme"))])
    acme.must.add(field="year").range.gte.number_value = 1970
    allowed = matching(docs, lambda m: m["tenant"] == "acme" and m["year"] >= 1970)
    response = client.search("rag", "computer indexing", k=10, filter=acme)
    assert {r.id for r in response.results} <= allowed and len(response.results) == min(10, len(allowed))
    assert all(r.metadata["tenant"] == "acme" for r in response.results)

    batch = client.search_stub.SearchBatch(pb.SearchBatchRequest(searches=[
        pb.SearchRequest(collection="rag", query="computer indexing", k=3),
        pb.SearchRequest(collection="rag", query="library automation", k=5, filter=acme)]))
    assert [len(r.results) for r in batch.results] == [3, 5]
    assert batch.results[0].results[0].id == client.search("rag", "computer indexing", k=3).results[0].id

    got = client.get("rag", [docs[3].id, "missing"])
    assert [d.id for d in got.documents] == [docs[3].id] and list(got.not_found) == ["missing"]
    assert got.documents[0].text == docs[3].text

    plain = client.search("rag", "computer indexing", k=10, filter={
        "must": [{"field": "tenant", "match": "acme"}, {"field": "year", "range": {"gte": 1970}}]})
    assert [r.id for r in plain.results] == [r.id for r in response.results]
    import json
    import subprocess
    import sys

    cli = subprocess.run([sys.executable, "-m", "sieve.service.cli", "search", "--server", server.target,
                          "--collection", "rag", "--json", "--filter",
                          json.dumps({"must": [{"field": "tenant", "match": "acme"}]}), "computer indexing"],
                         capture_output=True, text=True, timeout=120)
    found = [r["id"] for r in json.loads(cli.stdout)["results"]]
    assert found and set(found) <= matching(docs, lambda m: m["tenant"] == "acme")
    snapshot = client.snapshot("rag")
    assert snapshot.path.startswith(".snapshots/rag-") and snapshot.bytes > 0
    restored = client.restore(snapshot.path, "rag-restored")
    assert restored.stats.documents == len(docs) and restored.health.state == "ok"
    for path, name, code in [(snapshot.path, "rag", grpc.StatusCode.ALREADY_EXISTS),
                             ("../../etc", "x", grpc.StatusCode.INVALID_ARGUMENT),
                             (".snapshots/nothing-here", "x", grpc.StatusCode.NOT_FOUND)]:
        with pytest.raises(grpc.RpcError) as caught:
            client.restore(path, name)
        assert caught.value.code() == code

    ids_only = pb.Filter(must=[pb.Condition(ids=pb.IdSet(ids=[docs[0].id, docs[1].id]))])
    assert client.ingest_stub.DeleteByFilter(pb.DeleteByFilterRequest(collection="rag", filter=ids_only)).deleted == 2
    assert client.delete_by_filter("rag", {"must": [{"field": "tenant", "match": "initech"}]}).deleted == \
        len(matching(docs[2:], lambda m: m["tenant"] == "initech"))
    for bad, words in [(pb.DeleteByFilterRequest(collection="rag"), "empty filter"),
                       (pb.DeleteByFilterRequest(collection="rag", filter=pb.Filter(
                           must=[pb.Condition(field="author", match=Value(string_value="x"))])), "not filterable")]:
        with pytest.raises(grpc.RpcError) as caught:
            client.ingest_stub.DeleteByFilter(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        client.search_stub.SearchBatch(pb.SearchBatchRequest(searches=[
            pb.SearchRequest(collection="rag", query="fine"), pb.SearchRequest(collection="rag", query=" ")]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "search 1 of the batch" in caught.value.details()


def test_filtered_hnsw_search_is_exact_when_the_filter_is_selective(tmp_path, docs):
    collection = Collection.create(tmp_path / "c", CollectionSettings(indexes=("dense",), exact_search_max=0,
                                                                      filterable=FILTERABLE))
    collection.upsert(docs)
    assert collection.stats()["details"]["dense"]["hnsw_segments"] == 1
    query = collection.encode_queries("dense", ["computer indexing"])[0]
    vectors = collection.snapshot.segments[0].parts["dense"].vectors
    for spec, test in (({"must": [{"ids": [d.id for d in docs[:6]]}]}, lambda d: d.id in {x.id for x in docs[:6]}),
                       CASES["keyword"]):
        allowed = [i for i, d in enumerate(docs) if (test(d) if spec.get("must", [{}])[0].get("ids") else test(d.metadata))]
        hits = collection.search({"dense": query}, 5, filter=collection.filter(spec)).hits
        assert len(hits) == min(5, len(allowed)) and {h.id for h in hits} <= {docs[i].id for i in allowed}
        if len(allowed) <= len(docs) // 10:  # selective: exact
            truth = np.sort(np.asarray(vectors[allowed]) @ query)[::-1][:5]
            np.testing.assert_allclose([h.score for h in hits], truth, rtol=1e-5)
