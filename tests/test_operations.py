"""Production operation with real parts: redis-server, TLS, API keys, replicas, crashes, load."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sieve.index.documents import Document
from sieve.service.client import SieveClient
from sieve.service.process import ServerProcess, free_port

from conftest import corpus

needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


class RedisServer:
    """A real redis-server on a loopback port, with an append-only file so a restart keeps the stream."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        for _ in range(100):
            try:
                redis.Redis(port=self.port).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def wait_for(condition, timeout=120, every=0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every)
    raise TimeoutError(f"condition not met in {timeout} s")


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def publish(url: str, collection: str, docs: list[Document], batch: int) -> None:
    from sieve.service.queue import publish as put

    put(url, collection, [docs[i:i + batch] for i in range(0, len(docs), batch)])


@needs_redis
def test_queued_ingestion_survives_kill_9_without_loss_or_duplicates(tmp_path, redis_server):
    docs = corpus("adi")
    env = {"SIEVE_REDIS_URL": redis_server.url, "SIEVE_QUEUE_CLAIM_IDLE_MS": "1500"}
    first = ServerProcess(tmp_path / "data", env).start()
    with SieveClient(first.target) as client:
        client.create_collection("queued", {"indexes": ["bm25"]})
    publish(redis_server.url, "queued", docs, batch=4)  # 21 entries
    with SieveClient(first.target) as client:
        wait_for(lambda: client.describe("queued").stats.documents >= 8, every=0.05)
    first.kill()  # mid-queue: some entries committed, one perhaps committed but not acknowledged
    second = ServerProcess(tmp_path / "data", env).start()
    try:
        with SieveClient(second.target) as client:
            wait_for(lambda: client.describe("queued").stats.documents == len(docs))
            import redis

            r = redis.Redis.from_url(redis_server.url)
            wait_for(lambda: r.xpending("sieve:ingest", "sieve-indexers")["pending"] == 0)
            stats = client.describe("queued").stats
            assert stats.documents == 82  # every acknowledged document, each once (upserts by id)
            hits = client.search("queued", docs[40].title, k=82).results
            assert [h.id for h in hits].count(docs[40].id) == 1
    finally:
        second.stop()


