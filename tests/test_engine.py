"""The engine in process: the pipeline every front calls, its checks and limits, batcher, caches and auth.

Fast tests with real models on a small real collection (ADI), no server: the gRPC end-to-end tests in
test_service.py and the others check that the servicers only translate.
"""
from __future__ import annotations

import asyncio
import json

import pytest

from conftest import corpus
from sieve.index.documents import Document
from sieve.index.errors import InvalidArgument, NotFound, ReadOnly, ResourceExhausted
from sieve.service.auth import ApiKeyInterceptor, load_keys
from sieve.service.batcher import MicroBatcher
from sieve.service.cache import ResultCache
from sieve.service.config import ServerConfig
from sieve.service.engine import Engine, RerankOptions, SearchQuery, SearchResult, rerank_default
from sieve.service.sync_engine import SyncEngine


@pytest.fixture(scope="module")
def adi():
    return corpus("adi")


@pytest.fixture(scope="module")
def engine(tmp_path_factory, adi):
    with SyncEngine(data=str(tmp_path_factory.mktemp("engine") / "data"), max_document_chars=5000) as engine:
        engine.create_collection("adi", {"indexes": ["dense", "bm25"], "quality_estimator": "none",
                                         "filterable": {"year": "integer"}})
        docs = [Document(d.id, d.text, d.title, {"year": 1960 + i % 10}) for i, d in enumerate(adi)]
        assert engine.upsert("adi", docs).upserted == len(adi)
        yield engine


def test_search_fuses_retrievers_and_filters_inside_them(engine, adi):
    result = engine.search(SearchQuery("adi", adi[5].title, k=3))
    assert result.hits[0].id == adi[5].id and len(result.hits) == 3
    assert {"encode", "dense", "bm25", "fusion"} <= set(result.timings_ms) and "rerank" not in result.timings_ms
    assert result.hits[0].document.title == adi[5].title
    only = engine.search(SearchQuery("adi", adi[5].title, k=50,
                                     filter={"must": [{"field": "year", "range": {"gte": 1968}}]}))
    matching = sum(1960 + i % 10 >= 1968 for i in range(len(adi)))
    assert len(only.hits) == matching and all(h.document.metadata["year"] >= 1968 for h in only.hits)
    bm25 = engine.search(SearchQuery("adi", adi[5].title, k=3, retrievers=("bm25",), fusion="weighted"))
    assert set(bm25.timings_ms) == {"encode", "bm25", "fusion"}


def test_every_check_happens_before_any_work(engine):
    bad = {
        "k must be within 1..1000": SearchQuery("adi", "q", k=0),
        "the query is empty": SearchQuery("adi", "  "),
        "unknown fusion 'max'": SearchQuery("adi", "q", fusion="max"),
        "has no 'multivector' index": SearchQuery("adi", "q", retrievers=("multivector",)),
        "not filterable": SearchQuery("adi", "q", filter={"must": [{"field": "tenant", "match": "a"}]}),
        "rerank candidates must be within": SearchQuery("adi", "q", rerank=RerankOptions(enabled=True,
                                                                                        candidates=501)),
        "margin .every checkpoint. or margins": SearchQuery("adi", "q", rerank=RerankOptions(
            enabled=True, margin=1.0, margins={2: 1.0})),
        "must be finite": SearchQuery("adi", "q", rerank=RerankOptions(enabled=True, margin=float("nan"))),
    }
    for words, query in bad.items():
        with pytest.raises(InvalidArgument, match=words):
            engine.search(query)
    with pytest.raises(NotFound, match="no collection named 'nope'"):
        engine.search(SearchQuery("nope", "q"))
    with pytest.raises(InvalidArgument, match="search 1 of the batch: the query is empty"):
        engine.search_batch([SearchQuery("adi", "q"), SearchQuery("adi", "")])


