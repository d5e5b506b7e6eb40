"""Container health check: asks the server's standard gRPC health service, exits 0 when SERVING.

    python /opt/sieve/healthcheck.py [SERVICE]

Docker's HEALTHCHECK runs it with no argument (the whole server). SERVICE names one entry of the
health service instead: sieve.v1.SearchService, sieve.v1.IngestService, sieve.v1.CollectionService,
or sieve.redis (NOT_SERVING while Redis is unreachable, though the server itself keeps serving).
It needs nothing beyond the grpcio-health-checking package Sieve already depends on, so images
download no probe binary. It reads the server's own settings: SIEVE_PORT, and with SIEVE_TLS_CERT it
speaks TLS, trusting SIEVE_HEALTHCHECK_CA (default: the server certificate itself, right for a
self-signed one) and, for mutual TLS, presenting SIEVE_HEALTHCHECK_CERT / SIEVE_HEALTHCHECK_KEY.
"""
from __future__ import annotations

import os
import sys


def _read(path_variable: str, default: str | None = None) -> bytes | None:
    path = os.environ.get(path_variable, default or "")
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def grpc_serving(service: str = "", timeout: float = 3.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{os.environ.get('SIEVE_PORT', '50051')}"
    if os.environ.get("SIEVE_TLS_CERT"):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read("SIEVE_HEALTHCHECK_CA", os.environ["SIEVE_TLS_CERT"]),
            private_key=_read("SIEVE_HEALTHCHECK_KEY"),
            certificate_chain=_read("SIEVE_HEALTHCHECK_CERT"))
        # The certificate names the service's public host, not 127.0.0.1.
        name = os.environ.get("SIEVE_HEALTHCHECK_SERVER_NAME", "localhost")
        channel = grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:  # NOT_FOUND: the server knows no such service name
            print(f"unhealthy: {error.code().name} {error.details()}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"unhealthy: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
    return serving


if __name__ == "__main__":
    if len(sys.argv) > 2 or sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit(__doc__)
    sys.exit(0 if grpc_serving(*sys.argv[1:2]) else 1)
