"""Start-up guards for `sieve serve`: one writer per data directory, one server per port."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from .config import ServerConfig, StartupError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def writer_lock(config: ServerConfig):
    """Hold an exclusive lock on the data directory while the writer runs; read replicas take none.

    flock is released by the kernel when the process ends, even on SIGKILL, so a crash never leaves
    a stale lock behind.
    """
    if config.read_only:
        yield
        return
    directory = Path(config.data)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise StartupError(f"{directory} already has a writer (pid {holder}); one writer per data directory: "
                               f"stop it, or start this server as a read replica (SIEVE_READ_ONLY=true)") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def check_port_free(host: str, port: int, variable: str) -> None:
    """Refuse a port something already listens on, with the reason (gRPC itself only says "Failed to bind")."""
    if not port:
        return
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no clash
            probe.bind(address)
    except OSError as error:
        reason = ("address in use; is another server running there? stop it or choose another port"
                  if error.errno == errno.EADDRINUSE else error.strerror.lower())
        raise StartupError(f"cannot listen on {host}:{port} ({variable}): {reason}") from None
