"""The router of sharded collections: the public API over shards on other machines; it holds no data.

Every collection behind a router is split over all of its shards by a stable hash of the document id;
each shard is an ordinary Sieve server (an Engine with its own atomic commits, tombstones, compaction
and replicas). A search is two phases, as Elasticsearch's dfs_query_then_fetch: the lexical retrievers'
corpus statistics, summed over the shards, then each shard's per-retriever candidates scored with them;
the router merges each retriever's lists by score, fuses once, fetches the documents and reranks once.
So a sharded collection ranks as the same documents in one node. Placement, restarts and scaling are
Kubernetes' (deploy/kubernetes/sharded/).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import xxhash

from sieve.index.bulk import routed_segments, shard_job
from sieve.index.collection import FUSION_DEPTH, Health, SearchHit, UpsertResult
from sieve.index.documents import Document, validate_batch
from sieve.index.errors import (AlreadyExists, CorruptIndex, InvalidArgument, NotFound, ReadOnly, ResourceExhausted,
                                SieveError, Unavailable)
from sieve.index.filters import Filter
from sieve.index.fusion import fuse
from sieve.index.lexical import CorpusStatistics
from sieve.index.registry import make_retrievers, retriever_class
from sieve.index.repair import RepairReport
from sieve.index.settings import CollectionSettings
from sieve.v1 import sieve_pb2 as pb
from sieve.v1 import sieve_pb2_grpc as stubs

from . import metrics
from .client import (corpus_statistics, document_message, document_of, encoded_message, filter_message,
                     statistics_message, struct_dict)
from .config import ServerConfig
from .engine import BaseEngine, CollectionInfo, SearchQuery, SearchResult, SnapshotInfo

log = logging.getLogger("sieve.router")

SETTINGS_TTL_SECONDS = 5.0  # a collection's settings are fixed; its measured rerank default may change
ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.NOT_FOUND: NotFound,
          grpc.StatusCode.ALREADY_EXISTS: AlreadyExists, grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
          grpc.StatusCode.FAILED_PRECONDITION: CorruptIndex}


def shard_addresses(spec: str) -> list[str]:
    """`host:port` entries separated by commas; `name-{0..2}.service:50051` expands to the names of a
    Kubernetes StatefulSet's pods behind its headless service."""
    addresses = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        if match := re.search(r"\{(\d+)\.\.(\d+)\}", entry):
            first, last = int(match[1]), int(match[2])
            addresses += [entry[:match.start()] + str(n) + entry[match.end():] for n in range(first, last + 1)]
        else:
            addresses.append(entry)
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"SIEVE_SHARDS names a shard twice: {spec}")
    return addresses


def shard_of(doc_id: str, shards: int) -> int:
    """The shard that owns a document: a stable hash of its id (xxHash3, the same on every machine)."""
    return xxhash.xxh3_64_intdigest(doc_id.encode()) % shards


@dataclass
class Shard:
    name: str  # its position, "0", "1", ...: what responses and metrics call it
    address: str
    channel: grpc.aio.Channel
    search: stubs.SearchServiceStub
    ingest: stubs.IngestServiceStub
    collections: stubs.CollectionServiceStub
    phases: stubs.ShardServiceStub


