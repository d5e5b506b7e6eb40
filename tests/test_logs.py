"""Structured logs carry the request id given in gRPC metadata."""
import json

import grpc

from sieve.service.process import ServerProcess
from sieve.v1 import sieve_pb2 as pb
from sieve.v1 import sieve_pb2_grpc as rpc


def test_json_logs_carry_the_callers_request_id(tmp_path):
    server = ServerProcess(tmp_path / "data", {"SIEVE_LOG_FORMAT": "json"}).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = rpc.CollectionServiceStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(name="logged"), metadata=(("x-request-id", "req-42"),))
            _, call = stub.ListCollections.with_call(pb.ListCollectionsRequest(), metadata=(("x-request-id", "req-43"),))
            assert ("x-request-id", "req-43") in call.trailing_metadata()
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e.get("request_id") == "req-42" for e in entries)
