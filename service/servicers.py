"""The gRPC servicers: protobuf in, engine call, protobuf out. Nothing else happens here.

Errors are the engine's (statuses by service/rpc.py); the one check of their own is the response size,
which is a limit of the transport.
"""
from __future__ import annotations

from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from sieve.index.documents import Document
from sieve.index.errors import InvalidArgument, ResourceExhausted
from sieve.v1 import sieve_pb2 as pb

from .client import corpus_statistics, document_message, encoded_query, filter_spec, statistics_message
from .engine import BaseEngine, CollectionInfo, RerankOptions, SearchQuery, SearchResult
from .rpc import check_decoded, rpc


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


def rerank_options(message: pb.RerankOptions) -> RerankOptions:
    return RerankOptions(
        enabled=message.enabled if message.HasField("enabled") else None,
        candidates=message.candidates,
        prune=message.prune if message.HasField("prune") else True,
        margin=message.margin if message.HasField("margin") else None,
        margins=dict(message.margins),
        checkpoints=tuple(message.checkpoints),
    )


def search_query(request: pb.SearchRequest) -> SearchQuery:
    return SearchQuery(
        collection=request.collection,
        text=request.query,
        k=request.k if request.HasField("k") else None,
        retrievers=tuple(request.retrievers),
        fusion=request.fusion,
        filter=(filter_spec(request.filter) or None) if request.HasField("filter") else None,
        rerank=rerank_options(request.rerank),
        multivector=multivector_options(request.multivector),
        allow_partial=request.allow_partial,
    )


def multivector_options(message: pb.MultiVectorOptions) -> dict:
    return {option.name: value for option, value in message.ListFields()}


def collection_info(info: CollectionInfo) -> pb.CollectionInfo:
    health = pb.CollectionHealth(state=info.state, problems=info.health.problems, kept_files=info.health.kept_files,
                                 quarantined=info.health.quarantined)
    if not info.stats:  # out of service: nothing but the reason
        return pb.CollectionInfo(name=info.name, health=health)
    stats = dict(info.stats)
    details = stats.pop("details")
    return pb.CollectionInfo(name=info.name, settings=to_struct(info.settings),
                             stats=pb.CollectionStats(**stats, details=to_struct(details)), health=health)


class Servicer:
    def __init__(self, engine: BaseEngine):
        self.engine = engine

    def check_size(self, response, what: str, advice: str):
        size, limit = response.ByteSize(), self.engine.config.max_message_bytes
        if size > limit:
            raise ResourceExhausted(f"the {what} come to {size} bytes, above the server's message limit ({limit}); "
                                    f"{advice}")
        return response


class SearchServicer(Servicer):
    def search_response(self, result: SearchResult, omit_text: bool) -> pb.SearchResponse:
        response = pb.SearchResponse(generation=result.generation, survivors=result.survivors,
                                     shard_generations=result.shard_generations, partial=bool(result.missing_shards),
                                     missing_shards=result.missing_shards)
        response.timings_ms.update(result.timings_ms)
        for hit in result.hits:
            scored = response.results.add(id=hit.id, score=hit.score)
            if not omit_text:
                scored.title, scored.text = hit.document.title, hit.document.text
                scored.metadata.update(hit.document.metadata)
        return response

    @rpc
    async def Search(self, request, context):
        response = self.search_response(await self.engine.search(search_query(request)), request.omit_text)
        return self.check_size(response, "results", "lower k or set omit_text and fetch the documents you need")

    @rpc
    async def SearchBatch(self, request, context):
        results = await self.engine.search_batch([search_query(search) for search in request.searches])
        response = pb.SearchBatchResponse(results=[self.search_response(result, search.omit_text)
                                                   for result, search in zip(results, request.searches)])
        return self.check_size(response, "results", "send fewer searches, lower k or set omit_text")

    @rpc
    async def Rerank(self, request, context):
        ranked = await self.engine.rerank(request.query, [p.text for p in request.passages], request.k,
                                          rerank_options(request.options), request.collection)
        response = pb.RerankResponse(survivors=ranked.survivors)
        for index, score in ranked.ranked:
            response.results.add(id=request.passages[index].id, score=score, index=index)
        return response

    @rpc
    async def Get(self, request, context):
        found, missing, generation = await self.engine.get(request.collection, list(request.ids))
        response = pb.GetResponse(documents=[document_message(doc) for doc in found], not_found=missing,
                                  generation=generation)
        return self.check_size(response, "documents", "ask for fewer ids")