@needs_redis
def test_redis_outage_keeps_searches_and_resumes_queue(tmp_path, redis_server):
    docs = corpus("adi")
    env = {"SIEVE_REDIS_URL": redis_server.url, "SIEVE_METRICS_PORT": str(free_port())}
    server = ServerProcess(tmp_path / "data", env).start()
    try:
        with SieveClient(server.target) as client:
            client.create_collection("c", {"indexes": ["bm25", "dense"], "retrievers": ["bm25"]})
            client.upsert("c", [docs[:10]])
            first = client.search("c", docs[3].title, k=3)
            again = client.search("c", docs[3].title, k=3)
            assert [h.id for h in again.results] == [h.id for h in first.results]
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{env['SIEVE_METRICS_PORT']}/metrics").read().decode()
            assert 'sieve_cache_requests_total{kind="result",result="hit"} 1.0' in metrics
            # A new query of the same text for another k misses the result cache but reuses the encoding.
            client.search("c", docs[3].title, k=4, retrievers=["dense"])
            client.search("c", docs[3].title, k=5, retrievers=["dense"])
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{env['SIEVE_METRICS_PORT']}/metrics").read().decode()
            assert 'sieve_cache_requests_total{kind="encoding",result="hit"} 1.0' in metrics
            # `sieve evaluate` turning reranking on changes the answer without a new generation: not served
            # from the cache (nor would retrained exit heads be).
            (tmp_path / "data" / "c" / "evaluation.json").write_text(json.dumps({
                "queries": 5, "first_stage_ndcg@10": 0.4, "reranked_ndcg@10": 0.5, "measured_at": "2026-12-04"}))
            client.search("c", docs[3].title, k=3)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{env['SIEVE_METRICS_PORT']}/metrics").read().decode()
            assert 'sieve_cache_requests_total{kind="result",result="hit"} 1.0' in metrics
            assert 'sieve_rerank_survivors_count{checkpoint="0"} 1.0' in metrics  # reranked, once
            # A write changes the generation, so the cached answer is not served again.
            client.upsert("c", [[Document(docs[3].id, "replaced: nothing left of the old title")]])
            assert docs[3].id not in [h.id for h in client.search("c", docs[3].title, k=3).results]
            # Nor is one of a dropped collection to the new one of its name, whose generations start again.
            client.drop("c")
            client.create_collection("c", {"indexes": ["bm25", "dense"], "retrievers": ["bm25"]})
            client.upsert("c", [docs[20:30]])
            assert {h.id for h in client.search("c", docs[3].title, k=3).results} <= {d.id for d in docs[20:30]}
            client.drop("c")
            client.create_collection("c", {"indexes": ["bm25", "dense"], "retrievers": ["bm25"]})
            client.upsert("c", [docs[:10]])

            redis_server.stop()
            for doc in docs[:10]:
                assert client.search("c", doc.title, k=1, timeout=5).results  # cache bypassed, no errors
            wait_for(lambda: health(server.target, "sieve.redis") == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert health(server.target) == health_pb2.HealthCheckResponse.SERVING

            redis_server.start()  # same port, same append-only file
            publish(redis_server.url, "c", docs[10:], batch=8)
            wait_for(lambda: client.describe("c").stats.documents == 82)
            wait_for(lambda: health(server.target, "sieve.redis") == health_pb2.HealthCheckResponse.SERVING)
    finally:
        server.stop()


@needs_redis
def test_bad_queue_entries_go_to_dead_letters(tmp_path, redis_server):
    import redis

    server = ServerProcess(tmp_path / "data", {"SIEVE_REDIS_URL": redis_server.url}).start()
    try:
        publish(redis_server.url, "no-such-collection", [Document("a", "text")], batch=1)
        r = redis.Redis.from_url(redis_server.url)
        wait_for(lambda: r.xlen("sieve:ingest:dead") == 1)
        entry = r.xrange("sieve:ingest:dead")[0][1]
        assert b"no collection named 'no-such-collection'" in entry[b"error"]
        # the queue applies the Upsert RPC's checks: one implementation of ingestion
        with SieveClient(server.target) as client:
            client.create_collection("c", {"indexes": ["bm25"]})
        publish(redis_server.url, "c", [Document("big", "x" * 100_001)], batch=1)
        wait_for(lambda: r.xlen("sieve:ingest:dead") == 2)
        assert b"the limit is 100000" in r.xrange("sieve:ingest:dead")[1][1][b"error"]
        wait_for(lambda: r.xpending("sieve:ingest", "sieve-indexers")["pending"] == 0)  # acknowledged
    finally:
        server.stop()


def test_api_keys_guard_every_rpc(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# scopes\nreader-key-0123456789 read\nwriter-key-0123456789 write\n")
    server = ServerProcess(tmp_path / "data", {"SIEVE_API_KEYS_FILE": str(keys)}).start()
    try:
        with SieveClient(server.target, api_key="writer-key-0123456789") as writer:
            writer.create_collection("c", {"indexes": ["bm25"]})
            writer.upsert("c", [[Document("1", "secret plans")]])
        calls = {
            "search": lambda c: c.search("c", "plans"),
            "rerank": lambda c: c.rerank("plans", [("1", "secret plans")]),
            "list": lambda c: c.list_collections(),
            "describe": lambda c: c.describe("c"),
            "pruned": lambda c: c.list_pruned("c"),
            "upsert": lambda c: c.upsert("c", [[Document("2", "more")]]),
            "delete": lambda c: c.delete("c", ["1"]),
            "reinstate": lambda c: c.reinstate("c", ["1"]),
            "create": lambda c: c.create_collection("d"),
            "compact": lambda c: c.compact("c"),
            "drop": lambda c: c.drop("c"),
        }
        writes = {"upsert", "delete", "reinstate", "create", "compact", "drop"}
        for key in ("", "wrong-key-0123456789xx"):
            with SieveClient(server.target, api_key=key) as anonymous:
                for name, call in calls.items():
                    with pytest.raises(grpc.RpcError) as caught:
                        call(anonymous)
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                    assert "reader-key" not in caught.value.details()
        with SieveClient(server.target, api_key="reader-key-0123456789") as reader:
            for name in writes:
                with pytest.raises(grpc.RpcError) as caught:
                    calls[name](reader)
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert reader.search("c", "plans").results[0].id == "1"
        assert health(server.target) == health_pb2.HealthCheckResponse.SERVING  # probes need no key
    finally:
        server.stop()


def make_certificates(directory: Path) -> dict[str, Path]:
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=sieve-test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else 'client'}")
        (directory / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: directory / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_mutual_tls(tmp_path):
    certs = make_certificates(tmp_path)
    env = {"SIEVE_TLS_CERT": str(certs["server.pem"]), "SIEVE_TLS_KEY": str(certs["server.key"]),
           "SIEVE_TLS_CLIENT_CA": str(certs["ca.pem"])}
    server = ServerProcess(tmp_path / "data", env)
    server.port = free_port()
    server.env["SIEVE_PORT"] = str(server.port)
    process = subprocess.Popen([sys.executable, "-m", "sieve.service.cli", "serve"], env=server.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ca = certs["ca.pem"].read_bytes()
        with SieveClient(server.target, root_certificates=ca, certificate_chain=certs["client.pem"].read_bytes(),
                         private_key=certs["client.key"].read_bytes()) as client:
            client.wait_ready(120)
            wait_for(lambda: _lists(client), timeout=120)
            client.create_collection("tls")
        with SieveClient(server.target, root_certificates=ca) as no_client_cert:
            with pytest.raises(grpc.RpcError) as caught:
                no_client_cert.list_collections()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with SieveClient(server.target) as plaintext:
            with pytest.raises(grpc.RpcError):
                plaintext.list_collections()
    finally:
        process.terminate()
        process.wait(timeout=30)


def _lists(client) -> bool:
    try:
        client.list_collections()
        return True
    except grpc.RpcError as error:
        return error.code() != grpc.StatusCode.UNAVAILABLE or "loading" not in (error.details() or "")


def test_read_only_replica_follows_the_writer(tmp_path):
    docs = corpus("adi")
    writer = ServerProcess(tmp_path / "data").start()
    reader = ServerProcess(tmp_path / "data", {"SIEVE_READ_ONLY": "true", "SIEVE_REFRESH_SECONDS": "0.5"}).start()
    try:
        with SieveClient(writer.target) as w, SieveClient(reader.target) as r:
            w.create_collection("shared", {"indexes": ["bm25"]})
            w.upsert("shared", [docs[:30]])
            wait_for(lambda: "shared" in [c.name for c in r.list_collections().collections])
            wait_for(lambda: r.describe("shared").stats.documents == 30)
            w.delete("shared", [docs[0].id])
            wait_for(lambda: r.describe("shared").stats.documents == 29)
            assert docs[0].id not in [h.id for h in r.search("shared", docs[0].title, k=29).results]
            with pytest.raises(grpc.RpcError) as caught:
                r.upsert("shared", [[Document("x", "y")]])
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "read-only" in caught.value.details()
    finally:
        reader.stop()
        writer.stop()


def test_damaged_collection_does_not_stop_the_server(tmp_path):
    docs = corpus("adi")
    server = ServerProcess(tmp_path / "data").start()
    with SieveClient(server.target) as client:
        for name in ("good", "bad"):
            client.create_collection(name, {"indexes": ["bm25"]})
            client.upsert(name, [docs[:20]])
    server.stop()
    segment = next((tmp_path / "data" / "bad" / "segments").iterdir())
    (segment / "bm25.npz").write_bytes(b"truncated")
    for manifest in sorted((tmp_path / "data" / "bad").glob("manifest-*.json"))[:-1]:
        manifest.unlink()
    restarted = ServerProcess(tmp_path / "data").start()  # starts, no crash loop
    try:
        with SieveClient(restarted.target) as client:
            assert client.search("good", docs[2].title, k=1).results[0].id == docs[2].id
            with pytest.raises(grpc.RpcError) as caught:
                client.search("bad", "anything")
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "bm25.npz" in caught.value.details()
        assert "bm25.npz" in restarted.log.read_text()
    finally:
        restarted.stop()


def test_load_mixing_search_and_ingestion(tmp_path):
    """16 clients for a fixed time: zero errors, latency reported, server memory bounded."""
    docs = corpus("adi")
    server = ServerProcess(tmp_path / "data").start()
    errors, latencies = [], []
    with SieveClient(server.target) as client:
        client.create_collection("load")
        client.upsert("load", [docs[:40]])
    stop = time.time() + 20

    def rss_mb() -> float:
        with open(f"/proc/{server.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def worker(n: int) -> None:
        with SieveClient(server.target) as own:
            i = 0
            while time.time() < stop:
                try:
                    start = time.perf_counter()
                    if n % 4 == 0:  # a quarter of the clients write
                        doc = docs[40 + (n * 7 + i) % 42]
                        own.upsert("load", [[Document(doc.id, doc.text, doc.title)]])
                    else:
                        own.search("load", docs[(n + i) % 82].title, k=5, timeout=60)
                    latencies.append(time.perf_counter() - start)
                except grpc.RpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")
                i += 1

    try:
        before = rss_mb()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = rss_mb()
        ms = sorted(x * 1000 for x in latencies)
        print(f"\nload: {len(ms)} requests, p50 {ms[len(ms) // 2]:.0f} ms, p99 {ms[int(len(ms) * 0.99)]:.0f} ms, "
              f"server RSS {before:.0f} -> {after:.0f} MB")
        assert errors == []
        assert len(ms) > 50
        assert after - before < 500
    finally:
        server.stop()