class Router(BaseEngine):
    def __init__(self, config: ServerConfig):
        super().__init__(config)
        self.addresses = shard_addresses(config.shards)
        self.shards: list[Shard] = []
        self.metadata = (("authorization", f"Bearer {config.shard_api_key}"),) if config.shard_api_key else ()
        self._settings: dict[str, tuple[float, CollectionSettings, bool]] = {}
        self._retrievers: dict[str, tuple[CollectionSettings, dict]] = {}  # the query encoders, per collection

    async def open(self) -> None:
        options = [("grpc.max_receive_message_length", self.config.max_message_bytes),
                   ("grpc.max_send_message_length", self.config.max_message_bytes),
                   # a restarted shard is called again within seconds, not after minutes of backoff
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
        credentials = grpc.ssl_channel_credentials(Path(self.config.shard_ca).read_bytes()) \
            if self.config.shard_ca else None
        for position, address in enumerate(self.addresses):
            channel = grpc.aio.secure_channel(address, credentials, options) if credentials \
                else grpc.aio.insecure_channel(address, options)
            self.shards.append(Shard(str(position), address, channel, stubs.SearchServiceStub(channel),
                                     stubs.IngestServiceStub(channel), stubs.CollectionServiceStub(channel),
                                     stubs.ShardServiceStub(channel)))
        log.info("routing to %d shards: %s", len(self.shards), ", ".join(self.addresses))

    async def close(self) -> None:
        for shard in self.shards:
            await shard.channel.close()

    # Calling the shards ----------------------------------------------------------------------
    async def _call(self, shard: Shard, method, request, timeout: float | None = None):
        """One shard's answer; its errors as Sieve's, naming the shard. Timed per shard."""
        start = time.perf_counter()
        try:
            return await method(request, timeout=timeout or self.config.shard_timeout_seconds,
                                metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            metrics.SHARD_FAILURES.labels(shard.name, error.code().name).inc()
            kind = ERRORS.get(error.code(), Unavailable)
            raise kind(f"shard {shard.name} ({shard.address}): {error.details() or error.code().name}") from None
        finally:
            metrics.SHARD_SECONDS.labels(shard.name).observe(time.perf_counter() - start)

    async def _all(self, call, partial: bool = False) -> tuple[list, list[str]]:
        """`call(shard)` on every shard at once: (answers in shard order, None for a shard that failed;
        the failures). Without `partial`, any failure is the error (with every failing shard named)."""
        outcomes = await asyncio.gather(*(call(shard) for shard in self.shards), return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures and (not partial or len(failures) == len(outcomes)) or \
                any(not isinstance(f, SieveError) for f in failures):
            raise_all(failures)  # partial results need at least one shard
        if failures:
            metrics.PARTIAL_RESPONSES.inc()
        return [None if isinstance(o, BaseException) else o for o in outcomes], [str(f) for f in failures]

    def _owners(self, ids: list[str]) -> dict[int, list[str]]:
        owners: dict[int, list[str]] = {}
        for doc_id in ids:
            owners.setdefault(shard_of(doc_id, len(self.shards)), []).append(doc_id)
        return owners

    async def _each_owner(self, ids: list[str], call) -> list:
        """`call(shard, its ids)` for the shards that own some of `ids`, at once; every failure named."""
        owners = self._owners(ids)
        outcomes = await asyncio.gather(*(call(self.shards[position], owned) for position, owned in owners.items()),
                                        return_exceptions=True)
        raise_all([o for o in outcomes if isinstance(o, BaseException)])
        return outcomes

    # Collections -----------------------------------------------------------------------------
    async def settings(self, collection: str) -> CollectionSettings:
        return (await self._settings_and_default(collection))[0]

    async def _settings_and_default(self, collection: str) -> tuple[CollectionSettings, bool]:
        """Settings and the measured rerank default, from the first shard that answers, kept a few seconds
        (and kept while no shard answers: a search that allows partial results still runs)."""
        cached = self._settings.get(collection)
        if cached and time.monotonic() - cached[0] < SETTINGS_TTL_SECONDS:
            return cached[1], cached[2]
        failures = []
        for shard in self.shards:
            try:
                info = await self._call(shard, shard.collections.DescribeCollection,
                                        pb.DescribeCollectionRequest(name=collection))
                break
            except Unavailable as error:
                failures.append(error)
        else:
            if cached:
                return cached[1], cached[2]
            raise_all(failures)
        settings = CollectionSettings.from_dict(struct_dict(info.settings))
        default = bool(struct_dict(info.stats.details).get("rerank", {}).get("default", False))
        self._settings[collection] = (time.monotonic(), settings, default)
        return settings, default

    async def create_collection(self, name: str, settings: dict) -> CollectionInfo:
        CollectionSettings.from_dict(settings)  # refused here before any shard sees it
        request = pb.CreateCollectionRequest(name=name)
        request.settings.update(settings)
        created, _ = await self._all(lambda shard: self._create_one(shard, request))
        if not any(created):
            raise AlreadyExists(f"collection {name!r} already exists")
        log.info("created collection %s on %d shards", name, len(self.shards))
        return await self.describe(name)

    async def _create_one(self, shard: Shard, request) -> bool:
        try:  # a retried create finds the shards that made it already
            await self._call(shard, shard.collections.CreateCollection, request, timeout=600)
            return True
        except AlreadyExists:
            return False

    async def describe(self, name: str) -> CollectionInfo:
        infos, _ = await self._all(lambda shard: self._call(shard, shard.collections.DescribeCollection,
                                                            pb.DescribeCollectionRequest(name=name)))
        return self._combined(infos)

    def _combined(self, infos: list[pb.CollectionInfo]) -> CollectionInfo:
        """One collection's view over its shards: counts added up, each shard's figures under details."""
        first = infos[0]
        stats = {key: sum(getattr(info.stats, key) for info in infos)
                 for key in ("documents", "deleted", "pruned", "segments", "bytes_on_disk", "generation")}
        details = struct_dict(first.stats.details)
        details["shards"] = {shard.name: {"address": shard.address, "documents": info.stats.documents,
                                          "generation": info.stats.generation, "state": info.health.state}
                             for shard, info in zip(self.shards, infos)}
        problems = [f"shard {shard.name}: {problem}" for shard, info in zip(self.shards, infos)
                    for problem in info.health.problems]
        states = [info.health.state for info in infos]
        state = next((s for s in ("out of service", "degraded") if s in states), "ok")
        health = Health(problems=problems, kept_files=[f for info in infos for f in info.health.kept_files],
                        quarantined=[f for info in infos for f in info.health.quarantined])
        return CollectionInfo(first.name, struct_dict(first.settings), {**stats, "details": details}, health, state)

    async def list_collections(self) -> list[CollectionInfo]:
        lists, _ = await self._all(lambda shard: self._call(shard, shard.collections.ListCollections,
                                                            pb.ListCollectionsRequest()))
        names = sorted({info.name for listed in lists for info in listed.collections})
        infos = []
        for name in names:
            found = [next((i for i in listed.collections if i.name == name), None) for listed in lists]
            if any(info is None for info in found):
                missing = [s.name for s, info in zip(self.shards, found) if info is None]
                infos.append(CollectionInfo(name, {}, {}, Health(problems=[f"missing on shards {', '.join(missing)}: "
                                                                           "create it again to finish"]),
                                            "out of service"))
            else:
                infos.append(self._combined(found))
        return infos

    async def drop(self, name: str) -> None:
        await self._all(lambda shard: self._call(shard, shard.collections.DropCollection,
                                                 pb.DropCollectionRequest(name=name)))
        self._settings.pop(name, None)
        log.info("dropped collection %s on every shard", name)

    async def compact(self, name: str) -> CollectionInfo:
        infos, _ = await self._all(lambda shard: self._call(shard, shard.collections.Compact,
                                                            pb.CompactRequest(name=name), timeout=3600))
        return self._combined(infos)

    async def import_segments(self, collection: str, job: str, segments: list[str]) -> UpsertResult:
        """A job routed over the shards (index/bulk.py): each shard's writer imports its own folder, in one
        generation each. A shard that fails is named; importing the job again is not possible once some
        shard has committed (it removes its folder), but running the job again is safe (upserts by id)."""
        if not segments:
            raise InvalidArgument("the import names no segments")
        owned = routed_segments(segments, len(self.shards))

        async def one(shard: int, names: list[str]) -> pb.UpsertResponse:
            folder = f"{job.rstrip('/')}/{shard_job(shard, len(self.shards))}"
            request = pb.ImportSegmentsRequest(collection=collection, job=folder, segments=names)
            return await self._call(self.shards[shard], self.shards[shard].ingest.ImportSegments, request, 3600)

        outcomes = await asyncio.gather(*(one(shard, names) for shard, names in owned.items()),
                                        return_exceptions=True)
        committed = [self.shards[s].name for s, o in zip(owned, outcomes) if not isinstance(o, BaseException)]
        return summed(outcomes, f"shards {committed or 'none'} committed their part; run the job again: it "
                                "upserts by id")

    async def repair(self, name: str) -> tuple[RepairReport, CollectionInfo]:
        raise ReadOnly("a router holds no files: repair each shard's collection on that shard")

    async def snapshot(self, name: str, target: str = "") -> SnapshotInfo:
        raise ReadOnly("a router holds no files: snapshot the collection on each shard")

    async def restore(self, path: str, name: str) -> CollectionInfo:
        raise ReadOnly("a router holds no files: restore each shard's snapshot on that shard")

    # Search ----------------------------------------------------------------------------------
    async def search(self, query: SearchQuery) -> SearchResult:
        settings, default = await self._settings_and_default(query.collection)
        k = self.check_query(query, settings)
        names = settings.check_retrievers(query.retrievers, query.collection)
        if query.filter:
            Filter(query.filter, settings.filterable)  # refused before any shard is asked
        rerank = default if query.rerank.enabled is None else query.rerank.enabled
        depth = query.rerank.depth(settings, k, self.config.max_rerank_passages) if rerank else k
        per_retriever = depth if len(names) == 1 else max(depth, FUSION_DEPTH)  # as Collection.search
        timings: dict[str, float] = {}
        async with self.searches:
            start = time.perf_counter()
            encoded = await self._encode(query.collection, settings, names, query.text)
            timings["encode"] = (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            statistics, missing = await self._statistics(query, names, encoded)
            timings["statistics"] = (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            request = pb.ShardCandidatesRequest(collection=query.collection, query=query.text, retrievers=names,
                                                depth=per_retriever, statistics=statistics, encoded=encoded,
                                                multivector=pb.MultiVectorOptions(**query.multivector))
            if query.filter:
                request.filter.CopyFrom(filter_message(query.filter))
            answers, failed = await self._all(lambda shard: self._call(shard, shard.phases.Candidates, request),
                                              query.allow_partial)
            timings["candidates"] = (time.perf_counter() - start) * 1000
            missing += [f for f in failed if f not in missing]
            start = time.perf_counter()
            rankings = {name: merged([a.rankings[name] for a in answers if a is not None], per_retriever)
                        for name in names}
            fused = fuse(query.fusion or settings.fusion, rankings, settings.rrf_k, settings.fusion_weights)[:depth]
            timings["fusion"] = (time.perf_counter() - start) * 1000
            start = time.perf_counter()
            documents, _ = await self._fetch(query.collection, [doc_id for doc_id, _ in fused])
            timings["fetch"] = (time.perf_counter() - start) * 1000
            generations = {shard.name: answer.generation for shard, answer in zip(self.shards, answers) if answer}
            result = SearchResult([SearchHit(doc_id, score, documents[doc_id]) for doc_id, score in fused
                                   if doc_id in documents], sum(generations.values()), timings,
                                  shard_generations=generations, missing_shards=missing)
            if rerank and result.hits:
                await self._rerank_hits(result, settings, query, k)
        result.hits = result.hits[:k]
        for stage, ms in timings.items():
            metrics.STAGE_SECONDS.labels(stage).observe(ms / 1000)
        return result

    async def _encode(self, collection: str, settings: CollectionSettings, names: tuple[str, ...],
                      text: str) -> dict[str, pb.EncodedQuery]:
        """The query encoded once, here (micro-batched with concurrent searches), not once per shard."""
        cached = self._retrievers.get(collection)
        if cached is None or cached[0] != settings:
            cached = (settings, await asyncio.to_thread(make_retrievers, settings))  # loads models: off the loop
            self._retrievers[collection] = cached
        retrievers = cached[1]
        values = await asyncio.gather(*(self.batcher.submit((collection, name), retrievers[name].encode_queries, text)
                                        for name in names))
        return {name: encoded_message(value) for name, value in zip(names, values)}

    async def _statistics(self, query: SearchQuery, names: tuple[str, ...],
                          encoded: dict[str, pb.EncodedQuery]) -> tuple[dict, list[str]]:
        """Phase one: the lexical retrievers' corpus statistics, added up over the shards that answered
        (one shard's own are the collection's: no phase)."""
        lexical = [name for name in names if retriever_class(name).needs_corpus_statistics]
        if not lexical or len(self.shards) == 1:
            return {}, []
        request = pb.ShardStatisticsRequest(collection=query.collection, query=query.text, retrievers=lexical,
                                            encoded={name: encoded[name] for name in lexical})
        answers, failed = await self._all(lambda shard: self._call(shard, shard.phases.Statistics, request),
                                          query.allow_partial)
        totals = {name: CorpusStatistics.total([corpus_statistics(a.statistics[name]) for a in answers
                                                if a is not None and name in a.statistics]) for name in lexical}
        return {name: statistics_message(total) for name, total in totals.items()}, failed

    async def _fetch(self, collection: str, ids: list[str]) -> tuple[dict[str, Document], int]:
        """The documents of `ids` from the shards that own them (those found), and the generations' sum."""
        if not ids:
            return {}, 0
        answers = await self._each_owner(list(dict.fromkeys(ids)), lambda shard, owned: self._call(
            shard, shard.search.Get, pb.GetRequest(collection=collection, ids=owned)))
        found = {m.id: document_of(m) for answer in answers for m in answer.documents}
        return found, sum(answer.generation for answer in answers)

    async def get(self, collection: str, ids: list[str]) -> tuple[list[Document], list[str], int]:
        if not 1 <= len(ids) <= self.config.max_batch_documents:
            raise InvalidArgument(f"ask for 1..{self.config.max_batch_documents} ids, not {len(ids)}")
        found, generation = await self._fetch(collection, ids)
        return [found[i] for i in ids if i in found], [i for i in ids if i not in found], generation

    # Writes ----------------------------------------------------------------------------------
    async def upsert(self, collection: str, docs: list[Document], prune: bool = True) -> UpsertResult:
        """Each shard commits its part atomically; a shard that fails fails for its documents only, named,
        and the batch can be sent again as it is (upserts by id)."""
        validate_batch(docs, self.config.max_batch_documents, self.config.max_document_chars)
        by_id = {doc.id: doc for doc in docs}

        async def one(shard: Shard, owned: list[str]) -> pb.UpsertResponse:
            request = pb.UpsertRequest(collection=collection, documents=[document_message(by_id[i]) for i in owned])
            return await self._call(shard, functools.partial(first_response, shard.ingest.Upsert), request, 600)

        owners = self._owners(list(by_id))
        outcomes = await asyncio.gather(*(one(self.shards[p], owned) for p, owned in owners.items()),
                                        return_exceptions=True)
        done = sum(len(owned) for owned, o in zip(owners.values(), outcomes) if not isinstance(o, BaseException))
        return summed(outcomes, f"{done} documents on the other shards are committed; sending the batch again is safe")

    async def delete(self, collection: str, ids: list[str]) -> tuple[int, list[str], int]:
        if not ids:
            raise InvalidArgument("no ids to delete")
        answers = await self._each_owner(list(dict.fromkeys(ids)), lambda shard, owned: self._call(
            shard, shard.ingest.Delete, pb.DeleteRequest(collection=collection, ids=owned)))
        return (sum(a.deleted for a in answers), [i for a in answers for i in a.not_found],
                sum(a.generation for a in answers))

    async def delete_by_filter(self, collection: str, spec: dict | None) -> tuple[int, int]:
        """Atomic on each shard; every shard is asked (a failure names the shards that did not delete)."""
        if not spec:
            raise InvalidArgument("an empty filter admits every document; drop the collection to remove them all")
        Filter(spec, (await self.settings(collection)).filterable)
        request = pb.DeleteByFilterRequest(collection=collection, filter=filter_message(spec))
        answers, _ = await self._all(lambda shard: self._call(shard, shard.ingest.DeleteByFilter, request))
        return sum(a.deleted for a in answers), sum(a.generation for a in answers)

    async def pruned(self, collection: str, limit: int = 0) -> list[tuple[str, float]]:
        if limit < 0:
            raise InvalidArgument("limit must be >= 0")
        answers, _ = await self._all(lambda shard: self._call(
            shard, shard.ingest.ListPruned, pb.ListPrunedRequest(collection=collection, limit=limit)))
        records = sorted(((p.id, p.quality) for a in answers for p in a.passages), key=lambda record: record[1])
        return records[:limit] if limit else records

    async def reinstate(self, collection: str, ids: list[str]) -> UpsertResult:
        if not ids:
            raise InvalidArgument("no ids to reinstate")
        answers = await self._each_owner(list(dict.fromkeys(ids)), lambda shard, owned: self._call(
            shard, shard.ingest.Reinstate, pb.ReinstateRequest(collection=collection, ids=owned), timeout=600))
        return UpsertResult(sum(a.upserted for a in answers), 0, sum(a.generation for a in answers))


async def first_response(upsert, request, timeout: float, metadata) -> pb.UpsertResponse:
    """One batch through the Upsert stream: its acknowledgement."""
    async for response in upsert(iter([request]), timeout=timeout, metadata=metadata):
        return response
    raise Unavailable("the shard closed the stream without acknowledging the batch")


def summed(outcomes: list, partial_note: str) -> UpsertResult:
    """The shards' UpsertResponses added up; if some failed, a Sieve error naming each failure and what
    the others committed (`partial_note`)."""
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        if not all(isinstance(f, SieveError) for f in failures):
            raise_all(failures)
        raise type(failures[0])("; ".join(map(str, failures)) + f" ({partial_note})")
    return UpsertResult(sum(o.upserted for o in outcomes), sum(o.pruned for o in outcomes),
                        sum(o.generation for o in outcomes))


def raise_all(failures: list[BaseException]) -> None:
    """Nothing, or one error naming every failed shard (of the first failure's kind)."""
    if len(failures) == 1:
        raise failures[0]
    if failures:
        first = failures[0]
        raise (type(first)("; ".join(map(str, failures))) if isinstance(first, SieveError) else first)


def merged(rankings: list[pb.Ranking], depth: int) -> list[tuple[str, float]]:
    """One retriever's lists from every shard, merged by score (shard order breaks ties)."""
    pairs = [(doc_id, score) for ranking in rankings for doc_id, score in zip(ranking.ids, ranking.scores)]
    return sorted(pairs, key=lambda pair: -pair[1])[:depth]