def test_ingestion_validates_once_with_the_size_limit(engine):
    before = engine.describe("adi").stats["generation"]
    with pytest.raises(InvalidArgument, match=r"document 1 \('big'\) is 5001 characters .* the limit is 5000"):
        engine.upsert("adi", [Document("fine", "small"), Document("big", "x" * 5001)])
    with pytest.raises(InvalidArgument, match="appears twice"):
        engine.upsert("adi", [Document("twin", "a"), Document("twin", "b")])
    with pytest.raises(InvalidArgument, match="'year': expected a finite number"):
        engine.upsert("adi", [Document("typed", "text", metadata={"year": "soon"})])
    assert engine.describe("adi").stats["generation"] == before  # nothing half-applied
    found, missing, _ = engine.get("adi", ["fine", "1"])
    assert missing == ["fine"] and found[0].id == "1"


def test_rerank_reorders_supplied_passages_and_mixes_first_stage_scores(engine, adi):
    passages = [d.content for d in adi[:8]]
    ranked = engine.rerank(adi[3].title, passages, k=3)
    assert len(ranked.ranked) == 3 and ranked.ranked[0][0] == 3
    assert ranked.survivors[0] == 8
    with pytest.raises(InvalidArgument, match="passage 1 is empty"):
        engine.rerank("q", ["text", " "])
    with pytest.raises(InvalidArgument, match="2 first-stage scores for 8 passages"):
        engine.rerank("q", passages, first_stage=[0.1, 0.2])


def test_rerank_default_follows_the_collection_and_its_evaluation(engine):
    collection = engine.collection("adi")
    on, why = rerank_default(collection)
    assert not on and "no measured run" in why
    engine.record_evaluation("adi", {"queries": 35, "first_stage_ndcg@10": 0.4, "reranked_ndcg@10": 0.5,
                                     "measured_at": "2026-12-02"})
    on, why = rerank_default(collection)
    assert on and "beat the fused first stage on 35 judged queries" in why
    assert engine.search(SearchQuery("adi", "computer indexing", k=3)).survivors  # reranked by default now
    (collection.directory / "evaluation.json").write_text("{not json")
    on, why = rerank_default(collection)
    assert not on and "evaluation.json cannot be read" in why
    (collection.directory / "evaluation.json").unlink()


def test_training_exit_heads_checks_its_arguments_before_any_work(engine):
    from sieve.index.errors import FailedPrecondition

    with pytest.raises(NotFound):
        engine.train_exit_heads("no-such-collection")
    with pytest.raises(FailedPrecondition, match="reranks with ''"):
        engine.train_exit_heads("adi", reranker="some/other-model")
    with pytest.raises(InvalidArgument, match="pseudo_queries"):
        engine.train_exit_heads("adi", pseudo_queries=3)
    with pytest.raises(InvalidArgument, match="depth"):
        engine.train_exit_heads("adi", depth=10)
    pruning = engine.describe("adi").stats["details"]["rerank"]["pruning"]
    assert pruning == "the Sieve reranker's own heads (deep-supervised)"


def test_writes_are_refused_by_a_read_only_engine(engine):
    with SyncEngine(data=str(engine.config.data), read_only=True) as replica:
        assert replica.search(SearchQuery("adi", "indexing", k=1)).hits
        with pytest.raises(ReadOnly):
            replica.upsert("adi", [Document("new", "text")])
        with pytest.raises(ReadOnly):
            replica.create_collection("other", {})


def test_limits_refuse_work_at_once(tmp_path, adi):
    """Past the queued rerank pairs, or the batches being ingested, a request is refused, never queued
    into its deadline; one request always runs."""
    async def scenario():
        engine = Engine(ServerConfig(data=str(tmp_path / "data"), max_queued_rerank_pairs=30, max_pending_batches=1))
        await engine.open()
        passages = [d.content for d in adi[:20]]
        outcomes = await asyncio.gather(*(engine.rerank("indexing", passages, k=5) for _ in range(3)),
                                        return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, Exception)]
        assert len(refused) == 2 and all(isinstance(o, ResourceExhausted) and "pairs queued" in str(o)
                                         for o in refused)
        assert len((await engine.rerank("indexing", passages, k=5)).ranked) == 5  # drained
        await engine.create_collection("c", {"indexes": ["bm25"], "quality_estimator": "none"})
        batches = [[Document(f"{n}-{d.id}", d.text, d.title) for d in adi[:10]] for n in range(2)]
        outcomes = await asyncio.gather(*(engine.upsert("c", batch) for batch in batches), return_exceptions=True)
        assert isinstance(outcomes[1], ResourceExhausted) and outcomes[0].upserted == 10
        await engine.close()

    asyncio.run(scenario())


