"""The gRPC service end to end: a real server process, the packaged model, real ADI documents."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sieve.index.documents import Document
from sieve.service.client import SieveClient
from sieve.v1 import sieve_pb2 as pb

from conftest import ServerProcess, corpus


def ingest(client, name, docs, batch=32):
    return (client.upsert(name, [docs[i:i + batch] for i in range(0, len(docs), batch)]))


@pytest.fixture(scope="module")
def adi(client):
    docs = corpus("adi")
    client.create_collection("adi", {"indexes": ["dense", "bm25"]})
    acks = ingest(client, "adi", docs)
    assert sum(a.upserted for a in acks) == len(docs) == 82
    return docs


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_search_returns_ids_scores_text_and_metadata(client, adi):
    target = adi[10]
    client.upsert("adi", [[Document(target.id, target.text, target.title, {"source": "adi", "year": 1968})]])
    response = client.search("adi", target.title, k=5)
    assert len(response.results) == 5
    top = response.results[0]
    assert top.id == target.id and top.text == target.text and top.title == target.title
    assert dict(top.metadata) == {"source": "adi", "year": 1968}
    assert [r.score for r in response.results] == sorted((r.score for r in response.results), reverse=True)
    assert {"encode", "dense", "bm25", "fusion"} <= set(response.timings_ms)
    for retriever in ("dense", "bm25"):
        single = client.search("adi", target.title, k=3, retrievers=[retriever])
        assert single.results[0].id == target.id
    assert not client.search("adi", target.title, k=1, omit_text=True).results[0].text


def test_upsert_replaces_and_delete_removes_without_shifting_ids(client, adi):
    client.create_collection("mutations")
    ingest(client, "mutations", adi[:40])
    neighbour = adi[5]
    before = client.search("mutations", neighbour.title, k=1).results[0]
    assert before.id == neighbour.id

    client.upsert("mutations", [[Document(adi[3].id, "zebra giraffe savanna migration patterns")]])
    hits = client.search("mutations", "zebra giraffe savanna", k=40).results
    assert [h.id for h in hits].count(adi[3].id) == 1
    assert hits[0].id == adi[3].id and hits[0].text.startswith("zebra")
    old_words = client.search("mutations", adi[3].title, k=40, retrievers=["bm25"]).results
    assert all(h.text == "zebra giraffe savanna migration patterns" for h in old_words if h.id == adi[3].id)

    response = client.delete("mutations", [adi[3].id, adi[7].id, "never-existed"])
    assert response.deleted == 2 and list(response.not_found) == ["never-existed"]
    for query in ("zebra giraffe savanna", adi[7].title):
        assert {adi[3].id, adi[7].id}.isdisjoint(h.id for h in client.search("mutations", query, k=40).results)
    after = client.search("mutations", neighbour.title, k=1).results[0]
    assert (after.id, after.text) == (before.id, before.text)
    info = client.describe("mutations")
    assert info.stats.documents == 38 and info.stats.deleted == 3  # two deletes, one replacement


def test_compaction_reclaims_space_and_keeps_results(client, adi):
    client.create_collection("compact-me")
    ingest(client, "compact-me", adi, batch=10)
    client.delete("compact-me", [d.id for d in adi[:20]])
    before = client.describe("compact-me").stats
    assert before.segments == 9 and before.deleted == 20
    expected = [h.id for h in client.search("compact-me", adi[50].title, k=10).results]
    after = client.compact("compact-me").stats
    assert after.segments == 1 and after.deleted == 0 and after.documents == 62
    assert after.bytes_on_disk < before.bytes_on_disk
    assert [h.id for h in client.search("compact-me", adi[50].title, k=10).results] == expected


def test_collections_are_managed(client, adi):
    client.create_collection("tmp-a", {"indexes": ["bm25"], "bm25_k1": 1.2})
    names = [c.name for c in client.list_collections().collections]
    assert {"adi", "tmp-a"} <= set(names)
    info = client.describe("tmp-a")
    assert info.settings["bm25_k1"] == 1.2 and list(info.settings["indexes"]) == ["bm25"]
    assert info.stats.documents == 0
    described = client.describe("adi")
    assert described.stats.documents == 82 and described.stats.bytes_on_disk > 0
    assert described.stats.details["dense"]["vectors"] == 82
    assert status_of(lambda: client.create_collection("tmp-a"))[0] == grpc.StatusCode.ALREADY_EXISTS
    client.drop("tmp-a")
    assert "tmp-a" not in [c.name for c in client.list_collections().collections]
    assert status_of(lambda: client.describe("tmp-a"))[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("settings, words", [
    ({"pool_factor": 0}, "pool_factor"),
    ({"prune_ratio": 1.5, "quality_estimator": "unique_terms"}, "prune_ratio"),
    ({"quality_estimator": "crystal-ball"}, "quality estimator"),
    ({"indexes": ["dense", "telepathy"]}, "telepathy"),
    ({"pool_facter": 2}, "unknown setting"),
    ({"k1": "x"}, "unknown setting"),
    ({"bm25_k1": "high"}, "expected a finite number"),
])
def test_bad_settings_are_refused_at_creation(client, settings, words):
    code, details = status_of(lambda: client.create_collection("bad", settings))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details
    assert "bad" not in [c.name for c in client.list_collections().collections]


def test_bad_input_gets_precise_statuses(client, adi):
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: client.search("adi", "")) == (invalid, "the query is empty")
    assert status_of(lambda: client.search("adi", " \t\n"))[0] == invalid
    assert "k must be within 1..1000" in status_of(lambda: client.search("adi", "index", k=0))[1]
    assert status_of(lambda: client.search("adi", "index", k=-3))[0] == invalid
    assert status_of(lambda: client.search("adi", "index", k=1001))[0] == invalid
    assert status_of(lambda: client.search("adi", "x" * 5000))[0] == invalid
    assert status_of(lambda: client.search("nowhere", "index"))[0] == grpc.StatusCode.NOT_FOUND
    assert "no 'multivector' index" in status_of(lambda: client.search("adi", "x", retrievers=["multivector"]))[1]
    assert status_of(lambda: client.search("adi", "index", fusion="average"))[0] == invalid
    assert status_of(lambda: client.delete("nowhere", ["1"]))[0] == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: client.delete("adi", []))[0] == invalid


def test_rejected_batches_leave_no_trace(client, adi):
    client.create_collection("atomic")
    ingest(client, "atomic", adi[:10])
    generation = client.describe("atomic").stats.generation
    twice = [Document("new-1", "alpha"), Document("new-2", "beta"), Document("new-1", "gamma")]
    code, details = status_of(lambda: (client.upsert("atomic", [twice])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'new-1' appears twice" in details
    for bad in ([Document("", "no id")], [Document("ok", "")], [Document("x" * 600, "long id")]):
        assert status_of(lambda: (client.upsert("atomic", [bad])))[0] == grpc.StatusCode.INVALID_ARGUMENT
    stats = client.describe("atomic").stats
    assert stats.documents == 10 and stats.generation == generation
    # A stream stops at its first bad batch; the batches acknowledged before it stay.
    acks = []
    with pytest.raises(grpc.RpcError):
        for ack in client.upsert_stream("atomic", [[Document("good-1", "first batch")], twice]):
            acks.append(ack)
    assert len(acks) == 1 and client.describe("atomic").stats.documents == 11


def test_invalid_utf8_is_invalid_argument(server):
    # Hand-made bytes: field 2 (query) holds 0xff, which is not UTF-8.
    payload = pb.SearchRequest(collection="adi").SerializeToString() + b"\x12\x02\xff\xfe"
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/sieve.v1.SearchService/Search", request_serializer=lambda b: b,
                                   response_deserializer=pb.SearchResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in caught.value.details()


def test_deadline_is_honoured(client, adi):
    code, _ = status_of(lambda: client.search("adi", "automatic indexing", timeout=0.0005))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.search("adi", "automatic indexing", timeout=30).results  # the server is fine


def test_concurrent_clients_get_their_own_answers(server, adi):
    def search(doc):
        with SieveClient(server.target) as own:
            return doc.id, [h.id for h in own.search("adi", doc.title, k=3, retrievers=["dense"]).results]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(search, adi[:48]))
    hits = sum(doc_id in top for doc_id, top in answers)
    assert hits >= 45  # each title finds its own document (ADI titles are near-unique)


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "sieve.v1.SearchService", "sieve.v1.IngestService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"sieve.v1.SearchService", "sieve.v1.IngestService", "sieve.v1.CollectionService",
            "grpc.health.v1.Health"} <= names


def test_oversized_messages_are_resource_exhausted(tmp_path):
    small = ServerProcess(tmp_path / "data", env={"SIEVE_MAX_MESSAGE_BYTES": "20000"}).start()
    try:
        with SieveClient(small.target) as client:
            client.create_collection("c")
            big = [[Document("big", "word " * 10000)]]
            code, _ = status_of(lambda: (client.upsert("c", big)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert client.describe("c").stats.documents == 0
    finally:
        small.stop()


def test_restart_keeps_every_acknowledged_document(tmp_path):
    docs = corpus("adi")
    first = ServerProcess(tmp_path / "data").start()
    with SieveClient(first.target) as client:
        client.create_collection("durable")
        acked = sum(a.upserted for a in ingest(client, "durable", docs[:60], batch=20))
        client.delete("durable", [docs[0].id])
        client.upsert("durable", [[Document(docs[1].id, "replaced text about owls")]])
    first.kill()  # SIGKILL: no shutdown hook runs
    second = ServerProcess(tmp_path / "data").start()
    try:
        with SieveClient(second.target) as client:
            stats = client.describe("durable").stats
            assert acked == 60 and stats.documents == 59
            assert client.search("durable", "owls", k=1).results[0].text == "replaced text about owls"
            assert docs[0].id not in {h.id for h in client.search("durable", docs[0].title, k=60).results}
            for doc in docs[2:60:7]:
                assert doc.id in [h.id for h in client.search("durable", doc.title, k=5).results]
    finally:
        second.stop()


def test_cli_ingest_reports_bad_lines_and_searches(server, tmp_path):
    lines = [json.dumps({"_id": "a", "title": "Owls", "text": "Owls hunt at night.", "metadata": {"k": 1}}),
             "{not json",
             json.dumps({"_id": "b", "text": "Bees make honey."}),
             json.dumps({"title": "no id"}),
             json.dumps({"_id": "a", "text": "Owls sleep by day; this later line wins."})]
    path = tmp_path / "docs.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n" + b'{"_id": "c", "text": "\xff"}\n')
    run = subprocess.run([sys.executable, "-m", "sieve.service.cli", "ingest", str(path), "--collection", "cli",
                          "--server", server.target], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ingested 3 documents" in run.stdout  # a, b, then a again (replacing the first)
    assert f"{path}:2: not valid JSON" in run.stderr
    assert f"{path}:4: document id is missing" in run.stderr
    assert f"{path}:6: not valid UTF-8" in run.stderr
    search = subprocess.run([sys.executable, "-m", "sieve.service.cli", "search", "owls", "--collection", "cli",
                             "--server", server.target, "-k", "2"], capture_output=True, text=True, timeout=120)
    assert search.returncode == 0 and "later line wins" in search.stdout.splitlines()[0]
    missing = subprocess.run([sys.executable, "-m", "sieve.service.cli", "search", "owls", "--collection", "none",
                              "--server", server.target], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
