"""Shared fixtures: real datasets, a real server process on a loopback port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sieve.index.documents import Document, read_jsonl

DATASETS = Path(os.environ.get("SIEVE_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"dataset {path} is not available")
    return path


def corpus(name: str) -> list[Document]:
    return [doc for doc in read_jsonl(dataset(name) / "corpus.jsonl") if isinstance(doc, Document)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`sieve serve` in a child process, as a user runs it."""

    def __init__(self, data: Path, env: dict | None = None):
        self.data = data
        self.port = free_port()
        self.env = {**os.environ, "SIEVE_DATA": str(data), "SIEVE_PORT": str(self.port),
                    "SIEVE_HOST": "127.0.0.1", "SIEVE_DRAIN_SECONDS": "2", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.log = data.parent / f"server-{self.port}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "ServerProcess":
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        import grpc

        self.process = subprocess.Popen([sys.executable, "-m", "sieve.service.cli", "serve"], env=self.env,
                                        stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.time() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early: {self.log.read_text()[-2000:]}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return self
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not serving after {timeout} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=30)
        return self.process.returncode if self.process else 0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server") / "data").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    from sieve.service.client import SieveClient

    with SieveClient(server.target) as c:
        yield c
