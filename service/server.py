"""The gRPC front: validate, batch, call the index and rankers off the event loop, answer.

Handlers never run a model or touch a file on the event loop: encoding goes through the
micro-batcher, index work through worker threads. Every error becomes one precise status.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import signal
import time
import uuid
from dataclasses import replace
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from sieve.index.catalog import Catalog
from sieve.index.documents import Document, validate_batch
from sieve.index.filters import Filter
from sieve.index.errors import (AlreadyExists, CorruptIndex, InvalidArgument, NotFound, ReadOnly, ResourceExhausted,
                                SieveError, Unavailable)
from sieve.index.settings import CollectionSettings
from sieve.v1 import sieve_pb2 as pb

from . import metrics
from .batcher import MicroBatcher
from .client import document_message, filter_spec
from .config import ServerConfig, StartupError
from .logs import request_id
from .models import check_models
from .reranking import candidate_count, pruning_options, rerank_default

log = logging.getLogger("sieve.service")

SERVICES = ("SearchService", "IngestService", "CollectionService")
STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CorruptIndex: grpc.StatusCode.FAILED_PRECONDITION,
    ReadOnly: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (e.g. invalid UTF-8 in a string)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(parse):
    def parse_or_mark(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            return _Undecodable(error)
    return parse_or_mark


def _check_decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid message: {request.error} "
                              "(string fields must be valid UTF-8)")


def _take_request_id(context) -> None:
    """The caller's x-request-id (or a new one) goes into every log line of this call and back out."""
    given = dict(context.invocation_metadata() or ()).get("x-request-id", "")
    rid = given[:64] if given.isprintable() and given else uuid.uuid4().hex[:16]
    request_id.set(rid)
    context.set_trailing_metadata((("x-request-id", rid),))


def rpc(method):
    """Map errors to statuses, honour deadlines, count and time every call."""
    name = method.__name__

    def status_of(error: Exception) -> grpc.StatusCode:
        return next((code for cls, code in STATUS.items() if isinstance(error, cls)), grpc.StatusCode.INTERNAL)

    async def fail(context, error: Exception):
        if isinstance(error, asyncio.TimeoutError):
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it finished"
        elif isinstance(error, SieveError):
            code, message = status_of(error), str(error)
        else:
            log.exception("internal error in %s", name)
            code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id.get()})"
        metrics.REQUESTS.labels(name, code.name).inc()
        await context.abort(code, message)

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            _take_request_id(context)
            start = time.perf_counter()
            metrics.INFLIGHT.inc()
            try:
                async for response in method(self, request, context):
                    yield response
                metrics.REQUESTS.labels(name, "OK").inc()
            except Exception as error:
                await fail(context, error)
            finally:
                metrics.INFLIGHT.dec()
                metrics.REQUEST_SECONDS.labels(name).observe(time.perf_counter() - start)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        _take_request_id(context)
        start = time.perf_counter()
        metrics.INFLIGHT.inc()
        try:
            _check_decoded(request)
            remaining = context.time_remaining()
            response = await asyncio.wait_for(method(self, request, context), remaining)
            metrics.REQUESTS.labels(name, "OK").inc()
            return response
        except Exception as error:
            await fail(context, error)
        finally:
            metrics.INFLIGHT.dec()
            metrics.REQUEST_SECONDS.labels(name).observe(time.perf_counter() - start)
    return unary


SNAPSHOTS = ".snapshots"  # under the data directory; the catalog never opens what starts with a dot


def multivector_options(options: pb.MultiVectorOptions) -> dict:
    """The fields a request set; the retriever validates them against its settings."""
    return {field.name: value for field, value in options.ListFields()}


def to_struct(values: dict) -> Struct:
    struct = Struct()
    struct.update(values)
    return struct


def from_struct(struct: Struct, what: str) -> dict:
    try:
        return json_format.MessageToDict(struct)
    except ValueError:  # protobuf refuses NaN and infinities, which JSON cannot hold
        raise InvalidArgument(f"{what} holds NaN or an infinity; send finite numbers, or the value as a "
                              "string") from None


