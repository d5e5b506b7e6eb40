"""Distributed batch ingestion on a real local Ray cluster (two simulated nodes of one CPU each): a Ray job
indexes what `sieve ingest` indexes, segment for segment, through a real server; a worker killed mid-job
is retried without duplicates; a driver killed before its commit leaves the collection as it was, and the
job runs again. The import path (bulk.py, Collection.import_segments) is also checked without Ray."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import corpus
from sieve.index.bulk import job_folder, stage_segment, start_job
from sieve.index.documents import Document, batches, read_jsonl
from sieve.index.errors import FailedPrecondition, InvalidArgument
from sieve.service.engine import SearchQuery
from sieve.service.sync_engine import SyncEngine

ray = pytest.importorskip("ray")
from sieve.service import ray_ingest  # noqa: E402  (needs ray)
from sieve.service.ray_ingest import Encode, ingest_with_ray, stage_job  # noqa: E402

FULL = {"indexes": ["dense", "bm25", "multivector"], "quality_estimator": "unique_terms", "prune_ratio": 0.2}
LEXICAL = {"indexes": ["bm25"]}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20,
                                                          "include_dashboard": False})
    nodes.add_node(num_cpus=1, object_store_memory=150 * 2**20)
    ray.init(address=nodes.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def scifact():
    return corpus("scifact")[:70]


def write_corpus(path: Path, docs: list[Document], extra: list[str] = ()) -> Path:
    lines = [json.dumps(d.to_json()) for d in docs] + list(extra)
    path.write_text("\n".join(lines) + "\n")
    return path


def segment_files(collection: Path) -> list[dict[str, bytes]]:
    """Each segment's files (in commit order) with their bytes, meta.json without its file records."""
    manifest = sorted(collection.glob("manifest-*.json"))[-1]
    names = json.loads(manifest.read_text())["segments"]
    return [{p.name: p.read_bytes() for p in sorted((collection / "segments" / n).iterdir()) if p.name != "meta.json"}
            for n in names]


class Slow(Encode):
    """An encoder that takes a second a batch, as a model does: long enough for both workers to be up."""

    def __call__(self, row):
        import time

        time.sleep(1)
        return super().__call__(row)