class IngestServicer(Servicer):
    @staticmethod
    def documents(request: pb.UpsertRequest) -> list[Document]:
        return [Document(message.id, message.text, message.title,
                         from_struct(message.metadata, f"document {position} ({message.id!r}): metadata"))
                for position, message in enumerate(request.documents)]

    @rpc
    async def Upsert(self, request_iterator, context):
        async for request in request_iterator:
            check_decoded(request)
            result = await self.engine.upsert(request.collection, self.documents(request))
            yield pb.UpsertResponse(upserted=result.upserted, pruned=result.pruned, generation=result.generation)

    @rpc
    async def Delete(self, request, context):
        deleted, missing, generation = await self.engine.delete(request.collection, list(request.ids))
        return pb.DeleteResponse(deleted=deleted, not_found=missing, generation=generation)

    @rpc
    async def DeleteByFilter(self, request, context):
        spec = filter_spec(request.filter) if request.HasField("filter") else None
        deleted, generation = await self.engine.delete_by_filter(request.collection, spec)
        return pb.DeleteResponse(deleted=deleted, generation=generation)

    @rpc
    async def ListPruned(self, request, context):
        records = await self.engine.pruned(request.collection, request.limit)
        return pb.ListPrunedResponse(passages=[pb.PrunedPassage(id=i, quality=q) for i, q in records])

    @rpc
    async def Reinstate(self, request, context):
        result = await self.engine.reinstate(request.collection, list(request.ids))
        return pb.UpsertResponse(upserted=result.upserted, generation=result.generation)

    @rpc
    async def ImportSegments(self, request, context):
        result = await self.engine.import_segments(request.collection, request.job, list(request.segments))
        return pb.UpsertResponse(upserted=result.upserted, pruned=result.pruned, generation=result.generation)


class CollectionServicer(Servicer):
    @rpc
    async def CreateCollection(self, request, context):
        settings = from_struct(request.settings, "settings")
        return collection_info(await self.engine.create_collection(request.name, settings))

    @rpc
    async def ListCollections(self, request, context):
        return pb.ListCollectionsResponse(collections=[collection_info(info)
                                                       for info in await self.engine.list_collections()])

    @rpc
    async def DescribeCollection(self, request, context):
        return collection_info(await self.engine.describe(request.name))

    @rpc
    async def DropCollection(self, request, context):
        await self.engine.drop(request.name)
        return pb.DropCollectionResponse()

    @rpc
    async def RepairCollection(self, request, context):
        report, info = await self.engine.repair(request.name)
        return pb.RepairCollectionResponse(
            collection=collection_info(info), restored_segments=report.restored_segments,
            salvaged_documents=report.salvaged_documents, lost_documents=report.lost_documents,
            quarantined=report.quarantined, note=report.note)

    @rpc
    async def CreateSnapshot(self, request, context):
        snapshot = await self.engine.snapshot(request.name, request.target)
        return pb.SnapshotInfo(collection=snapshot.collection, generation=snapshot.generation, path=snapshot.path,
                               bytes=snapshot.bytes, url=snapshot.url)

    @rpc
    async def RestoreSnapshot(self, request, context):
        return collection_info(await self.engine.restore(request.path, request.name))

    @rpc
    async def Compact(self, request, context):
        return collection_info(await self.engine.compact(request.name))


def encoded_queries(messages) -> dict:
    return {name: encoded_query(message) for name, message in messages.items()}


class ShardServicer(Servicer):
    """The internal phases a router asks of every shard (served by an Engine, not by a router)."""

    @rpc
    async def Statistics(self, request, context):
        found, generation = await self.engine.statistics(request.collection, request.query, tuple(request.retrievers),
                                                         encoded_queries(request.encoded))
        return pb.ShardStatisticsResponse(statistics={name: statistics_message(corpus) for name, corpus in found.items()},
                                          generation=generation)

    @rpc
    async def Candidates(self, request, context):
        rankings, generation, timings = await self.engine.candidates(
            request.collection, request.query, tuple(request.retrievers), request.depth,
            (filter_spec(request.filter) or None) if request.HasField("filter") else None,
            multivector_options(request.multivector),
            {name: corpus_statistics(message) for name, message in request.statistics.items()},
            encoded_queries(request.encoded))
        response = pb.ShardCandidatesResponse(generation=generation, timings_ms=timings)
        for name, ranking in rankings.items():
            response.rankings[name].ids.extend(doc_id for doc_id, _ in ranking)
            response.rankings[name].scores.extend(score for _, score in ranking)
        return self.check_size(response, "candidates", "ask for a smaller depth")


SERVICERS = {"SearchService": SearchServicer, "IngestService": IngestServicer, "CollectionService": CollectionServicer,
             "ShardService": ShardServicer}