class Sieve:
    """Everything the handlers share: the catalog, the batcher, the limits."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.catalog: Catalog | None = None
        self.batcher = MicroBatcher(config.max_encode_batch, config.batch_wait_ms)
        self.pending_batches = 0
        self.queued_rerank_pairs = 0
        self.searches = asyncio.Semaphore(config.max_concurrent_searches)
        self.redis = None
        self.cache = None
        if config.redis_url:
            from .cache import EncodingCache, ResultCache
            from .redis_link import RedisLink

            self.redis = RedisLink(config.redis_url, config.redis_password)
            self.cache = ResultCache(self.redis, config.cache_ttl_seconds)
            self.encodings = EncodingCache(self.redis, config.cache_ttl_seconds)

    def load(self) -> None:
        from sieve.index.encoders import import_model_libraries

        import_model_libraries()
        catalog = Catalog(self.config.data, read_only=self.config.read_only)
        for name in catalog.names():
            metrics.record_collection(name, catalog.get(name).stats())
        self.catalog = catalog
        self.record_health()

    def record_health(self) -> None:
        for name, collection in self.catalog.collections.items():
            metrics.record_health(name, collection.health.state != "ok", collection.health.housekeeping_failures)
        for name in self.catalog.broken:
            metrics.record_health(name, True)

    def collection(self, name: str):
        if self.catalog is None:
            raise Unavailable("the server is still loading its collections; retry shortly")
        return self.catalog.get(name)

    async def record(self, collection) -> None:
        """Collection gauges after a write (walking the files is I/O: off the event loop)."""
        stats = await asyncio.to_thread(collection.stats)
        metrics.record_collection(collection.name, stats)
        metrics.record_health(collection.name, collection.health.state != "ok", collection.health.housekeeping_failures)

    def info(self, collection) -> pb.CollectionInfo:
        stats = collection.stats()
        metrics.record_collection(collection.name, stats)
        details = stats.pop("details")
        on, why = rerank_default(collection)
        details["rerank"] = {"default": on, "reason": why}
        details["housekeeping_failures"] = collection.health.housekeeping_failures
        health = collection.health
        return pb.CollectionInfo(
            name=collection.name,
            settings=to_struct(collection.settings.to_dict()),
            stats=pb.CollectionStats(**stats, details=to_struct(details)),
            health=pb.CollectionHealth(state=health.state, problems=health.problems, kept_files=health.kept_files,
                                       quarantined=health.quarantined),
        )

    def documents(self, request) -> list[Document]:
        """Text, title and metadata (as stored JSON) count toward one per-document size limit."""
        docs = []
        limit = self.config.max_document_chars
        for position, message in enumerate(request.documents):
            metadata = from_struct(message.metadata, f"document {position} ({message.id!r}): metadata")
            stored = json.dumps(metadata, ensure_ascii=False) if metadata else ""
            size = len(message.text) + len(message.title) + len(stored)
            if size > limit:
                raise InvalidArgument(f"document {position} ({message.id!r}) is {size} characters of text, title "
                                      f"and metadata; the limit is {limit}")
            docs.append(Document(message.id, message.text, message.title, metadata))
        validate_batch(docs, self.config.max_batch_documents)
        return docs

    def check_response_size(self, response, what: str, advice: str) -> None:
        size, limit = response.ByteSize(), self.config.max_message_bytes
        if size > limit:
            raise ResourceExhausted(f"the {what} come to {size} bytes, above the server's message limit ({limit}); "
                                    f"{advice}")

    def search_arguments(self, request) -> int:
        query = request.query
        if not query.strip():
            raise InvalidArgument("the query is empty")
        if len(query) > self.config.max_query_chars:
            raise InvalidArgument(f"the query is {len(query)} characters long; the limit is {self.config.max_query_chars}")
        k = request.k if request.HasField("k") else self.config.default_k
        if not 1 <= k <= self.config.max_k:
            raise InvalidArgument(f"k must be within 1..{self.config.max_k}, not {k}")
        return k

    async def rerank(self, model: str, query: str, passages: list[str], k: int, options,
                     first_stage: list[float] | None = None) -> tuple[list[tuple[int, float]], list[int]]:
        """([(passage index, score)] best first, survivors per checkpoint). Runs through the batcher, so
        that concurrent requests share forward passes; with first-stage scores, and a reranker
        calibrated to mix them in, the two are interpolated."""
        from sieve.rankers import fuse_with_first_stage, load_reranker

        queued = self.queued_rerank_pairs
        if queued and queued + len(passages) > self.config.max_queued_rerank_pairs:  # one request always runs
            metrics.RERANK_REJECTED.inc()
            raise ResourceExhausted(f"the reranker has {queued} query-passage pairs queued (limit "
                                    f"{self.config.max_queued_rerank_pairs}); retry later or send fewer candidates")
        self.queued_rerank_pairs += len(passages)
        try:
            reranker = await asyncio.to_thread(load_reranker, model)
            result = await self.batcher.submit(("rerank", model), reranker.rerank_many, (query, passages, k, options))
        finally:
            self.queued_rerank_pairs -= len(passages)
        checkpoints = [0, *(options.checkpoints or getattr(reranker, "default_checkpoints", ()))]
        for layer, alive in zip(checkpoints, result.survivors):
            metrics.RERANK_SURVIVORS.labels(str(layer)).observe(alive)
        weight = getattr(reranker, "fusion_weight", None)
        if first_stage is not None and weight is not None:
            return fuse_with_first_stage(result, first_stage, weight), result.survivors
        return list(zip(result.order, result.scores)), result.survivors

    async def encode(self, collection, names, query: str) -> dict:
        """Each retriever's representation of the query: from the shared cache, or batched with
        concurrent requests."""
        return dict(zip(names, await asyncio.gather(*(self._encode(collection, n, query) for n in names))))

    async def _encode(self, collection, name: str, query: str):
        cacheable = self.cache is not None and name in ("dense", "multivector")  # model outputs, not word counts
        key = self.encodings.key(collection.name, name, query) if cacheable else None
        if key is not None and (cached := await self.encodings.get(key)) is not None:
            return cached
        rep = await self.batcher.submit((collection.name, name), functools.partial(collection.encode_queries, name),
                                        query)
        if key is not None:
            await self.encodings.put(key, rep)
        return rep


class Servicer:
    def __init__(self, sieve: Sieve):
        self.sieve = sieve


class SearchServicer(Servicer):
    @rpc
    async def Search(self, request, context):
        return await self.search(request)

    @rpc
    async def SearchBatch(self, request, context):
        limit = self.sieve.config.max_batch_searches
        if not 1 <= len(request.searches) <= limit:
            raise InvalidArgument(f"a batch holds 1..{limit} searches, not {len(request.searches)}")
        searches = []
        for position, search in enumerate(request.searches):
            searches.append(self.search(search, f"search {position} of the batch: "))
        return pb.SearchBatchResponse(results=await asyncio.gather(*searches))

    @rpc
    async def Get(self, request, context):
        collection = self.sieve.collection(request.collection)
        if not 1 <= len(request.ids) <= self.sieve.config.max_batch_documents:
            raise InvalidArgument(f"ask for 1..{self.sieve.config.max_batch_documents} ids, not {len(request.ids)}")
        found, missing, generation = await asyncio.to_thread(collection.get_many, list(request.ids))
        response = pb.GetResponse(documents=[document_message(doc) for doc in found], not_found=missing,
                                  generation=generation)
        self.sieve.check_response_size(response, "documents", "ask for fewer ids")
        return response

    async def search(self, request, where: str = ""):
        try:
            return await self._search(request)
        except SieveError as error:
            if not where:
                raise
            raise type(error)(f"{where}{error}") from None  # which search of a batch failed

    async def _search(self, request):
        sieve = self.sieve
        collection = sieve.collection(request.collection)
        k = sieve.search_arguments(request)
        names = collection.check_retrievers(list(request.retrievers))
        if request.fusion and request.fusion not in ("rrf", "weighted"):
            raise InvalidArgument(f"unknown fusion {request.fusion!r}; choose rrf or weighted")
        spec = filter_spec(request.filter) if request.HasField("filter") else None
        if spec:
            Filter(spec, collection.settings.filterable)  # refused before any work
        cache_key = None
        if sieve.cache is not None:
            cache_key = sieve.cache.key(request, collection.snapshot.generation, k)
            cached = await sieve.cache.get(cache_key)
            if cached is not None:
                return cached
        if request.rerank.HasField("enabled"):
            rerank = request.rerank.enabled
        else:  # reads the collection's evaluation record: off the event loop
            rerank = (await asyncio.to_thread(rerank_default, collection))[0]
        depth = candidate_count(request.rerank, collection.settings, k, sieve.config.max_rerank_passages) \
            if rerank else k
        options = pruning_options(request.rerank, collection.settings) if rerank else None  # checked before work
        async with sieve.searches:
            start = time.perf_counter()
            queries = await sieve.encode(collection, names, request.query)
            encode_ms = (time.perf_counter() - start) * 1000
            result = await asyncio.to_thread(collection.search, queries, depth, request.fusion,
                                             {"multivector": multivector_options(request.multivector)}, spec)
            timings = {"encode": encode_ms, **result.timings_ms}
            response = pb.SearchResponse(generation=result.generation)
            if rerank and result.hits:
                start = time.perf_counter()
                passages = [hit.document.content for hit in result.hits]
                ranked, survivors = await sieve.rerank(collection.settings.reranker, request.query, passages, k,
                                                       options, first_stage=[hit.score for hit in result.hits])
                result.hits = [replace(result.hits[i], score=score) for i, score in ranked]
                timings["rerank"] = (time.perf_counter() - start) * 1000
                response.survivors.extend(survivors)
        for stage, ms in timings.items():
            metrics.STAGE_SECONDS.labels(stage).observe(ms / 1000)
        response.timings_ms.update(timings)
        for hit in result.hits[:k]:
            scored = response.results.add(id=hit.id, score=hit.score)
            if not request.omit_text:
                scored.title, scored.text = hit.document.title, hit.document.text
                scored.metadata.update(hit.document.metadata)
        sieve.check_response_size(response, "results", "lower k or set omit_text and fetch the documents you need")
        if cache_key is not None and result.generation == collection.snapshot.generation:
            await sieve.cache.put(cache_key, response)
        return response

    @rpc
    async def Rerank(self, request, context):
        sieve = self.sieve
        settings = sieve.collection(request.collection).settings if request.collection else CollectionSettings()
        if not request.query.strip():
            raise InvalidArgument("the query is empty")
        if not request.passages:
            raise InvalidArgument("no passages to rerank")
        if len(request.passages) > sieve.config.max_rerank_passages:
            raise InvalidArgument(f"{len(request.passages)} passages; the limit is {sieve.config.max_rerank_passages}")
        if request.k < 0:
            raise InvalidArgument(f"k must be >= 0 (0: all), not {request.k}")
        for position, passage in enumerate(request.passages):
            if not passage.text.strip():
                raise InvalidArgument(f"passage {position} ({passage.id!r}) is empty")
            if len(passage.text) > sieve.config.max_document_chars:
                raise InvalidArgument(f"passage {position} ({passage.id!r}) is longer than "
                                      f"{sieve.config.max_document_chars} characters")
        k = min(request.k or len(request.passages), len(request.passages))
        options = pruning_options(request.options, settings)
        ranked, survivors = await sieve.rerank(settings.reranker, request.query, [p.text for p in request.passages],
                                               k, options)
        response = pb.RerankResponse(survivors=survivors)
        for index, score in ranked[:k]:
            response.results.add(id=request.passages[index].id, score=score, index=index)
        return response


class IngestServicer(Servicer):
    @rpc
    async def Upsert(self, request_iterator, context):
        sieve = self.sieve
        async for request in request_iterator:
            _check_decoded(request)
            collection = sieve.collection(request.collection)
            docs = sieve.documents(request)
            if sieve.pending_batches >= sieve.config.max_pending_batches:
                metrics.INGEST_REJECTED.labels("backpressure").inc()
                raise ResourceExhausted(
                    f"{sieve.pending_batches} batches are being ingested; retry this one later")
            sieve.pending_batches += 1
            try:
                prepared = await asyncio.to_thread(collection.prepare, docs)
                result = await asyncio.to_thread(collection.commit, prepared)
            finally:
                sieve.pending_batches -= 1
            metrics.INGESTED.labels(collection.name).inc(len(docs))
            log.info("%s: committed %d documents (%d pruned), generation %d", collection.name, result.upserted,
                     result.pruned, result.generation)
            await sieve.record(collection)
            yield pb.UpsertResponse(upserted=result.upserted, pruned=result.pruned, generation=result.generation)

    @rpc
    async def Delete(self, request, context):
        collection = self.sieve.collection(request.collection)
        deleted, missing, generation = await asyncio.to_thread(collection.delete, list(request.ids))
        log.info("%s: deleted %d documents, generation %d", collection.name, deleted, generation)
        await self.sieve.record(collection)
        return pb.DeleteResponse(deleted=deleted, not_found=missing, generation=generation)

    @rpc
    async def DeleteByFilter(self, request, context):
        collection = self.sieve.collection(request.collection)
        spec = filter_spec(request.filter) if request.HasField("filter") else None
        if not spec:
            raise InvalidArgument("an empty filter admits every document; drop the collection to remove them all")
        deleted, generation = await asyncio.to_thread(collection.delete_matching, spec)
        log.info("%s: deleted %d documents by filter, generation %d", collection.name, deleted, generation)
        await self.sieve.record(collection)
        return pb.DeleteResponse(deleted=deleted, generation=generation)

    @rpc
    async def ListPruned(self, request, context):
        if request.limit < 0:
            raise InvalidArgument("limit must be >= 0")
        collection = self.sieve.collection(request.collection)
        records = await asyncio.to_thread(collection.pruned, request.limit)
        return pb.ListPrunedResponse(passages=[pb.PrunedPassage(id=i, quality=q) for i, q in records])

    @rpc
    async def Reinstate(self, request, context):
        collection = self.sieve.collection(request.collection)
        if not request.ids:
            raise InvalidArgument("no ids to reinstate")
        result = await asyncio.to_thread(collection.reinstate, list(request.ids))
        return pb.UpsertResponse(upserted=result.upserted, generation=result.generation)


class CollectionServicer(Servicer):
    def _catalog(self) -> Catalog:
        if self.sieve.catalog is None:
            raise Unavailable("the server is still loading its collections; retry shortly")
        return self.sieve.catalog

    @rpc
    async def CreateCollection(self, request, context):
        settings = CollectionSettings.from_dict(from_struct(request.settings, "settings"))
        catalog = self._catalog()
        if catalog.read_only:  # before any model load
            raise ReadOnly("this replica is read-only; create collections on the writer")
        await asyncio.to_thread(check_models, settings, self.sieve.config)
        collection = await asyncio.to_thread(catalog.create, request.name, settings)
        log.info("created collection %s", request.name)
        return await asyncio.to_thread(self.sieve.info, collection)

    @rpc
    async def ListCollections(self, request, context):
        catalog = self._catalog()
        infos = await asyncio.to_thread(lambda: [self.sieve.info(catalog.get(name)) for name in catalog.names()])
        infos += [pb.CollectionInfo(name=name, health=pb.CollectionHealth(state="out of service", problems=[why]))
                  for name, why in sorted(catalog.broken.items())]  # listed, so that an operator sees them
        return pb.ListCollectionsResponse(collections=infos)

    @rpc
    async def DescribeCollection(self, request, context):
        return await asyncio.to_thread(self.sieve.info, self.sieve.collection(request.name))

    @rpc
    async def DropCollection(self, request, context):
        await asyncio.to_thread(self._catalog().drop, request.name)
        log.info("dropped collection %s", request.name)
        metrics.forget_collection(request.name)
        return pb.DropCollectionResponse()

    @rpc
    async def RepairCollection(self, request, context):
        catalog = self._catalog()
        report = await asyncio.to_thread(catalog.repair, request.name)  # logs what it did
        info = await asyncio.to_thread(self.sieve.info, catalog.get(request.name))
        self.sieve.record_health()
        return pb.RepairCollectionResponse(
            collection=info, restored_segments=report.restored_segments, salvaged_documents=report.salvaged_documents,
            lost_documents=report.lost_documents, quarantined=report.quarantined, note=report.note)

    @rpc
    async def CreateSnapshot(self, request, context):
        catalog = self._catalog()
        collection = self.sieve.collection(request.name)
        if catalog.read_only:
            raise ReadOnly("this replica is read-only; snapshot collections on the writer")
        folder = catalog.data_dir / SNAPSHOTS / f"{collection.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder.parent.mkdir(exist_ok=True)
        generation = await asyncio.to_thread(collection.copy_to, folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        log.info("snapshot of %s generation %d at %s", collection.name, generation, folder)
        return pb.SnapshotInfo(collection=collection.name, generation=generation,
                               path=str(folder.relative_to(catalog.data_dir)), bytes=size)

    @rpc
    async def RestoreSnapshot(self, request, context):
        catalog = self._catalog()
        folder = catalog.data_dir / SNAPSHOTS / Path(request.path).name  # only snapshots Sieve made
        if Path(request.path).parent != Path(SNAPSHOTS):
            raise InvalidArgument(f"a snapshot path is {SNAPSHOTS}/<folder>, as CreateSnapshot returned it")
        collection = await asyncio.to_thread(catalog.restore, folder, request.name)
        log.info("restored %s as collection %s (generation %d)", request.path, request.name,
                 collection.snapshot.generation)
        return await asyncio.to_thread(self.sieve.info, collection)

    @rpc
    async def Compact(self, request, context):
        collection = self.sieve.collection(request.name)
        await asyncio.to_thread(collection.compact)
        return await asyncio.to_thread(self.sieve.info, collection)


def handler_kind(request_streaming: bool, response_streaming: bool):
    """The grpc factory for a method handler of this streaming shape."""
    return {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
    }[(request_streaming, response_streaming)]


def _handlers(service: str, servicer) -> grpc.GenericRpcHandler:
    """Method handlers built from the proto descriptor, with a decoder that reports bad bytes."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_cls = getattr(pb, method.input_type.name)
        kind = handler_kind(method.client_streaming, method.server_streaming)
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request_cls.FromString),
            response_serializer=lambda message: message.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(f"sieve.v1.{service}", handlers)


