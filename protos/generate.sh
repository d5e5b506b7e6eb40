#!/usr/bin/env bash
# Regenerate the Python stubs for the gRPC contract (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. sieve/v1/sieve.proto