def test_every_worker_gets_batches(cluster, scifact, tmp_path):
    """Each batch is a Ray task of its own (a block a batch): two workers share the job, not one taking all.
    First in the module: a finished job's actors may hold their CPUs a moment longer, and two need both."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    source = write_corpus(tmp_path / "slice.jsonl", scifact)
    with SyncEngine(data=str(tmp_path / "data")) as engine:
        engine.create_collection("c", LEXICAL)
        report = ingest_with_ray(str(source), "c", engine, batch_size=10, workers=2, progress=False, encoder=Slow)
        assert report.encoders == 2 and report.committed.upserted == 70


def test_a_ray_job_indexes_what_sieve_ingest_does(cluster, scifact, tmp_path):
    """Through a real server: `sieve ingest` and `sieve ingest --ray` on the same file (a repeated id, a
    malformed line, pruning by ratio, every index): the same segments byte for byte, the same results."""
    from sieve.service.cli import main
    from sieve.service.client import SieveClient
    from sieve.service.process import ServerProcess

    changed = Document(scifact[3].id, "A later version of this passage wins.", "Replaced")
    source = write_corpus(tmp_path / "slice.jsonl", scifact, ["{not json", json.dumps(changed.to_json())])
    staging = tmp_path / "staging"
    server = ServerProcess(tmp_path / "data", env={"SIEVE_IMPORT_ROOTS": str(staging)}).start()
    try:
        common = ["--server", server.target, "--batch-size", "32", "--settings", json.dumps(FULL)]
        assert main(["ingest", str(source), "--collection", "plain", *common]) == 0
        assert main(["ingest", str(source), "--collection", "ray", "--ray", cluster.address, "--staging",
                     str(staging), *common]) == 0
        assert not any(staging.iterdir())  # the writer removed the job's staging once committed
        plain, distributed = segment_files(server.data / "plain"), segment_files(server.data / "ray")
        assert len(plain) == len(distributed) == 3  # 32 + 32 + 7 (the repeated id joins the last batch)
        for segment, (ours, theirs) in enumerate(zip(plain, distributed)):
            assert ours.keys() == theirs.keys()
            assert [n for n in ours if ours[n] != theirs[n]] == [], f"segment {segment} differs"
        with SieveClient(server.target) as client:
            described = [client.describe(name).stats for name in ("plain", "ray")]
            counts = [(s.documents, s.pruned, s.deleted) for s in described]
            assert counts[0] == counts[1] and sum(counts[0][:2]) == 70 and counts[0][1] >= 11  # 20% of 32, twice
            assert client.list_pruned("plain").passages == client.list_pruned("ray").passages
            got = client.get("ray", [changed.id]).documents[0]
            assert (got.title, got.text) == (changed.title, changed.text)
            for doc in scifact[:6]:
                for retrievers in (["dense"], ["bm25"], ["multivector"], []):
                    hits = [[(h.id, h.score) for h in client.search(name, doc.title, k=10,
                                                                     retrievers=retrievers).results]
                            for name in ("plain", "ray")]
                    assert hits[0] == hits[1]
            with pytest.raises(grpc.RpcError) as refused:  # a job outside SIEVE_IMPORT_ROOTS
                client.import_segments("ray", str(tmp_path / "elsewhere"), ["00000-0000000"])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()


def test_a_ray_job_behind_a_router_is_routed_to_each_shard_as_sieve_ingest_does(cluster, scifact, tmp_path):
    """Two real shards behind a real router: the job splits each batch by owner (as the router splits a
    batch), each shard's writer imports its own folder, and every shard ends with the segments `sieve
    ingest` through the router gives it, byte for byte (pruning by ratio runs on each shard's part)."""
    from sieve.service.cli import main
    from sieve.service.client import SieveClient
    from sieve.service.process import ServerProcess

    source = write_corpus(tmp_path / "slice.jsonl", scifact)
    staging = tmp_path / "staging"
    shards = [ServerProcess(tmp_path / f"shard-{n}", env={"SIEVE_IMPORT_ROOTS": str(staging)}).start()
              for n in range(2)]
    router = ServerProcess(tmp_path / "router", env={"SIEVE_SHARDS": ",".join(s.target for s in shards)}).start()
    settings = {"indexes": ["dense", "bm25"], "quality_estimator": "unique_terms", "prune_ratio": 0.2}
    try:
        common = ["--server", router.target, "--batch-size", "32", "--settings", json.dumps(settings)]
        assert main(["ingest", str(source), "--collection", "plain", *common]) == 0
        assert main(["ingest", str(source), "--collection", "ray", "--ray", cluster.address, "--staging",
                     str(staging), *common]) == 0
        assert not any(staging.iterdir())  # every shard's folder, then the job's root, removed once committed
        for shard in shards:
            plain, distributed = segment_files(shard.data / "plain"), segment_files(shard.data / "ray")
            assert len(plain) == len(distributed) == 3  # 70 documents in batches of 32: a part of each
            assert plain == distributed
        with SieveClient(router.target) as client:
            described = [client.describe(name).stats for name in ("plain", "ray")]
            assert [(s.documents, s.pruned) for s in described][0] == [(s.documents, s.pruned) for s in described][1]
            assert sum([described[1].documents, described[1].pruned]) == 70
            for doc in scifact[:4]:
                hits = [[(h.id, h.score) for h in client.search(name, doc.title, k=10).results]
                        for name in ("plain", "ray")]
                assert hits[0] == hits[1]
            with pytest.raises(grpc.RpcError) as refused:  # a job staged for one writer, sent to the router
                client.import_segments("ray", str(staging / "job"), ["00000-0000000"])
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "run the job against the router" in refused.value.details()
    finally:
        for process in (router, *shards):
            process.stop()


class CrashingOnce(Encode):
    """An encoder whose worker process dies on its first batch, once (a marker file remembers)."""

    marker = ""

    def __call__(self, row):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().__call__(row)


def test_a_worker_killed_mid_job_is_retried_and_nothing_is_duplicated(cluster, scifact, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    CrashingOnce.marker = str(tmp_path / "crashed")
    source = write_corpus(tmp_path / "slice.jsonl", scifact)
    with SyncEngine(data=str(tmp_path / "data")) as engine:
        engine.create_collection("c", LEXICAL)
        report = ingest_with_ray(str(source), "c", engine, batch_size=10, workers=2, progress=False,
                                 encoder=CrashingOnce)
        assert Path(CrashingOnce.marker).exists()  # a worker did die
        stats = engine.describe("c").stats
        assert (stats["documents"], stats["deleted"], stats["segments"]) == (70, 0, 7)
        assert report.committed.upserted == 70 and report.lines == 70
        found, missing, _ = engine.get("c", [d.id for d in scifact])
        assert not missing and [d.text for d in found] == [d.text for d in scifact]


DRIVER = """
import sys, time, ray
from sieve.index.settings import CollectionSettings
from sieve.service.ray_ingest import stage_job
ray.init(address=sys.argv[1], log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
report = stage_job(sys.argv[2], CollectionSettings.from_dict({"indexes": ["bm25"]}), sys.argv[3], "c",
                   job_id="nightly", batch_size=10, workers=1, progress=False)
print("staged", len(report.segments), flush=True)
time.sleep(120)  # killed here: after staging, before the commit
"""


def test_a_driver_killed_before_its_commit_changes_nothing_and_the_job_runs_again(cluster, scifact, tmp_path):
    source = write_corpus(tmp_path / "slice.jsonl", scifact)
    with SyncEngine(data=str(tmp_path / "data")) as engine:
        engine.create_collection("c", LEXICAL)
        engine.upsert("c", [Document("kept", "A document from before the job.")])
        before = engine.describe("c").stats
        staging = str(tmp_path / "data" / ".staging")
        driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(DRIVER), cluster.address, str(source),
                                   staging], stdout=subprocess.PIPE, text=True)
        try:
            # Ray's raylet may print warnings to the driver's stdout first (e.g. about worker processes)
            assert next(line for line in driver.stdout if line.startswith("staged")).split() == ["staged", "7"]
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
        folder = Path(job_folder(staging, "c", "nightly"))
        assert len([p for p in folder.iterdir() if p.is_dir()]) == 7  # staged, never committed
        assert engine.describe("c").stats == before
        resumed = stage_job(str(source), engine.settings("c"), staging, "c", job_id="nightly", batch_size=10,
                            workers=2, resume=True, progress=False)
        assert (resumed.resumed, resumed.encoders, resumed.seconds.get("encode", 0)) == (7, 0, 0)  # nothing re-encoded
        assert (resumed.indexed, resumed.lines, len(resumed.segments)) == (70, 70, 7)
        (source.parent / "changed.jsonl").write_text(source.read_text().replace(scifact[15].text, "Now changed."))
        source.replace(source.parent / "original.jsonl")
        (source.parent / "changed.jsonl").replace(source)
        changed = stage_job(str(source), engine.settings("c"), staging, "c", job_id="nightly", batch_size=10,
                            workers=2, resume=True, progress=False)
        assert changed.resumed == 6 and changed.encoders >= 1  # the batch whose document changed is encoded again
        (source.parent / "original.jsonl").replace(source)
        query = SearchQuery("c", scifact[0].title, k=5)
        generation = before["generation"]
        for run in range(2):  # the job again (it clears what the killed run staged), then once more
            report = ingest_with_ray(str(source), "c", engine, job_id="nightly", batch_size=10, workers=2,
                                     progress=False)
            assert report.committed.generation == generation + 1  # one commit for the whole job
            assert report.committed.upserted == 70 and not folder.exists()
            stats = engine.describe("c").stats  # (the rerun's tombstones may trigger a compaction after it)
            assert stats["documents"] == 71
            generation = stats["generation"]
            hits = [(h.id, h.score) for h in engine.search(query).hits]
            assert run == 0 or hits == first
            first = hits


def test_a_bad_document_fails_the_job_and_commits_nothing(cluster, tmp_path):
    source = write_corpus(tmp_path / "slice.jsonl", [Document("big", "x " * 60_000)])
    with SyncEngine(data=str(tmp_path / "data")) as engine:
        engine.create_collection("c", LEXICAL)
        with pytest.raises(InvalidArgument, match="the limit is 100000"):
            ingest_with_ray(str(source), "c", engine, progress=False)
        assert engine.describe("c").stats["generation"] == 0
        with pytest.raises(InvalidArgument, match="no corpus files"):
            ingest_with_ray(str(tmp_path / "missing.jsonl"), "c", engine, progress=False)


def test_imported_segments_commit_once_and_upsert_by_id_without_ray(scifact, tmp_path):
    """The writer's half alone: prebuilt segments (Collection.prepare's batches) staged and imported in
    one generation equal the same batches upserted one by one; a job built for other settings is refused."""
    docs = scifact[:30] + [Document(scifact[0].id, "Second version.")]
    with SyncEngine(data=str(tmp_path / "data")) as engine:
        for name in ("plain", "bulk", "other"):
            engine.create_collection(name, LEXICAL if name != "other" else {"indexes": ["bm25"], "bm25_k1": 1.2})
        cut = list(batches(iter(docs), 12, []))
        for batch, _ in cut:
            engine.upsert("plain", batch)
        bulk = engine.collection("bulk")
        folder = job_folder(str(tmp_path / "data" / ".staging"), "bulk", "job")
        start_job(folder, bulk.settings)
        for n, (batch, _) in enumerate(cut):
            stage_segment(folder, f"b{n}", bulk.prepare(batch), bulk.retrievers, bulk.settings)
        with pytest.raises(FailedPrecondition, match="other settings"):
            engine.import_segments("other", folder, ["b0"])
        result = engine.import_segments("bulk", folder, [f"b{n}" for n in range(len(cut))])
        assert (result.upserted, result.generation) == (31, 1) and not Path(folder).exists()
        assert segment_files(tmp_path / "data" / "plain") == segment_files(tmp_path / "data" / "bulk")
        plain, imported = engine.describe("plain").stats, engine.describe("bulk").stats
        assert (plain["documents"], plain["deleted"]) == (imported["documents"], imported["deleted"]) == (30, 1)
        assert engine.get("bulk", [scifact[0].id])[0][0].text == "Second version."


def test_a_routed_job_names_its_shards_and_its_shard_count():
    from sieve.index.bulk import routed_segments, shard_job, staged_folder

    names = [f"{shard_job(1, 2)}-00000-0000000", f"{shard_job(0, 2)}-00000-0000000", f"{shard_job(1, 2)}-00000-0000001"]
    assert routed_segments(names, 2) == {1: [names[0], names[2]], 0: [names[1]]}
    with pytest.raises(FailedPrecondition, match="routed for 2 shards, the collection has 3"):
        routed_segments(names, 3)
    with pytest.raises(FailedPrecondition, match="built for one writer"):
        routed_segments(["00000-0000000"], 2)
    assert staged_folder("job", names[0]) == f"job/{shard_job(1, 2)}" and staged_folder("job", "00000-0000000") == "job"
    assert [part.key for part in ray_ingest.route(ray_ingest.Work("00000-0000000", corpus("scifact")[:20], 20, []), 2)] \
        == [f"{shard_job(0, 2)}-00000-0000000", f"{shard_job(1, 2)}-00000-0000000"]
