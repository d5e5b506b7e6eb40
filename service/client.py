"""A small Python client for Sieve's gRPC API (the CLI, tests and benchmarks use it)."""
from __future__ import annotations

import io
from typing import Iterable, Iterator

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from sieve.index.documents import Document
from sieve.index.errors import InvalidArgument
from sieve.index.lexical import CorpusStatistics
from sieve.v1 import sieve_pb2 as pb
from sieve.v1 import sieve_pb2_grpc as rpc


def document_message(doc: Document) -> pb.Document:
    metadata = Struct()
    metadata.update(doc.metadata)
    return pb.Document(id=doc.id, title=doc.title, text=doc.text, metadata=metadata)


def document_of(message: pb.Document) -> Document:
    """The inverse of document_message."""
    return Document(message.id, message.text, message.title, struct_dict(message.metadata))


def plain_numbers(value):
    """protobuf Structs hold every number as a double: 32.0 is the setting 32, 1968.0 the year 1968."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: plain_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_numbers(item) for item in value]
    return value


def struct_dict(struct: Struct) -> dict:
    return plain_numbers(json_format.MessageToDict(struct))


def filter_message(spec: dict) -> pb.Filter:
    """A pb.Filter from the plain form of index/filters.py ({"must": [{"field": "tenant", "match": "a"}]})."""
    def wrap(condition: dict) -> dict:
        if "ids" in condition:
            return {"ids": {"ids": condition["ids"]}}
        if set(condition) & {"must", "should", "must_not"}:
            return {"filter": {clause: [wrap(c) for c in conditions] for clause, conditions in condition.items()}}
        return condition

    try:
        return json_format.ParseDict({clause: [wrap(c) for c in conditions] for clause, conditions in spec.items()},
                                     pb.Filter())
    except json_format.ParseError as error:
        raise ValueError(f"not a filter: {error}") from None


def filter_spec(message: pb.Filter) -> dict:
    """The plain form of a pb.Filter (the inverse of filter_message), as the index evaluates it."""
    try:
        spec = json_format.MessageToDict(message, preserving_proto_field_name=True)
    except ValueError:
        raise InvalidArgument("the filter holds NaN or an infinity") from None

    def unwrap(condition: dict) -> dict:
        if "ids" in condition:
            return {"ids": condition["ids"].get("ids", [])}
        if "filter" in condition:
            return {clause: [unwrap(c) for c in conditions] for clause, conditions in condition["filter"].items()}
        return condition

    return {clause: [unwrap(c) for c in conditions] for clause, conditions in spec.items()}


def statistics_message(corpus: CorpusStatistics) -> pb.CorpusStatistics:
    return pb.CorpusStatistics(documents=corpus.documents, length=corpus.length, frequencies=corpus.frequencies)


def corpus_statistics(message: pb.CorpusStatistics) -> CorpusStatistics:
    return CorpusStatistics(message.documents, message.length, dict(message.frequencies))


def array_bytes(array: np.ndarray) -> bytes:
    """An array in .npy format: no pickle crosses the wire or comes back from a cache."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def bytes_array(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def encoded_message(encoded) -> pb.EncodedQuery:
    """A retriever's query representation on the wire: an array, or lexical term weights."""
    if isinstance(encoded, dict):
        return pb.EncodedQuery(terms=pb.TermWeights(weights=encoded))
    return pb.EncodedQuery(array=array_bytes(encoded))


def encoded_query(message: pb.EncodedQuery):
    if message.WhichOneof("form") == "terms":
        return dict(message.terms.weights)
    try:
        return bytes_array(message.array)
    except ValueError as error:
        raise InvalidArgument(f"an encoded query is not a .npy array: {error}") from None


def search_options(retrievers: Iterable[str] = (), fusion: str = "", rerank: bool | None = None,
                   filter: dict | None = None) -> dict:
    """SearchRequest fields from plain options; empty or None keeps the collection's default."""
    fields = {"retrievers": list(retrievers), "fusion": fusion}
    if rerank is not None:
        fields["rerank"] = pb.RerankOptions(enabled=rerank)
    if filter:
        fields["filter"] = filter_message(filter)
    return fields