def check_tls_files(config: ServerConfig) -> None:
    """gRPC reports a bad certificate only as "Failed to bind"; OpenSSL says which file and why."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for variable, path in (("SIEVE_TLS_CERT", config.tls_cert), ("SIEVE_TLS_KEY", config.tls_key),
                           ("SIEVE_TLS_CLIENT_CA", config.tls_client_ca)):
        if path and not Path(path).is_file():
            raise StartupError(f"{variable} {path}: no such file")
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as error:
        raise StartupError(f"SIEVE_TLS_CERT {config.tls_cert} and SIEVE_TLS_KEY {config.tls_key} are not a "
                           f"certificate and its private key ({error.reason or error})") from None
    if config.tls_client_ca:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except ssl.SSLError as error:
            raise StartupError(f"SIEVE_TLS_CLIENT_CA {config.tls_client_ca}: not a PEM certificate "
                               f"({error.reason or error})") from None


class Server:
    """A running Sieve: gRPC services, health, reflection; NOT_SERVING while loading and draining."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.sieve = Sieve(config)
        self.health = health_aio.HealthServicer()
        limits = [("grpc.max_receive_message_length", config.max_message_bytes),
                  ("grpc.max_send_message_length", config.max_message_bytes)]
        interceptors = []
        if config.api_keys_file:
            from .auth import ApiKeyInterceptor, load_keys

            try:
                interceptors.append(ApiKeyInterceptor(load_keys(config.api_keys_file)))
            except OSError as error:
                raise StartupError(f"SIEVE_API_KEYS_FILE {config.api_keys_file}: {error.strerror}") from None
            except ValueError as error:  # the message names the file and line
                raise StartupError(f"SIEVE_API_KEYS_FILE {error}") from None
        # no port reuse: a second server on a used port must fail, not share the port with the first
        self.grpc = grpc.aio.server(options=[*limits, ("grpc.so_reuseport", 0)], interceptors=interceptors)
        servicers = {"SearchService": SearchServicer, "IngestService": IngestServicer,
                     "CollectionService": CollectionServicer}
        self.grpc.add_generic_rpc_handlers([_handlers(name, cls(self.sieve)) for name, cls in servicers.items()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = [f"sieve.v1.{s}" for s in SERVICES]
        reflection.enable_server_reflection(names + [reflection.SERVICE_NAME, "grpc.health.v1.Health"], self.grpc)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            check_tls_files(config)
            read = lambda path: Path(path).read_bytes()  # noqa: E731
            credentials = grpc.ssl_server_credentials(
                [(read(config.tls_key), read(config.tls_cert))],
                root_certificates=read(config.tls_client_ca) if config.tls_client_ca else None,
                require_client_auth=bool(config.tls_client_ca))
            self.port = self.grpc.add_secure_port(address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")

    async def _set_health(self, status) -> None:
        for name in ("", *(f"sieve.v1.{s}" for s in SERVICES)):
            await self.health.set(name, status)
        metrics.READY.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        log.info("listening on %s:%d; loading collections from %s", self.config.host, self.port, self.config.data)
        await asyncio.to_thread(self.sieve.load)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %d collection(s)", len(self.sieve.catalog.names()))
        self.background = []
        if self.config.read_only:
            self.background.append(asyncio.create_task(self._follow_writer()))
        elif self.sieve.redis is not None:
            from .queue import QueueConsumer

            self.consumer = QueueConsumer(self.sieve.redis, self.sieve, claim_idle_ms=self.config.queue_claim_idle_ms)
            self.background.append(asyncio.create_task(self.consumer.run()))
        if self.sieve.redis is not None:
            self.background.append(asyncio.create_task(self._watch_redis()))
        import torch

        if torch.cuda.is_available():
            self.background.append(asyncio.create_task(self._watch_gpu(torch)))

    async def _watch_gpu(self, torch) -> None:
        while True:
            for device in range(torch.cuda.device_count()):
                metrics.GPU_MEMORY_BYTES.labels(str(device)).set(torch.cuda.memory_allocated(device))
            await asyncio.sleep(5)

    async def _follow_writer(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_seconds)
            try:
                await asyncio.to_thread(self.sieve.catalog.refresh)
            except Exception:  # a half-written generation reads next time
                log.exception("refresh failed; serving the generation already loaded")
            for name, collection in list(self.sieve.catalog.collections.items()):
                metrics.COLLECTION_GENERATION.labels(name).set(collection.snapshot.generation)

    async def _watch_redis(self) -> None:
        """`sieve.redis` in the health service: NOT_SERVING while Redis is away (searches go on)."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            await self.sieve.redis.call("ping")
            await self.health.set("sieve.redis", serving if self.sieve.redis.available else not_serving)
            await asyncio.sleep(1)

    async def stop(self, grace: float | None = None) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in getattr(self, "background", []):
            task.cancel()
        await self.grpc.stop(self.config.drain_seconds if grace is None else grace)
        if self.sieve.redis is not None:
            await self.sieve.redis.close()


def setup_tracing(endpoint: str) -> None:
    """OpenTelemetry spans for every gRPC call, exported over OTLP (the `otel` extra)."""
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise SystemExit(f"SIEVE_OTEL_ENDPOINT is set but OpenTelemetry is not installed "
                         f"(pip install 'sieve[otel]'): {error}")
    provider = TracerProvider(resource=Resource.create({"service.name": "sieve"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorServer().instrument()


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight requests."""
    if config.otel_endpoint:
        setup_tracing(config.otel_endpoint)
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, addr=config.host)
    server = Server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    await stop.wait()
    log.info("draining for up to %.0f s", config.drain_seconds)
    await server.stop()
