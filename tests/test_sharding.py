"""Sharded collections: three real shard servers behind a real router, against one node with the same
documents; a shard killed for real."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from conftest import corpus, dataset
from sieve.index.beir import load_beir
from sieve.index.documents import Document
from sieve.index.lexical import CorpusStatistics
from sieve.service.client import SieveClient
from sieve.service.process import ServerProcess
from sieve.service.router import shard_addresses, shard_of

SETTINGS = {"indexes": ["dense", "bm25", "impact", "multivector"], "retrievers": ["dense", "bm25"],
            "compression": "none", "quality_estimator": "none", "filterable": {"year": "integer"}}


def test_shard_addresses_and_owners():
    assert shard_addresses("a:1, b:2") == ["a:1", "b:2"]
    assert shard_addresses("sieve-shard-{0..2}.sieve-shards:50051") == [
        "sieve-shard-0.sieve-shards:50051", "sieve-shard-1.sieve-shards:50051", "sieve-shard-2.sieve-shards:50051"]
    with pytest.raises(ValueError, match="twice"):
        shard_addresses("a:1,a:1")
    owners = [shard_of(f"doc-{n}", 3) for n in range(3000)]
    assert owners == [shard_of(f"doc-{n}", 3) for n in range(3000)]  # stable
    assert all(900 < owners.count(s) < 1100 for s in range(3))  # and even
    total = CorpusStatistics.total([CorpusStatistics(2, 10.0, {"a": 1.0}), CorpusStatistics(3, 5.0, {"a": 2.0,
                                                                                                      "b": 1.0})])
    assert total == CorpusStatistics(5, 15.0, {"a": 3.0, "b": 1.0})


def test_with_no_shard_answering_even_a_partial_search_is_unavailable():
    import asyncio

    from sieve.index.errors import Unavailable
    from sieve.service.config import ServerConfig
    from sieve.service.engine import SearchQuery
    from sieve.service.process import free_port
    from sieve.service.router import Router

    async def scenario():
        router = Router(ServerConfig(shards=f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}",
                                     shard_timeout_seconds=2))
        await router.open()
        try:
            with pytest.raises(Unavailable, match="shard 0 .*; shard 1 "):
                await router.search(SearchQuery("c", "anything", allow_partial=True))
        finally:
            await router.close()

    asyncio.run(scenario())


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if condition():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.25)
    raise AssertionError("condition not met in time")


def start_all(processes: list[ServerProcess]) -> None:
    errors = []

    def start(process):
        try:
            process.start()
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=start, args=(p,)) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    shards = [ServerProcess(root / f"shard-{n}" / "data") for n in range(3)]
    single = ServerProcess(root / "single" / "data")
    start_all([*shards, single])
    router = ServerProcess(root / "router" / "data", {"SIEVE_SHARDS": ",".join(s.target for s in shards)}).start()
    docs = [Document(d.id, d.text, d.title, {"year": 1960 + n % 10}) for n, d in enumerate(corpus("adi"))]
    with SieveClient(router.target) as routed, SieveClient(single.target) as alone:
        for client in (routed, alone):
            client.create_collection("adi", SETTINGS)
            client.upsert("adi", [docs[:50], docs[50:]])
        yield {"router": router, "shards": shards, "routed": routed, "alone": alone, "docs": docs}
    for process in (router, *shards, single):
        process.stop()


def same_ranking(ours, theirs) -> None:
    """Equal scores rank by rank (to float32 rounding); equal ids but for the order among equal scores
    (and which of them the cut at k keeps)."""
    assert len(ours) == len(theirs)
    assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], rel=1e-5, abs=1e-6)
    last = ours[-1].score if ours else None
    for a, b in ((ours, theirs), (theirs, ours)):
        above = {h.id for h in a if h.score != pytest.approx(last, rel=1e-5, abs=1e-6)}
        assert above <= {h.id for h in b}


def test_a_sharded_collection_ranks_as_one_node(cluster):
    _, queries, _ = load_beir(dataset("adi"), "test")
    routed, alone = cluster["routed"], cluster["alone"]
    for text in list(queries.values())[:20]:
        for retrievers in (["bm25"], ["impact"], ["dense"], ["multivector"], [], ["bm25", "impact", "multivector"]):
            ours = routed.search("adi", text, k=10, retrievers=retrievers)
            theirs = alone.search("adi", text, k=10, retrievers=retrievers)
            same_ranking(ours.results, theirs.results)
            assert sorted(ours.shard_generations) == ["0", "1", "2"] and not ours.partial
    filtered = {"must": [{"field": "year", "range": {"gte": 1967}}]}
    ours = routed.search("adi", "computer indexing", k=30, filter=filtered)
    same_ranking(ours.results, alone.search("adi", "computer indexing", k=30, filter=filtered).results)
    assert all(r.metadata["year"] >= 1967 for r in ours.results) and ours.results[0].text


def test_the_sync_engine_routes_in_process(cluster):
    from sieve.service.engine import SearchQuery
    from sieve.service.sync_engine import SyncEngine

    text = cluster["docs"][9].title
    with SyncEngine(shards=",".join(s.target for s in cluster["shards"])) as engine:
        found = engine.search(SearchQuery("adi", text, k=5, retrievers=("bm25",)))
    over_grpc = cluster["routed"].search("adi", text, k=5, retrievers=["bm25"])
    assert [(h.id, round(h.score, 5)) for h in found.hits] == [(r.id, round(r.score, 5)) for r in over_grpc.results]
    assert sorted(found.shard_generations) == ["0", "1", "2"]


def test_writes_go_to_the_owning_shard_and_reads_follow(cluster):
    routed, docs = cluster["routed"], cluster["docs"]
    info = routed.describe("adi")
    shards = info.stats.details["shards"]
    assert info.stats.documents == len(docs) and sorted(shards) == ["0", "1", "2"]
    assert all(shard["documents"] > 10 for shard in shards.values())
    assert sum(shard["documents"] for shard in shards.values()) == len(docs)
    with SieveClient(cluster["shards"][shard_of(docs[7].id, 3)].target) as owner:
        assert [d.id for d in owner.get("adi", [docs[7].id]).documents] == [docs[7].id]
    got = routed.get("adi", [docs[3].id, "nope", docs[60].id])
    assert [d.id for d in got.documents] == [docs[3].id, docs[60].id] and list(got.not_found) == ["nope"]
    deleted = routed.delete("adi", [docs[0].id, docs[1].id, "nope"])
    assert deleted.deleted == 2 and list(deleted.not_found) == ["nope"]
    cluster["alone"].delete("adi", [docs[0].id, docs[1].id])
    assert routed.describe("adi").stats.documents == len(docs) - 2
    assert docs[0].id not in {r.id for r in routed.search("adi", docs[0].title, k=5).results}
    for client in (routed, cluster["alone"]):  # back again, to the same shard
        client.upsert("adi", [[docs[0]]])
    same_ranking(routed.search("adi", docs[0].title, k=5).results,
                 cluster["alone"].search("adi", docs[0].title, k=5).results)
    assert routed.describe("adi").stats.documents == len(docs) - 1
    with pytest.raises(grpc.RpcError) as caught:
        routed.search("adi", "q", retrievers=["colbert"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no 'colbert' index" in caught.value.details()


def test_a_shard_down_is_named_and_partial_results_are_marked(cluster):
    routed, shards, docs = cluster["routed"], cluster["shards"], cluster["docs"]
    down = shards[2]
    down.kill()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            routed.search("adi", "computer indexing", k=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "shard 2" in caught.value.details()
        partial = routed.search("adi", "computer indexing", k=10, allow_partial=True)
        assert partial.partial and "shard 2" in partial.missing_shards[0]
        assert sorted(partial.shard_generations) == ["0", "1"]
        assert partial.results and all(shard_of(r.id, 3) != 2 for r in partial.results)
        batch = [Document(f"new-{n}", f"a new passage on indexing number {n}") for n in range(12)]
        with pytest.raises(grpc.RpcError) as caught:
            routed.upsert("adi", [batch])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shard 2" in caught.value.details() and "sending the batch again is safe" in caught.value.details()
        elsewhere = [d.id for d in batch if shard_of(d.id, 3) != 2]
        assert [d.id for d in routed.get("adi", elsewhere).documents] == elsewhere  # the others committed
    finally:
        restarted = ServerProcess(down.data, port=down.port).start()
        shards[2] = restarted
    wait_for(lambda: routed.describe("adi").stats.details["shards"]["2"]["state"] == "ok")
    assert routed.upsert("adi", [batch])[0].upserted == len(batch)  # sent again: nothing duplicated
    assert routed.describe("adi").stats.documents == len(docs) - 1 + len(batch)


def test_a_shard_killed_during_ingestion_loses_nothing_acknowledged(cluster):
    """The router acknowledges a batch once every shard committed its part: what was acknowledged
    before a shard died is all there after it restarts."""
    routed, shards = cluster["routed"], cluster["shards"]
    batches = [[Document(f"stream-{b}-{n}", f"streamed passage {n} of batch {b} about libraries")
                for n in range(9)] for b in range(8)]
    acknowledged = []
    victim = shards[1]
    try:
        with pytest.raises(grpc.RpcError) as caught:
            for response in routed.upsert_stream("adi", iter(batches)):
                acknowledged.append(response)
                if len(acknowledged) == 2:
                    victim.kill()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "shard 1" in caught.value.details()
    finally:
        shards[1] = ServerProcess(victim.data, port=victim.port).start()
    assert len(acknowledged) >= 2
    wait_for(lambda: routed.describe("adi").stats.details["shards"]["1"]["state"] == "ok")
    ids = [doc.id for batch in batches[:len(acknowledged)] for doc in batch]
    assert [d.id for d in routed.get("adi", ids).documents] == ids