def test_batcher_shares_one_call_among_concurrent_items():
    calls = []

    def double(items):
        calls.append(list(items))
        return [2 * item for item in items]

    async def scenario():
        batcher = MicroBatcher(max_batch=8, max_wait_ms=5)
        results = await asyncio.gather(*(batcher.submit("key", double, n) for n in range(5)))
        assert results == [0, 2, 4, 6, 8] and calls == [[0, 1, 2, 3, 4]]

        def fail(items):
            raise ValueError("model broke")

        outcomes = await asyncio.gather(*(batcher.submit("other", fail, n) for n in range(2)), return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)  # every waiter hears of the failure

    asyncio.run(scenario())


def test_result_cache_keys_and_results_round_trip(engine, adi):
    query = SearchQuery("adi", "indexing", k=10, filter={"must": [{"field": "year", "match": 1961}]})
    assert ResultCache.key(query, 3) == ResultCache.key(SearchQuery("adi", "indexing", k=10, filter={
        "must": [{"field": "year", "match": 1961}]}), 3)
    assert ResultCache.key(query, 3) != ResultCache.key(query, 4)  # a new generation is a new key
    assert ResultCache.key(query, 3) != ResultCache.key(SearchQuery("adi", "indexing", k=9), 3)
    assert ResultCache.key(query, 3, "first stage") != ResultCache.key(query, 3, "reranked, heads none")
    assert ResultCache.key(query, 3, incarnation=1) != ResultCache.key(query, 3, incarnation=2)  # created again
    result = engine.search(query)
    again = SearchResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again == result


def test_api_keys_file_and_scopes(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nreader-key-0123456789 read\nwriter-key-0123456789 write\n")
    guard = ApiKeyInterceptor(load_keys(keys))
    assert guard.scope_of("reader-key-0123456789") == "read" and guard.scope_of("writer-key-0123456789") == "write"
    assert guard.scope_of("reader-key-012345678") is None
    keys.write_text("short read\n")
    with pytest.raises(ValueError, match=r"keys:1: expected"):
        load_keys(keys)


def test_snapshots_go_to_an_allowed_url_and_restore_from_it(tmp_path, adi):
    from sieve.index.errors import AlreadyExists

    backups = f"file://{tmp_path}/backups/"
    with SyncEngine(data=str(tmp_path / "data"), snapshot_targets=backups) as engine:
        engine.create_collection("notes", {"indexes": ["bm25"], "quality_estimator": "none"})
        engine.upsert("notes", adi[:30])
        snapshot = engine.snapshot("notes", backups + "notes-1")
        assert snapshot.url == backups + "notes-1" and (tmp_path / "backups" / "notes-1" / "settings.json").exists()
        engine.upsert("notes", adi[30:])  # after the snapshot: not in it
        with pytest.raises(AlreadyExists):
            engine.snapshot("notes", backups + "notes-1")
        with pytest.raises(InvalidArgument, match="only under its SIEVE_SNAPSHOT_TARGETS"):
            engine.snapshot("notes", f"file://{tmp_path}/elsewhere")
        with pytest.raises(InvalidArgument, match="only under"):
            engine.restore(backups + "../data/notes", "escape")
        with pytest.raises(NotFound):
            engine.restore(backups + "missing", "other")
        restored = engine.restore(snapshot.url, "restored")
        assert restored.stats["documents"] == 30 and restored.stats["generation"] == snapshot.generation
        query = SearchQuery("restored", adi[4].title, k=5)
        assert engine.search(query).hits[0].id == adi[4].id
        assert not list((tmp_path / "data" / ".snapshots").glob(".tmp-*"))  # the download is gone
