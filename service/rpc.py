"""gRPC plumbing shared by every servicer: errors to statuses, deadlines, request ids, metrics, handlers.

A servicer method decorated with `rpc` raises Sieve's errors (index/errors.py); they leave as one precise
status with their message, anything else as INTERNAL with the request id (and the traceback in the log).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import uuid

import grpc
from google.protobuf.message import DecodeError

from sieve.index.errors import (AlreadyExists, CorruptIndex, FailedPrecondition, InvalidArgument, NotFound, ReadOnly,
                                ResourceExhausted, SieveError, Unavailable)
from sieve.v1 import sieve_pb2 as pb

from . import metrics
from .logs import request_id

log = logging.getLogger("sieve.service")

STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    CorruptIndex: grpc.StatusCode.FAILED_PRECONDITION,
    ReadOnly: grpc.StatusCode.FAILED_PRECONDITION,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (e.g. invalid UTF-8 in a string)."""

    def __init__(self, error: Exception):
        self.error = error


def lenient(parse):
    def parse_or_mark(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            return _Undecodable(error)
    return parse_or_mark


def check_decoded(request) -> None:
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

    @contextlib.asynccontextmanager
    async def accounted(context):
        _take_request_id(context)
        start = time.perf_counter()
        metrics.INFLIGHT.inc()
        try:
            yield
            metrics.REQUESTS.labels(name, "OK").inc()
        except Exception as error:
            await fail(context, error)
        finally:
            metrics.INFLIGHT.dec()
            metrics.REQUEST_SECONDS.labels(name).observe(time.perf_counter() - start)

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            async with accounted(context):
                async for response in method(self, request, context):
                    yield response
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        async with accounted(context):
            check_decoded(request)
            return await asyncio.wait_for(method(self, request, context), context.time_remaining())
    return unary


def handler_kind(request_streaming: bool, response_streaming: bool):
    """The grpc factory for a method handler of this streaming shape."""
    return {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
    }[(request_streaming, response_streaming)]


def generic_handler(service: str, servicer) -> grpc.GenericRpcHandler:
    """Method handlers built from the proto descriptor, with a decoder that reports bad bytes."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_cls = getattr(pb, method.input_type.name)
        kind = handler_kind(method.client_streaming, method.server_streaming)
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=lenient(request_cls.FromString),
            response_serializer=lambda message: message.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(f"sieve.v1.{service}", handlers)


