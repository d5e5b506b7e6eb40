"""The server's life cycle: gRPC services, health, reflection, TLS, background tasks, draining.

Requests go to the servicers (service/servicers.py), which call the engine (service/engine.py); the
server only starts, watches and stops them. NOT_SERVING while loading and while draining.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from . import metrics
from .config import ServerConfig, StartupError
from .engine import make_engine
from .rpc import generic_handler
from .servicers import SERVICERS

log = logging.getLogger("sieve.service")


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
        self.engine = make_engine(config)
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
        served = {name: cls for name, cls in SERVICERS.items() if name != "ShardService" or not config.shards}
        self.services = [f"sieve.v1.{name}" for name in served]
        self.grpc.add_generic_rpc_handlers([generic_handler(name, cls(self.engine)) for name, cls in served.items()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(self.services + [reflection.SERVICE_NAME, "grpc.health.v1.Health"],
                                            self.grpc)
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
        for name in ("", *self.services):
            await self.health.set(name, status)
        metrics.READY.set(1 if status == health_pb2.HealthCheckResponse.SERVING else 0)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        log.info("listening on %s:%d; loading collections from %s", self.config.host, self.port, self.config.data)
        await self.engine.open()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.background = []
        if self.config.read_only:
            self.background.append(asyncio.create_task(self._follow_writer()))
        elif self.engine.redis is not None:
            from .queue import QueueConsumer

            self.consumer = QueueConsumer(self.engine, claim_idle_ms=self.config.queue_claim_idle_ms)
            self.background.append(asyncio.create_task(self.consumer.run()))
        if self.engine.redis is not None:
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
                await self.engine.refresh()
            except Exception:  # a half-written generation reads next time
                log.exception("refresh failed; serving the generation already loaded")

    async def _watch_redis(self) -> None:
        """`sieve.redis` in the health service: NOT_SERVING while Redis is away (searches go on)."""
        redis = self.engine.redis
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            await redis.call("ping")
            await self.health.set("sieve.redis", serving if redis.available else not_serving)
            await asyncio.sleep(1)

    async def stop(self, grace: float | None = None) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in getattr(self, "background", []):
            task.cancel()
        await self.grpc.stop(self.config.drain_seconds if grace is None else grace)
        await self.engine.close()


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
