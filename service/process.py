"""Run `sieve serve` as a child process and wait until it reports SERVING (tests, benchmarks, scripts)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data: Path, env: dict | None = None, port: int | None = None):
        self.data = Path(data)
        self.port = port or free_port()
        self.env = {**os.environ, "SIEVE_DATA": str(data), "SIEVE_PORT": str(self.port),
                    "SIEVE_HOST": "127.0.0.1", "SIEVE_DRAIN_SECONDS": "2", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.log = self.data.parent / f"server-{self.port}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "ServerProcess":
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.data.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-m", "sieve.service.cli", "serve"], env=self.env,
                                        stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.time() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited early: {self.log.read_text()[-2000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
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
            return self.process.wait(timeout=60)
        return self.process.returncode if self.process else 0
