"""Damaged files and full disks: found, reported by relative path, never served, never deleted; repair
brings back every intact acknowledged document. In-process over every file a segment stores."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from sieve.index.catalog import Catalog
from sieve.index.collection import Collection
from sieve.index.documents import Document
from sieve.index.errors import CorruptIndex, ResourceExhausted
from sieve.index.settings import CollectionSettings

from conftest import corpus

SETTINGS = CollectionSettings(indexes=("dense", "bm25"))


@pytest.fixture(scope="module")
def adi():
    return corpus("adi")


def three_batches(tmp_path, adi, settings=SETTINGS):
    """A catalog with collection "c" of three committed batches and a delete (generations 1-4), and "other"."""
    catalog = Catalog(tmp_path)
    collection = catalog.create("c", settings)
    for start in (0, 10, 20):
        collection.upsert(adi[start:start + 10])
        if start == 10:
            collection.delete([adi[3].id])  # a tombstone the repair must keep
    catalog.create("other", CollectionSettings(indexes=("bm25",))).upsert(adi[:5])
    return catalog


def newest_segment(tmp_path):
    return max((tmp_path / "c" / "segments").iterdir())


def segment_files(tmp_path, adi):
    three_batches(tmp_path, adi)
    return sorted(p.name for p in newest_segment(tmp_path).iterdir())


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10  # same size, one bit
    path.write_bytes(bytes(data))


def zero(path):
    data = bytearray(path.read_bytes())
    start = next(i for i in range(len(data) // 3, len(data)) if data[i])  # a range that really changes
    data[start:start + 16] = bytes(len(data[start:start + 16]))
    path.write_bytes(bytes(data))


def live_ids(collection):
    return set(collection.snapshot.id_map)


def everything_on_disk(root):
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", [truncate, flip, zero])
@pytest.mark.parametrize("file", ["docs.jsonl", "dense.npy", "bm25.npz", "ids.json", "offsets.npy", "meta.json",
                                  "rows.xxh3.npy", "bm25.terms.npy"])
def test_damaged_segment_file_is_found_kept_and_repaired(tmp_path, adi, file, damage):
    catalog = three_batches(tmp_path, adi)
    expected = live_ids(catalog.get("c"))
    segment = newest_segment(tmp_path)
    if not (segment / file).exists():
        pytest.skip(f"this build stores no {file}")
    damage(segment / file)
    before = everything_on_disk(tmp_path / "c")

    reopened = Catalog(tmp_path)
    assert live_ids(reopened.get("other")) == {d.id for d in adi[:5]}  # the other collection serves
    collection = reopened.get("c")
    assert collection.health.state == "degraded"
    assert any(f"c/segments/{segment.name}" in p for p in collection.health.problems)
    assert all(str(tmp_path) not in p for p in collection.health.problems)
    assert live_ids(collection) == {d.id for d in adi[:20]} - {adi[3].id}  # the previous generation
    assert everything_on_disk(tmp_path / "c") == before  # nothing deleted
    with pytest.raises(CorruptIndex, match="degraded"):
        collection.upsert([Document("new", "text")])

    report = reopened.repair("c")
    repaired = reopened.get("c")
    assert repaired.health.state == "ok"
    if file == "docs.jsonl":  # the changed rows are lost, every other row is back
        assert 1 <= report.lost_documents <= (10 if damage is truncate else 2)
        assert live_ids(repaired) <= expected and len(live_ids(repaired)) == len(expected) - report.lost_documents
    else:
        assert report.lost_documents == 0 and live_ids(repaired) == expected
    assert report.quarantined == [f"c/quarantine/segments/{segment.name}"]
    assert (tmp_path / "c" / "quarantine" / "segments" / segment.name / file).exists()
    probe = adi[25]
    if probe.id in live_ids(repaired):  # salvaged documents are searchable again, in every index
        for name in ("dense", "bm25"):
            hits = repaired.search({name: repaired.encode_queries(name, [probe.title])[0]}, 3).hits
            assert probe.id in [h.id for h in hits]
    repaired.upsert([Document("after", "writes work again")])
    assert Catalog(tmp_path).get("c").health.state == "ok"


MANIFEST_DAMAGE = {
    "truncated": lambda m: m.write_bytes(m.read_bytes()[:20]),
    "garbage": lambda m: m.write_bytes(os.urandom(300)),
    "empty": lambda m: m.write_bytes(b""),
    "flipped": flip,
    "wrong types, sealed": lambda m: m.write_text(json.dumps({**json.loads(m.read_text()), "deleted": [1, 2, 3]})),
    "wrong types, unsealed": lambda m: m.write_text(json.dumps({"generation": "x", "segments": 5, "deleted": []})),
    "names a missing segment": lambda m: m.write_text(json.dumps(
        {"generation": 4, "segments": ["seg-00000000000000000001"], "deleted": {}})),
}


@pytest.mark.parametrize("kind", MANIFEST_DAMAGE)
def test_damaged_newest_manifest_is_kept_and_repair_restores_every_acknowledged_document(tmp_path, adi, kind):
    catalog = three_batches(tmp_path, adi, CollectionSettings(indexes=("bm25",)))
    expected = live_ids(catalog.get("c"))
    manifest = max((tmp_path / "c").glob("manifest-*.json"))
    MANIFEST_DAMAGE[kind](manifest)
    segments = sorted(p.name for p in (tmp_path / "c" / "segments").iterdir())

    collection = Catalog(tmp_path).get("c")
    assert collection.health.state == "degraded" and f"c/{manifest.name}" in collection.health.problems[0]
    assert sorted(p.name for p in (tmp_path / "c" / "segments").iterdir()) == segments  # nothing deleted
    assert f"c/segments/{segments[-1]}" in collection.health.kept_files or kind == "names a missing segment"

    catalog = Catalog(tmp_path)
    report = catalog.repair("c")
    assert live_ids(catalog.get("c")) == expected and report.lost_documents == 0
    assert f"c/quarantine/{manifest.name}" in report.quarantined
    assert (tmp_path / "c" / "quarantine" / manifest.name).exists()


def test_a_collection_that_cannot_load_at_all_is_isolated_and_repaired(tmp_path, adi):
    three_batches(tmp_path, adi, CollectionSettings(indexes=("bm25",)))
    for manifest in (tmp_path / "c").glob("manifest-*.json"):
        manifest.write_text(json.dumps({"generation": 1, "deleted": {"x": [1]}, "segments": [1, 2, 3]}))
    catalog = Catalog(tmp_path)
    with pytest.raises(CorruptIndex, match=r"sieve collections repair c.*c/manifest-\d+\.json") as caught:
        catalog.get("c")
    assert str(tmp_path) not in str(caught.value)
    assert live_ids(catalog.get("other"))
    catalog.repair("c")  # no manifest reads: every intact segment is replayed in commit order
    assert live_ids(catalog.get("c")) == {d.id for d in adi[:30]}  # the delete was only in the manifests


def test_repair_knows_a_compaction_replaced_what_it_compacted(tmp_path, adi):
    catalog = three_batches(tmp_path, adi, CollectionSettings(indexes=("bm25",)))
    collection = catalog.get("c")
    collection.compact()
    collection.upsert(adi[30:35])
    expected = live_ids(collection)
    flip(max((tmp_path / "c").glob("manifest-*.json")))
    catalog = Catalog(tmp_path)
    catalog.repair("c")
    assert live_ids(catalog.get("c")) == expected and adi[3].id not in expected


def test_an_upsert_in_a_restored_segment_replaces_the_older_version(tmp_path, adi):
    catalog = Catalog(tmp_path)
    collection = catalog.create("c", CollectionSettings(indexes=("bm25",)))
    collection.upsert(adi[:10])
    collection.upsert([Document(adi[2].id, "the second version")])
    truncate(max((tmp_path / "c").glob("manifest-*.json")))
    catalog = Catalog(tmp_path)
    catalog.repair("c")
    assert catalog.get("c").get(adi[2].id).text == "the second version"
    assert len(live_ids(catalog.get("c"))) == 10


def test_temporary_files_of_interrupted_writes_are_cleaned_at_start(tmp_path, adi):
    three_batches(tmp_path, adi, CollectionSettings(indexes=("bm25",)))
    leftovers = [tmp_path / "c" / ".manifest-0000000009.json.0a1b.tmp", tmp_path / "c" / ".tmp-manifest-x.json.1",
                 tmp_path / "c" / "segments" / ".tmp-seg-00000000000000000009", tmp_path / ".tmp-half-created"]
    for path in leftovers:
        path.mkdir() if "seg" in path.name or "half" in path.name else path.write_text("partial")
    Catalog(tmp_path)
    assert not any(path.exists() for path in leftovers)


def test_a_document_changed_on_disk_after_loading_is_a_clear_error(tmp_path, adi):
    collection = three_batches(tmp_path, adi, CollectionSettings(indexes=("bm25",))).get("c")
    docs = newest_segment(tmp_path) / "docs.jsonl"
    docs.write_bytes(b"{" * docs.stat().st_size)  # the file is open: the server reads the new bytes
    with pytest.raises(CorruptIndex, match=r"c/segments/seg-\d+/docs.jsonl: row 0"):
        collection.get(adi[20].id)


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB file system (tmpfs), where the machine allows mounting one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (it makes a real full disk)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def fill(disk, leave: int = 0):
    """Write a file until the disk is full, then give back `leave` bytes."""
    filler = disk / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    except OSError:
        pass
    if leave:
        os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


def test_full_disk_is_resource_exhausted_leaves_nothing_and_recovers(small_disk, adi):
    catalog = Catalog(small_disk)
    collection = catalog.create("c", CollectionSettings(indexes=("bm25",)))
    collection.upsert(adi[:10])
    filler = fill(small_disk)
    before = everything_on_disk(small_disk / "c")
    big = [Document(f"big-{i}", "words " * 20000) for i in range(5)]
    with pytest.raises(ResourceExhausted, match="disk full at the data directory"):
        collection.upsert(big)
    with pytest.raises(ResourceExhausted, match="disk full"):
        catalog.create("d", CollectionSettings(indexes=("bm25",)))
    assert everything_on_disk(small_disk / "c") == before  # nothing of the failed write is left
    assert not (small_disk / "d").exists()
    assert collection.health.state == "ok"
    filler.unlink()  # space is freed: the next write succeeds without a restart
    collection.upsert(big)
    assert len(live_ids(collection)) == 15
    assert len(live_ids(Catalog(small_disk).get("c"))) == 15


def test_committed_delete_stands_when_the_compaction_after_it_hits_a_full_disk(small_disk, adi):
    catalog = Catalog(small_disk)
    collection = catalog.create("c", CollectionSettings(indexes=("bm25",)))
    collection.upsert(adi[:40])
    filler = fill(small_disk, leave=8192)  # room for a manifest, not for the compacted segment
    deleted, _, generation = collection.delete([d.id for d in adi[:20]])  # > 30% deleted: compaction runs, fails
    assert deleted == 20
    assert collection.health.housekeeping_failures >= 1
    assert not any(p.name.startswith(".tmp-") for p in (small_disk / "c" / "segments").iterdir())
    assert len(live_ids(Catalog(small_disk).get("c"))) == 20  # the delete was committed
    filler.unlink()
    collection.upsert([Document("after", "space again")])
    assert collection.stats()["segments"] == 1  # compaction ran once space was back


# Through a real server ---------------------------------------------------------------------------
def test_server_isolates_damage_reports_it_and_repairs_over_grpc(tmp_path, adi):
    import grpc

    from sieve.service.client import SieveClient
    from sieve.service.process import ServerProcess

    data = tmp_path / "data"
    server = ServerProcess(data).start()
    with SieveClient(server.target) as client:
        for name in ("good", "bad", "lost"):
            client.create_collection(name, {"indexes": ["bm25"]})
            for start in (0, 10, 20):
                client.upsert(name, [adi[start:start + 10]])
    server.stop()
    flip(max((data / "bad" / "segments").iterdir()) / "docs.jsonl")
    for manifest in (data / "lost").glob("manifest-*.json"):  # wrong types: no generation can load
        manifest.write_text(json.dumps({"generation": 1, "segments": {"a": 1}, "deleted": [1, 2, 3]}))

    server = ServerProcess(data).start()
    try:
        with SieveClient(server.target) as client:
            assert client.search("good", adi[2].title, k=1).results[0].id == adi[2].id
            info = client.describe("bad")
            assert info.health.state == "degraded" and info.stats.documents == 20
            assert "docs.jsonl: checksum mismatch" in info.health.problems[0] and str(data) not in str(info)
            assert info.health.kept_files[0].startswith("bad/segments/seg-")
            with pytest.raises(grpc.RpcError) as caught:
                client.upsert("bad", [[Document("x", "y")]])
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "sieve collections repair bad" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                client.search("lost", "anything")
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "lost/manifest-" in caught.value.details() and str(data) not in caught.value.details()
            states = {c.name: c.health.state for c in client.list_collections().collections}
            assert states == {"good": "ok", "bad": "degraded", "lost": "out of service"}

            report = client.repair("bad")
            assert report.lost_documents == 1 and report.salvaged_documents == 9
            assert report.collection.health.state == "ok" and report.collection.stats.documents == 29
            report = client.repair("lost")
            assert report.collection.stats.documents == 30
            client.upsert("bad", [[Document("x", "writes work again")]])
            assert client.describe("bad").stats.documents == 30
        assert "bad/segments/seg-" in server.log.read_text()
    finally:
        server.stop()


def test_server_answers_resource_exhausted_on_a_full_disk_and_recovers(small_disk, adi):
    import grpc

    from sieve.service.client import SieveClient
    from sieve.service.process import ServerProcess

    server = ServerProcess(small_disk / "data").start()
    try:
        with SieveClient(server.target) as client:
            client.create_collection("c", {"indexes": ["bm25"]})
            client.upsert("c", [adi[:10]])
            filler = fill(small_disk)
            big = [Document(f"big-{i}", "words " * 15000) for i in range(5)]
            for call in (lambda: client.upsert("c", [big]), lambda: client.delete("c", [adi[0].id]),
                         lambda: client.create_collection("d", {"indexes": ["bm25"]})):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "disk full at the data directory" in caught.value.details()
            filler.unlink()
            client.upsert("c", [big])
            assert client.delete("c", [adi[0].id]).deleted == 1
            assert client.describe("c").stats.documents == 14
    finally:
        server.stop()


# Inputs and model references ---------------------------------------------------------------------
def test_bad_inputs_and_model_references_are_invalid_argument(client, tmp_path):
    import grpc
    from google.protobuf.struct_pb2 import Struct

    from sieve.v1 import sieve_pb2 as pb

    def refused(call, *match):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        for text in match:
            assert text in caught.value.details()

    client.create_collection("inputs", {"indexes": ["bm25"]})
    for settings in ({"bm25_k1": float("nan")}, {"max_tokens": float("inf")}, {"fusion_weights": {"bm25": -float("inf")}}):
        refused(lambda: client.create_collection("x", {"indexes": ["bm25"], **settings}), "NaN or an infinity")
    refused(lambda: client.create_collection("trailing\n", {"indexes": ["bm25"]}), "invalid collection name")
    for setting, value, text in [("encoder", "/etc", "model roots"), ("encoder", "../../../../etc/passwd", "model roots"),
                                 ("reranker", "/etc/passwd", "model roots"),
                                 ("encoder", "some-org/some-model", "SIEVE_ALLOW_HUB_MODELS"),
                                 ("term_weights", "/etc", "model roots")]:
        refused(lambda: client.create_collection("x", {"indexes": ["dense", "bm25"], setting: value}), text)
    assert "x" not in [c.name for c in client.list_collections().collections]

    metadata = Struct()
    metadata.update({"score": float("nan")})
    request = pb.UpsertRequest(collection="inputs", documents=[pb.Document(id="a", text="t", metadata=metadata)])
    refused(lambda: list(client.ingest_stub.Upsert(iter([request]))), "NaN or an infinity")
    big = {"blob": "x" * 100_001}
    refused(lambda: client.upsert("inputs", [[Document("a", "short text", metadata=big)]]), "metadata", "limit")
    refused(lambda: client.search("inputs", "q", rerank=pb.RerankOptions(enabled=True, margin=float("nan"))),
            "finite")


def test_search_response_over_the_message_limit_says_what_to_lower(tmp_path):
    import grpc

    from sieve.service.client import SieveClient
    from sieve.service.process import ServerProcess

    server = ServerProcess(tmp_path / "data", {"SIEVE_MAX_MESSAGE_BYTES": "300000"}).start()
    try:
        with SieveClient(server.target) as client:
            client.create_collection("c", {"indexes": ["bm25"]})
            client.upsert("c", [[Document(f"d{i}", "volcano " * 11000)] for i in range(4)])  # 88 kB each
            with pytest.raises(grpc.RpcError) as caught:
                client.search("c", "volcano", k=4)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "lower k or set omit_text" in caught.value.details()
            assert len(client.search("c", "volcano", k=4, omit_text=True).results) == 4
    finally:
        server.stop()


def serve_exits(tmp_path, env) -> str:
    import sys

    done = subprocess.run([sys.executable, "-m", "sieve.service.cli", "serve"], capture_output=True, text=True,
                          env={**os.environ, "SIEVE_DATA": str(tmp_path / "data"), **env}, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return lines[-1]


def test_start_up_problems_exit_1_with_one_line_naming_the_file(tmp_path):
    import shutil

    from test_operations import make_certificates

    keys = tmp_path / "keys"
    assert serve_exits(tmp_path, {"SIEVE_API_KEYS_FILE": str(keys)}) == \
        f"sieve serve: SIEVE_API_KEYS_FILE {keys}: No such file or directory"
    keys.write_text("short read\n")
    assert f"SIEVE_API_KEYS_FILE {keys}:1: expected" in serve_exits(tmp_path, {"SIEVE_API_KEYS_FILE": str(keys)})
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = make_certificates(tmp_path)
    line = serve_exits(tmp_path, {"SIEVE_TLS_CERT": str(certs["client.pem"]), "SIEVE_TLS_KEY": str(certs["server.key"])})
    assert line.startswith(f"sieve serve: SIEVE_TLS_CERT {certs['client.pem']} and SIEVE_TLS_KEY") and "private key" in line


def test_queued_batches_wait_for_a_repair_instead_of_being_dead_lettered(tmp_path, adi):
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    import redis

    from sieve.service.client import SieveClient
    from sieve.service.process import ServerProcess
    from sieve.service.queue import publish
    from test_operations import RedisServer, wait_for

    queue = RedisServer(tmp_path / "redis").start()
    data = tmp_path / "data"
    server = ServerProcess(data, {"SIEVE_REDIS_URL": queue.url, "SIEVE_QUEUE_CLAIM_IDLE_MS": "1500"}).start()
    try:
        with SieveClient(server.target) as client:
            client.create_collection("c", {"indexes": ["bm25"]})
            client.upsert("c", [adi[:10]])
            client.upsert("c", [adi[10:20]])
        server.stop()
        truncate(max((data / "c").glob("manifest-*.json")))
        server = ServerProcess(data, {"SIEVE_REDIS_URL": queue.url, "SIEVE_QUEUE_CLAIM_IDLE_MS": "1500"}).start()
        publish(queue.url, "c", [adi[20:30]])
        r = redis.Redis.from_url(queue.url)
        wait_for(lambda: b"stays pending" in server.log.read_bytes())
        assert r.xlen("sieve:ingest:dead") == 0 and r.xpending("sieve:ingest", "sieve-indexers")["pending"] == 1
        with SieveClient(server.target) as client:
            client.repair("c")
            # the pending entry is claimed again once idle (SIEVE_QUEUE_CLAIM_IDLE_MS) and now commits
            wait_for(lambda: client.describe("c").stats.documents == 30, timeout=180)
    finally:
        server.stop()
        queue.stop()
