"""The engine: Sieve's whole pipeline in plain Python types, behind every front.

The gRPC servicers, the Redis queue consumer, the CLI's `evaluate`, benchmarks and notebooks (through
SyncEngine) all call it, and nothing else runs the pipeline:

    query    -> validate -> encode (micro-batched, cached) -> retrieve + fuse (index/) -> rerank -> top k
    document -> validate -> quality pruning -> encoders -> segment -> manifest (index/)

Limits come from one ServerConfig. Models run in the micro-batcher's worker threads and index work in
worker threads: a coroutine here never blocks the event loop. Collections are named, never handed out:
BaseEngine is the interface, which Engine implements over one data directory and Router
(service/router.py) over the shards of sharded collections.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from sieve.index.bulk import check_job, fetch_job, is_url, remove_job
from sieve.index.catalog import Catalog
from sieve.index.collection import FUSION_DEPTH, Collection, Health, SearchHit, UpsertResult
from sieve.index.documents import Document
from sieve.index.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, ReadOnly, ResourceExhausted,
                                SieveError, Unavailable)
from sieve.index.fusion import check_fusion
from sieve.index.repair import RepairReport
from sieve.index.settings import CollectionSettings
from sieve.index.storage import TEMPORARY_PREFIX, download_folder, upload_folder

from . import metrics
from .batcher import MicroBatcher
from .config import ServerConfig
from .models import check_models

log = logging.getLogger("sieve.engine")

SNAPSHOTS = ".snapshots"  # under the data directory; the catalog never opens what starts with a dot
STAGING = ".staging"  # under the data directory: batch jobs' prebuilt segments (index/bulk.py)
CACHED_ENCODINGS = ("dense", "multivector")  # model outputs worth sharing; word counts are cheaper to redo


@dataclass(frozen=True)
class RerankOptions:
    """A request's reranking choices; what it leaves unset comes from the collection's settings."""

    enabled: bool | None = None  # None: the collection's measured default (see rerank_default)
    candidates: int = 0  # first-stage candidates reranked; 0: the collection's rerank_candidates
    prune: bool = True  # early-exit pruning at the reranker's checkpoints
    margin: float | None = None  # one margin at every checkpoint
    margins: dict[int, float] = field(default_factory=dict)  # per checkpoint layer, instead of margin
    checkpoints: tuple[int, ...] = ()

    def pruning(self, settings: CollectionSettings):
        """The reranker's PruningOptions over the collection's settings (checked before any work)."""
        from sieve.rankers import PruningOptions

        given = [*self.margins.values(), *([] if self.margin is None else [self.margin])]
        if not all(math.isfinite(value) for value in given):
            raise InvalidArgument("rerank margins must be finite numbers")
        if self.margins and self.margin is not None:
            raise InvalidArgument("set margin (every checkpoint) or margins (per layer), not both")
        margin = None if self.margins else (settings.rerank_margin if self.margin is None else self.margin)
        checkpoints = tuple(self.checkpoints) or tuple(settings.rerank_checkpoints) or None
        return PruningOptions(prune=self.prune, checkpoints=checkpoints, margin=margin,
                              margins=dict(self.margins) or None)

    def depth(self, settings: CollectionSettings, k: int, limit: int) -> int:
        candidates = self.candidates or settings.rerank_candidates
        if not 0 < candidates <= limit:
            raise InvalidArgument(f"rerank candidates must be within 1..{limit}, not {candidates}")
        return max(candidates, k)


@dataclass(frozen=True)
class SearchQuery:
    collection: str
    text: str
    k: int | None = None  # None: the server's default
    retrievers: tuple[str, ...] = ()  # empty: the collection's search retrievers
    fusion: str = ""  # empty: the collection's fusion
    filter: dict | None = None  # the plain form of index/filters.py
    rerank: RerankOptions = field(default_factory=RerankOptions)
    multivector: dict = field(default_factory=dict)  # this search's overrides of the multi-vector knobs
    allow_partial: bool = False  # sharded collections: what the shards that answered found, marked partial


@dataclass
class SearchResult:
    hits: list[SearchHit]  # best first, at most k
    generation: int
    timings_ms: dict[str, float]
    survivors: list[int] = field(default_factory=list)  # candidates alive at each reranker checkpoint
    shard_generations: dict[str, int] = field(default_factory=dict)  # sharded: the generation of each shard read
    missing_shards: list[str] = field(default_factory=list)  # sharded, allow_partial: shards that did not answer

    def to_json(self) -> dict:
        plain = dataclasses.asdict(self)
        plain["hits"] = [{"id": h.id, "score": h.score, "document": h.document.to_json()} for h in self.hits]
        return plain

    @classmethod
    def from_json(cls, obj: dict) -> "SearchResult":
        hits = [SearchHit(h["id"], h["score"], Document.from_json(h["document"])) for h in obj["hits"]]
        return cls(**{**obj, "hits": hits})


@dataclass
class RerankResult:
    ranked: list[tuple[int, float]]  # (passage index, score), best first, at most k
    survivors: list[int]


@dataclass
class CollectionInfo:
    name: str
    settings: dict
    stats: dict  # documents, deleted, pruned, segments, bytes_on_disk, generation, details
    health: Health
    state: str  # ok, degraded, or out of service (the collection could not be opened)


@dataclass
class SnapshotInfo:
    collection: str
    generation: int
    path: str  # relative to the data directory: .snapshots/<folder>
    bytes: int
    url: str = ""  # where it was copied to, if anywhere


def make_engine(config: ServerConfig) -> "BaseEngine":
    """A router when the configuration names shards, else the engine over the data directory."""
    if config.shards:
        from .router import Router  # imports this module

        return Router(config)
    return Engine(config)


def rerank_default(collection: Collection) -> tuple[bool, str]:
    """(on by default?, why). With `rerank` unset in its settings, a collection reranks only if `sieve
    evaluate` measured that the reranker beats its fused first stage on judged queries. Reads a file."""
    if collection.settings.rerank is not None:
        return collection.settings.rerank, f"set by the collection's settings (rerank={collection.settings.rerank})"
    figures = collection.evaluation()
    if figures is None:
        return False, ("off: no measured run on this collection; `sieve evaluate` turns reranking on only "
                       "if it beats the fused first stage")
    try:
        on = figures["reranked_ndcg@10"] > figures["first_stage_ndcg@10"]
        verdict = "beat" if on else "did not beat"
        return on, (f"{'on' if on else 'off'}: the reranker {verdict} the fused first stage on "
                    f"{figures['queries']} judged queries (nDCG@10 {figures['reranked_ndcg@10']:.4f} vs "
                    f"{figures['first_stage_ndcg@10']:.4f}, measured {figures['measured_at']})")
    except (KeyError, TypeError, ValueError) as error:
        problem = figures if isinstance(figures, str) else f"the evaluation record lacks {error}"
        return False, f"off: {problem}; run `sieve evaluate` again"


def heads_version(folder: Path | None) -> str:
    """What identifies one training of exit heads (its config's mtime), or "" where there are none."""
    try:
        return str((folder / "config.json").stat().st_mtime_ns) if folder is not None else ""
    except OSError:
        return ""


def pruning_status(collection: Collection) -> str:
    """Whether this collection's reranks can prune early, and with what heads (reads a small file, no model)."""
    from sieve.index.encoders import DEFAULT_ENCODER_ALIASES
    from sieve.rankers.artifact import is_artifact
    from sieve.rankers.exit_heads import read_heads_config

    name = collection.settings.reranker
    if heads_version(collection.exit_heads):
        try:
            config = read_heads_config(collection.exit_heads)
            training, chosen = config["training"], config["pruning"]
            cut = (config.get("pre_ranker") or {}).get("chosen")
            return (f"exit heads trained without labels for {config['reranker'] or 'the shipped reranker'!r} on "
                    f"{training['trained_at']} from {training['pseudo_queries']} pseudo-queries: default checkpoints "
                    f"{chosen['checkpoints']}, held-out top-10 agreement {chosen.get('top10_overlap', 1.0)}"
                    + (f"; a distilled pre-ranker cuts first (held-out agreement {cut['top10_overlap']})" if cut else ""))
        except (KeyError, TypeError, InvalidArgument) as error:
            return f"off: the exit heads in {collection.exit_heads} cannot be used ({error}); train them again"
    if name in DEFAULT_ENCODER_ALIASES or is_artifact(Path(name).expanduser()):
        return "the Sieve reranker's own heads (deep-supervised)"
    return (f"off: {name!r} has a score head only at its last layer, so it reranks unpruned; "
            f"`sieve train exit-heads --collection {collection.name}` trains early heads without labels")


class BaseEngine(ABC):
    """What every engine serves, and the steps they share. `Engine` runs the pipeline over the collections
    of one data directory; `Router` (service/router.py) over the shards of sharded collections, which are
    Engines on other machines. The servicers, the queue consumer and SyncEngine call only these methods."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.batcher = MicroBatcher(config.max_encode_batch, config.batch_wait_ms)
        self.searches = asyncio.Semaphore(config.max_concurrent_searches)
        self.queued_rerank_pairs = 0
        self.unusable_heads: dict[tuple[str, str], str] = {}  # (reranker, heads version) -> why: not retried
        self.redis = None

    @abstractmethod
    async def open(self) -> None: ...

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

    @abstractmethod
    async def settings(self, collection: str) -> CollectionSettings:
        """A collection's settings (NOT_FOUND if there is none)."""

    # What a front can ask -------------------------------------------------------------------
    @abstractmethod
    async def search(self, query: SearchQuery) -> SearchResult: ...

    @abstractmethod
    async def get(self, collection: str, ids: list[str]) -> tuple[list[Document], list[str], int]: ...

    @abstractmethod
    async def upsert(self, collection: str, docs: list[Document], prune: bool = True) -> UpsertResult: ...

    @abstractmethod
    async def import_segments(self, collection: str, job: str, segments: list[str]) -> UpsertResult:
        """Commit a batch job's prebuilt segments in one generation (see index/bulk.py)."""

    @abstractmethod
    async def delete(self, collection: str, ids: list[str]) -> tuple[int, list[str], int]: ...

    @abstractmethod
    async def delete_by_filter(self, collection: str, spec: dict | None) -> tuple[int, int]: ...

    @abstractmethod
    async def pruned(self, collection: str, limit: int = 0) -> list[tuple[str, float]]: ...

    @abstractmethod
    async def reinstate(self, collection: str, ids: list[str]) -> UpsertResult: ...

    @abstractmethod
    async def create_collection(self, name: str, settings: dict) -> CollectionInfo: ...

    @abstractmethod
    async def list_collections(self) -> list[CollectionInfo]: ...

    @abstractmethod
    async def describe(self, name: str) -> CollectionInfo: ...

    @abstractmethod
    async def drop(self, name: str) -> None: ...

    @abstractmethod
    async def compact(self, name: str) -> CollectionInfo: ...

    @abstractmethod
    async def repair(self, name: str) -> tuple[RepairReport, CollectionInfo]: ...

    @abstractmethod
    async def snapshot(self, name: str, target: str = "") -> SnapshotInfo: ...

    @abstractmethod
    async def restore(self, path: str, name: str) -> CollectionInfo: ...

    # Shared steps ----------------------------------------------------------------------------
    def check_text(self, text: str) -> None:
        if not text.strip():
            raise InvalidArgument("the query is empty")
        if len(text) > self.config.max_query_chars:
            raise InvalidArgument(f"the query is {len(text)} characters long; the limit is {self.config.max_query_chars}")

    def check_query(self, query: SearchQuery, settings: CollectionSettings) -> int:
        """The query's k, once its text, k, fusion and rerank options are known to be valid."""
        self.check_text(query.text)
        k = self.config.default_k if query.k is None else query.k
        if not 1 <= k <= self.config.max_k:
            raise InvalidArgument(f"k must be within 1..{self.config.max_k}, not {k}")
        if query.fusion:
            check_fusion(query.fusion)
        if query.rerank.enabled is not False:
            query.rerank.pruning(settings)
            query.rerank.depth(settings, k, self.config.max_rerank_passages)
        return k

    async def search_batch(self, queries: list[SearchQuery]) -> list[SearchResult]:
        """Several searches at once: their encodings share forward passes in the micro-batcher."""
        limit = self.config.max_batch_searches
        if not 1 <= len(queries) <= limit:
            raise InvalidArgument(f"a batch holds 1..{limit} searches, not {len(queries)}")

        async def one(position: int, query: SearchQuery) -> SearchResult:
            try:
                return await self.search(query)
            except SieveError as error:  # which search of the batch failed
                raise type(error)(f"search {position} of the batch: {error}") from None

        return list(await asyncio.gather(*(one(i, q) for i, q in enumerate(queries))))

    async def rerank(self, text: str, passages: list[str], k: int = 0, options: RerankOptions = RerankOptions(),
                     collection: str = "", first_stage: list[float] | None = None) -> RerankResult:
        """Rerank supplied passages with a collection's reranker (or the default one); k 0: all of them.
        With first-stage scores, a reranker calibrated to mix them in interpolates the two."""
        settings = await self.settings(collection) if collection else CollectionSettings()
        self.check_text(text)
        limit = self.config.max_rerank_passages
        if not passages:
            raise InvalidArgument("no passages to rerank")
        if len(passages) > limit:
            raise InvalidArgument(f"{len(passages)} passages; the limit is {limit}")
        if k < 0:
            raise InvalidArgument(f"k must be >= 0 (0: all), not {k}")
        for position, passage in enumerate(passages):
            if not passage.strip():
                raise InvalidArgument(f"passage {position} is empty")
            if len(passage) > self.config.max_document_chars:
                raise InvalidArgument(f"passage {position} is longer than {self.config.max_document_chars} characters")
        if first_stage is not None and len(first_stage) != len(passages):
            raise InvalidArgument(f"{len(first_stage)} first-stage scores for {len(passages)} passages")
        k = min(k or len(passages), len(passages))
        return await self._rerank(settings.reranker, text, passages, k, options.pruning(settings), first_stage,
                                  self.exit_heads(collection) if collection else None)

    async def _rerank_hits(self, result: SearchResult, settings: CollectionSettings, query: SearchQuery,
                           k: int) -> None:
        """Rerank a search's fused candidates in place (scores mixed with the first stage's where the
        reranker is calibrated to), with the survivors and the time it took."""
        start = time.perf_counter()
        hits = result.hits
        reranked = await self._rerank(settings.reranker, query.text, [h.document.content for h in hits], k,
                                      query.rerank.pruning(settings), [h.score for h in hits],
                                      self.exit_heads(query.collection))
        result.hits = [dataclasses.replace(hits[i], score=score) for i, score in reranked.ranked]
        result.timings_ms["rerank"] = (time.perf_counter() - start) * 1000
        result.survivors = reranked.survivors

    def exit_heads(self, collection: str) -> Path | None:
        """The folder of exit heads trained for a collection's reranker, if it has one."""
        return None

    async def _rerank(self, model: str, text: str, passages: list[str], k: int, pruning,
                      first_stage: list[float] | None = None, heads: Path | None = None) -> RerankResult:
        """Through the batcher, so that concurrent requests share forward passes; refused at once when the
        queue of pairs is full (one request always runs). With `heads`, the reranker prunes at them."""
        from sieve.rankers import fuse_with_first_stage, load_reranker

        queued = self.queued_rerank_pairs
        if queued and queued + len(passages) > self.config.max_queued_rerank_pairs:
            metrics.RERANK_REJECTED.inc()
            raise ResourceExhausted(f"the reranker has {queued} query-passage pairs queued (limit "
                                    f"{self.config.max_queued_rerank_pairs}); retry later or send fewer candidates")
        self.queued_rerank_pairs += len(passages)
        try:
            version = heads_version(heads)
            if (model, version) in self.unusable_heads:
                version = ""
            try:
                reranker = await asyncio.to_thread(load_reranker, model, heads=str(heads) if version else "",
                                                   heads_version=version)
            except (FailedPrecondition, InvalidArgument) as error:
                if not version:
                    raise
                log.warning("exit heads in %s are not used, %s reranks unpruned: %s", heads, model or "", error)
                self.unusable_heads[(model, version)] = str(error)
                reranker, version = await asyncio.to_thread(load_reranker, model), ""
            result = await self.batcher.submit(("rerank", model, version), reranker.rerank_many,
                                               (text, passages, k, pruning))
        finally:
            self.queued_rerank_pairs -= len(passages)
        checkpoints = [0, *(["pre"] if hasattr(reranker, "pre") and pruning.prune else []),
                       *(pruning.checkpoints or reranker.default_checkpoints)]
        for layer, alive in zip(checkpoints, result.survivors):
            metrics.RERANK_SURVIVORS.labels(str(layer)).observe(alive)
        if first_stage is not None and reranker.fusion_weight is not None:
            return RerankResult(fuse_with_first_stage(result, first_stage, reranker.fusion_weight)[:k],
                                result.survivors)
        return RerankResult(list(zip(result.order, result.scores))[:k], result.survivors)

class Engine(BaseEngine):
    """The pipeline over the collections of one data directory."""

    def __init__(self, config: ServerConfig):
        super().__init__(config)
        self.catalog: Catalog | None = None
        self.pending_batches = 0
        self.results = self.encodings = None
        if config.redis_url:
            from .cache import EncodingCache, ResultCache
            from .redis_link import RedisLink

            self.redis = RedisLink(config.redis_url, config.redis_password)
            self.results = ResultCache(self.redis, config.cache_ttl_seconds)
            self.encodings = EncodingCache(self.redis, config.cache_ttl_seconds)

    # Life cycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open every collection of the data directory (verifying their files: can take a while)."""
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from sieve.index.encoders import import_model_libraries

        import_model_libraries()
        catalog = Catalog(self.config.data, read_only=self.config.read_only)
        for name in catalog.names():
            metrics.record_collection(name, catalog.get(name).stats())
        self.catalog = catalog
        self.record_health()
        log.info("serving %d collection(s) from %s", len(catalog.names()), self.config.data)

    async def refresh(self) -> None:
        """Replicas: follow the generations the writer commits."""
        await asyncio.to_thread(self._catalog().refresh)
        for name, collection in list(self.catalog.collections.items()):
            metrics.COLLECTION_GENERATION.labels(name).set(collection.snapshot.generation)

    def record_health(self) -> None:
        for name, collection in self.catalog.collections.items():
            metrics.record_health(name, collection.health.state != "ok", collection.health.housekeeping_failures)
        for name in self.catalog.broken:
            metrics.record_health(name, True)

    def _catalog(self) -> Catalog:
        if self.catalog is None:
            raise Unavailable("the server is still loading its collections; retry shortly")
        return self.catalog

    def collection(self, name: str) -> Collection:
        return self._catalog().get(name)

    def _writable_catalog(self, what: str) -> Catalog:
        catalog = self._catalog()
        if catalog.read_only:
            raise ReadOnly(f"this replica is read-only; {what} on the writer")
        return catalog

    async def _record(self, collection: Collection) -> None:
        """Collection gauges after a write (walking the files is I/O: off the event loop)."""
        stats = await asyncio.to_thread(collection.stats)
        metrics.record_collection(collection.name, stats)
        metrics.record_health(collection.name, collection.health.state != "ok", collection.health.housekeeping_failures)

    # Search ----------------------------------------------------------------------------------
    async def settings(self, collection: str) -> CollectionSettings:
        return self.collection(collection).settings

    async def search(self, query: SearchQuery) -> SearchResult:
        """Encode, retrieve with every asked retriever inside the filter, fuse, rerank, top k."""
        collection = self.collection(query.collection)
        settings = collection.settings
        k = self.check_query(query, settings)
        names = collection.check_retrievers(query.retrievers)
        admitted = collection.filter(query.filter) if query.filter else None
        rerank = query.rerank.enabled
        if rerank is None:
            rerank = (await asyncio.to_thread(rerank_default, collection))[0]
        depth = query.rerank.depth(settings, k, self.config.max_rerank_passages) if rerank else k
        cache_key = None
        if self.results is not None:
            ranking = f"reranked, heads {heads_version(collection.exit_heads) or 'none'}" if rerank else "first stage"
            cache_key = self.results.key(dataclasses.replace(query, k=k), collection.snapshot.generation, ranking,
                                         collection.incarnation)
            if (cached := await self.results.get(cache_key)) is not None:
                return SearchResult.from_json(cached)
        async with self.searches:
            start = time.perf_counter()
            encoded = await self._encode_all(collection, names, query.text)
            encode_ms = (time.perf_counter() - start) * 1000
            found = await asyncio.to_thread(collection.search, encoded, depth, query.fusion,
                                            {"multivector": query.multivector}, admitted)
            result = SearchResult(found.hits, found.generation, {"encode": encode_ms, **found.timings_ms})
            if rerank and found.hits:
                await self._rerank_hits(result, settings, query, k)
        result.hits = result.hits[:k]
        for stage, ms in result.timings_ms.items():
            metrics.STAGE_SECONDS.labels(stage).observe(ms / 1000)
        if cache_key is not None and result.generation == collection.snapshot.generation:
            await self.results.put(cache_key, result.to_json())
        return result

    # A shard of a sharded collection: the router's two phases ---------------------------------
    async def statistics(self, collection: str, text: str, retrievers: tuple[str, ...],
                         encoded: dict | None = None) -> tuple[dict, int]:
        """(corpus statistics by lexical retriever, generation) for a query."""
        target = self.collection(collection)
        self.check_text(text)
        names = tuple(n for n in target.check_retrievers(retrievers) if target.retrievers[n].needs_corpus_statistics)
        encoded = await self._encode_all(target, names, text, encoded)
        return await asyncio.to_thread(target.statistics, encoded), target.snapshot.generation

    async def candidates(self, collection: str, text: str, retrievers: tuple[str, ...], depth: int,
                         filter: dict | None = None, multivector: dict | None = None,
                         statistics: dict | None = None,
                         encoded: dict | None = None) -> tuple[dict[str, list[tuple[str, float]]], int, dict]:
        """Each retriever's best `depth` (id, raw score), scored with the collection-wide `statistics`,
        for the query as the router `encoded` it (or as encoded here)."""
        target = self.collection(collection)
        self.check_text(text)
        limit = max(self.config.max_k, self.config.max_rerank_passages, FUSION_DEPTH)
        if not 1 <= depth <= limit:
            raise InvalidArgument(f"depth must be within 1..{limit}, not {depth}")
        names = target.check_retrievers(retrievers)
        admitted = target.filter(filter) if filter else None
        params = {name: {"corpus": corpus} for name, corpus in (statistics or {}).items()}
        params["multivector"] = multivector or {}
        async with self.searches:
            queries = await self._encode_all(target, names, text, encoded)
            return await asyncio.to_thread(target.candidates, queries, depth, params, admitted)

    async def _encode_all(self, collection: Collection, names: tuple[str, ...], text: str,
                          given: dict | None = None) -> dict:
        """Each retriever's query representation: `given` (a router encoded it) or encoded here."""
        given = given or {}
        missing = [name for name in names if name not in given]
        encoded = dict(zip(missing, await asyncio.gather(*(self._encode(collection, n, text) for n in missing))))
        return {name: given[name] if name in given else encoded[name] for name in names}

    async def _encode(self, collection: Collection, name: str, text: str):
        """A retriever's representation of a query: from the shared cache, or batched with concurrent ones."""
        key = None
        if self.encodings is not None and name in CACHED_ENCODINGS:
            key = self.encodings.key(collection.name, name, text, collection.incarnation)
            if (cached := await self.encodings.get(key)) is not None:
                return cached
        encoded = await self.batcher.submit((collection.name, name),
                                            functools.partial(collection.encode_queries, name), text)
        if key is not None:
            await self.encodings.put(key, encoded)
        return encoded

    async def get(self, collection: str, ids: list[str]) -> tuple[list[Document], list[str], int]:
        """(documents found in the order asked, ids not found, generation)."""
        found = self.collection(collection)
        if not 1 <= len(ids) <= self.config.max_batch_documents:
            raise InvalidArgument(f"ask for 1..{self.config.max_batch_documents} ids, not {len(ids)}")
        return await asyncio.to_thread(found.get_many, list(ids))

    # Ingestion -------------------------------------------------------------------------------
    async def upsert(self, collection: str, docs: list[Document], prune: bool = True) -> UpsertResult:
        """Validate (once) -> prune -> encode -> commit; later versions of an id replace earlier ones."""
        target = self.collection(collection)
        if self.pending_batches >= self.config.max_pending_batches:
            metrics.INGEST_REJECTED.labels("backpressure").inc()
            raise ResourceExhausted(f"{self.pending_batches} batches are being ingested; retry this one later")
        self.pending_batches += 1
        try:
            result = await asyncio.to_thread(target.upsert, docs, prune, self.config.max_batch_documents,
                                             self.config.max_document_chars)
        finally:
            self.pending_batches -= 1
        metrics.INGESTED.labels(target.name).inc(len(docs))
        log.info("%s: committed %d documents (%d pruned), generation %d", target.name, result.upserted,
                 result.pruned, result.generation)
        await self._record(target)
        return result

    async def import_segments(self, collection: str, job: str, segments: list[str]) -> UpsertResult:
        """Bulk import: the named segments of a staged job (a folder or URL the job wrote, see index/bulk.py),
        verified, committed in ONE generation with upsert-by-id tombstones, then the job folder removed.
        Jobs are read only from <data>/.staging/ and under SIEVE_IMPORT_ROOTS."""
        target = self.collection(collection)
        self._writable_catalog("import segments")
        allowed = [str(Path(self.config.data).resolve() / STAGING)] + \
            [root.strip() for root in self.config.import_roots.split(",") if root.strip()]
        where = job if is_url(job) else str(Path(job).resolve())
        if "/../" in f"{job}/" or not any(where == root.rstrip("/") or where.startswith(root.rstrip("/") + "/")
                                          for root in allowed):
            raise InvalidArgument(f"{job}: this server imports only from its data directory's {STAGING}/ and "
                                  f"SIEVE_IMPORT_ROOTS ({self.config.import_roots or 'none set'})")
        local = Path(where)
        if is_url(job):  # fetched onto the writer's volume first, so that the import is a rename
            local = target.directory / "segments" / f"{TEMPORARY_PREFIX}import-{uuid.uuid4().hex}"
        try:
            if is_url(job):
                await asyncio.to_thread(fetch_job, job, local, segments)
            folders = check_job(local, target.settings, segments)
            result = await asyncio.to_thread(target.import_segments, folders)
        finally:
            if is_url(job):
                await asyncio.to_thread(shutil.rmtree, local, True)
        try:  # committed: a cleanup that fails is logged, never an error (the next run of the job clears it)
            await asyncio.to_thread(remove_job, job if is_url(job) else str(local))
        except Exception as error:
            log.error("%s: imported job %s, but its staging could not be removed: %s", target.name, job, error)
        metrics.INGESTED.labels(target.name).inc(result.upserted + result.pruned)
        log.info("%s: imported %d segments, %d documents (%d pruned), generation %d", target.name, len(segments),
                 result.upserted + result.pruned, result.pruned, result.generation)
        await self._record(target)
        return result

    async def delete(self, collection: str, ids: list[str]) -> tuple[int, list[str], int]:
        """(deleted, ids not found, generation)."""
        target = self.collection(collection)
        deleted, missing, generation = await asyncio.to_thread(target.delete, list(ids))
        log.info("%s: deleted %d documents, generation %d", target.name, deleted, generation)
        await self._record(target)
        return deleted, missing, generation

    async def delete_by_filter(self, collection: str, spec: dict | None) -> tuple[int, int]:
        """(deleted, generation): every live document the filter admits, in one commit."""
        target = self.collection(collection)
        if not spec:
            raise InvalidArgument("an empty filter admits every document; drop the collection to remove them all")
        deleted, generation = await asyncio.to_thread(target.delete_matching, target.filter(spec))
        log.info("%s: deleted %d documents by filter, generation %d", target.name, deleted, generation)
        await self._record(target)
        return deleted, generation

    async def pruned(self, collection: str, limit: int = 0) -> list[tuple[str, float]]:
        """Passages quality pruning kept out of the indexes, lowest quality first."""
        if limit < 0:
            raise InvalidArgument("limit must be >= 0")
        return await asyncio.to_thread(self.collection(collection).pruned, limit)

    async def reinstate(self, collection: str, ids: list[str]) -> UpsertResult:
        """Index pruned passages after all (encoded now, never pruned again)."""
        target = self.collection(collection)
        if not ids:
            raise InvalidArgument("no ids to reinstate")
        result = await asyncio.to_thread(target.reinstate, list(ids))
        await self._record(target)
        return result

    def exit_heads(self, collection: str) -> Path | None:
        return self.collection(collection).exit_heads

    async def train_exit_heads(self, collection: str, reranker: str | None = None, pseudo_queries: int = 200,
                               depth: int | None = None, min_overlap: float = 0.98, seed: int = 13,
                               pre_ranker: bool = False) -> dict:
        """Early-exit heads for the collection's reranker without labels (rankers/exit_heads.py): pseudo-queries
        from its own passages, candidates from its own first stage, the frozen reranker distilled into a
        head per layer, margins calibrated on held-out pseudo-queries, `depth` candidates each (default: the
        collection's rerank_candidates, the depth its reranks run at). Stored with the collection, used by
        its reranks from then on; with `pre_ranker`, a distilled SPLADE-tiny pre-ranker too, whose cut runs
        before the reranker. Returns the heads' config (their calibration and training record)."""
        import random

        from sieve.rankers.exit_heads import pseudo_queries as make_queries, save_heads, train_exit_heads
        from sieve.rankers.reranker import open_reranker

        target = self.collection(collection)
        name = target.settings.reranker if reranker is None else reranker
        if name != target.settings.reranker:
            raise FailedPrecondition(f"collection {collection!r} reranks with {target.settings.reranker!r}; heads "
                                     f"for {name!r} would never be used")
        depth = target.settings.rerank_candidates if depth is None else depth
        if not 8 <= pseudo_queries <= 100_000 or not 11 <= depth <= self.config.max_rerank_passages:
            raise InvalidArgument(f"pseudo_queries must be within 8..100000 and depth (default: the collection's "
                                  f"rerank_candidates) within 11..{self.config.max_rerank_passages}, got "
                                  f"{pseudo_queries} and {depth} (margins sit around the 10th best)")
        ids = sorted(target.snapshot.id_map)
        sample = random.Random(seed).sample(ids, min(len(ids), 3 * pseudo_queries))
        documents, _, _ = await asyncio.to_thread(target.get_many, sample)
        requests = []
        for text, _ in make_queries(documents, pseudo_queries, seed):
            hits = (await self.search(SearchQuery(collection, text[:self.config.max_query_chars], k=depth,
                                                  rerank=RerankOptions(enabled=False)))).hits
            if len(hits) > 10:
                requests.append((text, [h.document.content for h in hits]))
        model = await asyncio.to_thread(open_reranker, name)
        config, pre = await asyncio.to_thread(train_exit_heads, model, requests, min_overlap=min_overlap,
                                              pre_ranker=pre_ranker)
        config = {"reranker": name, "collection": collection, "depth": depth, **config}
        await asyncio.to_thread(save_heads, model.model, target.exit_heads, config, pre)
        log.info("trained exit heads for collection %s (%s): %s", collection, name or "shipped", config["pruning"])
        return config

    async def record_evaluation(self, collection: str, figures: dict) -> None:
        await asyncio.to_thread(self.collection(collection).record_evaluation, figures)

    # Collections -----------------------------------------------------------------------------
    def _info(self, collection: Collection) -> CollectionInfo:
        stats = collection.stats()
        metrics.record_collection(collection.name, stats)
        on, why = rerank_default(collection)
        stats["details"]["rerank"] = {"default": on, "reason": why, "pruning": pruning_status(collection)}
        stats["details"]["housekeeping_failures"] = collection.health.housekeeping_failures
        return CollectionInfo(collection.name, collection.settings.to_dict(), stats, collection.health,
                              collection.health.state)

    async def create_collection(self, name: str, settings: dict) -> CollectionInfo:
        checked = CollectionSettings.from_dict(settings)
        catalog = self._writable_catalog("create collections")  # these checks before any model load
        if name in catalog.collections or name in catalog.broken:
            raise AlreadyExists(f"collection {name!r} already exists")
        await asyncio.to_thread(check_models, checked, self.config)
        collection = await asyncio.to_thread(catalog.create, name, checked)
        log.info("created collection %s", name)
        return await asyncio.to_thread(self._info, collection)

    async def list_collections(self) -> list[CollectionInfo]:
        """Every collection, and those out of service (listed, so that an operator sees them)."""
        catalog = self._catalog()
        infos = await asyncio.to_thread(lambda: [self._info(catalog.get(name)) for name in catalog.names()])
        return infos + [CollectionInfo(name, {}, {}, Health(problems=[why]), "out of service")
                        for name, why in sorted(catalog.broken.items())]

    async def describe(self, name: str) -> CollectionInfo:
        return await asyncio.to_thread(self._info, self.collection(name))

    async def drop(self, name: str) -> None:
        await asyncio.to_thread(self._catalog().drop, name)
        log.info("dropped collection %s", name)
        metrics.forget_collection(name)

    async def compact(self, name: str) -> CollectionInfo:
        collection = self.collection(name)
        await asyncio.to_thread(collection.compact)
        return await self.describe(name)

    async def repair(self, name: str) -> tuple[RepairReport, CollectionInfo]:
        report = await asyncio.to_thread(self._catalog().repair, name)  # logs what it did
        info = await self.describe(name)
        self.record_health()
        return report, info

    def _check_url(self, url: str) -> str:
        allowed = [prefix.strip() for prefix in self.config.snapshot_targets.split(",") if prefix.strip()]
        if not any(url.startswith(prefix) for prefix in allowed) or "/../" in f"{url}/":
            raise InvalidArgument(f"{url}: this server copies snapshots only under its SIEVE_SNAPSHOT_TARGETS "
                                  f"({', '.join(allowed) or 'none set'})")
        return url

    async def snapshot(self, name: str, target: str = "") -> SnapshotInfo:
        """A consistent copy of the generation served now, under <data>/.snapshots/ (searches go on), then
        copied to `target` (an fsspec URL) if one is named; the manifest goes last."""
        catalog = self._writable_catalog("snapshot collections")
        collection = self.collection(name)
        url = self._check_url(target) if target else ""
        folder = catalog.data_dir / SNAPSHOTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder.parent.mkdir(exist_ok=True)
        generation = await asyncio.to_thread(collection.copy_to, folder)
        size = await asyncio.to_thread(lambda: sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
        if url:
            manifest = f"manifest-{generation:010d}.json"
            await asyncio.to_thread(upload_folder, folder, url, (manifest,))
        log.info("snapshot of %s generation %d at %s%s", name, generation, folder, f" and {url}" if url else "")
        return SnapshotInfo(name, generation, str(folder.relative_to(catalog.data_dir)), size, url)

    async def restore(self, path: str, name: str) -> CollectionInfo:
        """A snapshot, verified, as a new collection: one this server made (.snapshots/<folder>), or one
        copied to a URL under SIEVE_SNAPSHOT_TARGETS."""
        catalog = self._catalog()
        if "://" in path:
            download = catalog.data_dir / SNAPSHOTS / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
            try:
                await asyncio.to_thread(download_folder, self._check_url(path), download)
                collection = await asyncio.to_thread(catalog.restore, download, name)
            finally:
                await asyncio.to_thread(shutil.rmtree, download, True)
        else:
            if Path(path).parent != Path(SNAPSHOTS):
                raise InvalidArgument(f"a snapshot path is {SNAPSHOTS}/<folder>, as CreateSnapshot returned it, "
                                      "or a URL")
            collection = await asyncio.to_thread(catalog.restore, catalog.data_dir / SNAPSHOTS / Path(path).name,
                                                 name)
        log.info("restored %s as collection %s (generation %d)", path, name, collection.snapshot.generation)
        return await asyncio.to_thread(self._info, collection)