class SieveClient:
    def __init__(self, target: str = "127.0.0.1:50051", api_key: str = "", root_certificates: bytes | None = None,
                 certificate_chain: bytes | None = None, private_key: bytes | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if root_certificates:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channel = grpc.secure_channel(target, credentials, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.search_stub = rpc.SearchServiceStub(self.channel)
        self.ingest_stub = rpc.IngestServiceStub(self.channel)
        self.collections_stub = rpc.CollectionServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SieveClient":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def wait_ready(self, timeout: float = 60) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def search(self, collection: str, query: str, k: int | None = None, timeout: float | None = 30,
               **fields) -> pb.SearchResponse:
        """`fields`: any SearchRequest field; `filter` may be given in its plain form (a dict)."""
        if isinstance(fields.get("filter"), dict):
            fields["filter"] = filter_message(fields["filter"])
        request = pb.SearchRequest(collection=collection, query=query, **fields)
        if k is not None:
            request.k = k
        return self.search_stub.Search(request, timeout=timeout, metadata=self.metadata)

    def rerank(self, query: str, passages: list[tuple[str, str]], k: int = 0, timeout: float | None = 60,
               **fields) -> pb.RerankResponse:
        request = pb.RerankRequest(query=query, k=k, passages=[pb.Passage(id=i, text=t) for i, t in passages],
                                   **fields)
        return self.search_stub.Rerank(request, timeout=timeout, metadata=self.metadata)

    def upsert(self, collection: str, batches: Iterable[list[Document]],
               timeout: float | None = None) -> list[pb.UpsertResponse]:
        """Send batches and wait for all; one acknowledgement per committed batch, in order."""
        return list(self.upsert_stream(collection, batches, timeout))

    def upsert_stream(self, collection: str, batches: Iterable[list[Document]],
                      timeout: float | None = None) -> Iterator[pb.UpsertResponse]:
        """Stream batches lazily; yields each acknowledgement as its batch commits."""
        requests = (pb.UpsertRequest(collection=collection, documents=[document_message(d) for d in batch])
                    for batch in batches)
        return self.ingest_stub.Upsert(requests, timeout=timeout, metadata=self.metadata)

    def import_segments(self, collection: str, job: str, segments: list[str],
                        timeout: float | None = 3600) -> pb.UpsertResponse:
        return self.ingest_stub.ImportSegments(pb.ImportSegmentsRequest(collection=collection, job=job,
                                                                        segments=segments),
                                               timeout=timeout, metadata=self.metadata)

    def delete(self, collection: str, ids: list[str]) -> pb.DeleteResponse:
        return self.ingest_stub.Delete(pb.DeleteRequest(collection=collection, ids=ids), metadata=self.metadata)

    def list_pruned(self, collection: str, limit: int = 0) -> pb.ListPrunedResponse:
        return self.ingest_stub.ListPruned(pb.ListPrunedRequest(collection=collection, limit=limit),
                                           metadata=self.metadata)

    def reinstate(self, collection: str, ids: list[str]) -> pb.UpsertResponse:
        return self.ingest_stub.Reinstate(pb.ReinstateRequest(collection=collection, ids=ids), metadata=self.metadata)

    def create_collection(self, name: str, settings: dict | None = None) -> pb.CollectionInfo:
        struct = Struct()
        struct.update(settings or {})
        return self.collections_stub.CreateCollection(pb.CreateCollectionRequest(name=name, settings=struct),
                                                      metadata=self.metadata)

    def list_collections(self) -> pb.ListCollectionsResponse:
        return self.collections_stub.ListCollections(pb.ListCollectionsRequest(), metadata=self.metadata)

    def describe(self, name: str) -> pb.CollectionInfo:
        return self.collections_stub.DescribeCollection(pb.DescribeCollectionRequest(name=name), metadata=self.metadata)

    def drop(self, name: str) -> None:
        self.collections_stub.DropCollection(pb.DropCollectionRequest(name=name), metadata=self.metadata)

    def compact(self, name: str) -> pb.CollectionInfo:
        return self.collections_stub.Compact(pb.CompactRequest(name=name), metadata=self.metadata)

    def get(self, collection: str, ids: list[str]) -> pb.GetResponse:
        return self.search_stub.Get(pb.GetRequest(collection=collection, ids=ids), metadata=self.metadata)

    def search_batch(self, searches: list[pb.SearchRequest], timeout: float | None = 60) -> pb.SearchBatchResponse:
        return self.search_stub.SearchBatch(pb.SearchBatchRequest(searches=searches), timeout=timeout,
                                            metadata=self.metadata)

    def delete_by_filter(self, collection: str, filter: dict) -> pb.DeleteResponse:
        return self.ingest_stub.DeleteByFilter(
            pb.DeleteByFilterRequest(collection=collection, filter=filter_message(filter)), metadata=self.metadata)

    def snapshot(self, name: str, target: str = "", timeout: float | None = 600) -> pb.SnapshotInfo:
        """A snapshot under the server's data directory; with `target` (an fsspec URL), copied there too."""
        return self.collections_stub.CreateSnapshot(pb.CreateSnapshotRequest(name=name, target=target),
                                                    timeout=timeout, metadata=self.metadata)

    def restore(self, path: str, name: str) -> pb.CollectionInfo:
        return self.collections_stub.RestoreSnapshot(pb.RestoreSnapshotRequest(path=path, name=name),
                                                     timeout=600, metadata=self.metadata)

    def repair(self, name: str, timeout: float | None = 600) -> pb.RepairCollectionResponse:
        """Rebuild a degraded or damaged collection from its intact files (re-encoding can take minutes)."""
        return self.collections_stub.RepairCollection(pb.RepairCollectionRequest(name=name), timeout=timeout,
                                                      metadata=self.metadata)
