"""API keys with read and write scopes, checked before any handler runs.

Keys come from a file of lines `<key> <scope>` (scope: read or write; write includes read) and are
sent as `authorization: Bearer <key>` or `x-api-key: <key>`. Health and reflection stay open, so
that probes work; refusals never say which keys exist.
"""
from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from .rpc import handler_kind

READ_METHODS = {
    "/sieve.v1.SearchService/Search", "/sieve.v1.SearchService/Rerank", "/sieve.v1.SearchService/SearchBatch",
    "/sieve.v1.SearchService/Get",
    "/sieve.v1.CollectionService/ListCollections", "/sieve.v1.CollectionService/DescribeCollection",
    "/sieve.v1.IngestService/ListPruned",
    "/sieve.v1.ShardService/Statistics", "/sieve.v1.ShardService/Candidates",  # a router's reads
}
SCOPES = ("read", "write")


def load_keys(path: str | Path) -> dict[str, str]:
    keys = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in SCOPES or len(parts[0]) < 16:
            raise ValueError(f"{path}:{number}: expected '<key of 16+ characters> read|write'")
        keys[parts[0]] = parts[1]
    if not keys:
        raise ValueError(f"{path}: no keys")
    return keys


def _presented_key(metadata) -> str:
    for key, value in metadata or ():
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key":
            return value.strip()
    return ""


def _refusal(handler, code: grpc.StatusCode, message: str):
    async def refuse(request, context):
        await context.abort(code, message)

    kind = handler_kind(handler.request_streaming, handler.response_streaming)
    return kind(refuse, request_deserializer=None, response_serializer=None)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: dict[str, str]):
        self.keys = keys

    def scope_of(self, presented: str) -> str | None:
        match = None
        for key, scope in self.keys.items():  # compare with every key, in constant time each
            if hmac.compare_digest(key.encode(), presented.encode()):
                match = scope
        return match

    async def intercept_service(self, continuation, details):
        method = details.method
        if not method.startswith("/sieve.v1."):
            return await continuation(details)  # health and reflection
        handler = await continuation(details)
        if handler is None:
            return None
        presented = _presented_key(details.invocation_metadata)
        scope = self.scope_of(presented) if presented else None
        if scope is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid API key (send 'authorization: Bearer <key>')")
        if method not in READ_METHODS and scope != "write":
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, "this API key may only read")
        return handler
