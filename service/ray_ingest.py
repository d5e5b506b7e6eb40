"""Distributed batch ingestion on Ray Data: encode a corpus on many workers, commit it atomically.

    files (Ray Data, any fsspec file system) -> batches (the rule `sieve ingest` cuts a file with)
      -> per-shard routing, where the collection is sharded (each batch split by owner, as the router splits)
      -> validation + quality pruning (actors) -> every index's encoder (actors: models loaded once, a GPU each
         where there are GPUs) -> token pooling and segment building (actors, into the job's staging folder)
      -> the writer imports every staged segment in ONE generation (Engine.import_segments); behind a router,
         each shard's writer imports its own in one generation each (Router.import_segments)

Every step calls the function ordinary ingestion calls (index/pipeline.py, each retriever's encoder, the
multi-vector retriever's `token_vectors` then `pool`, which is its `encode_documents`), on the same
batches, so the documents a job indexes are those `sieve ingest` would index, segment for segment.

A row of the dataset is one batch (pickled): stage boundaries never move a batch's edges, which the
batch-level steps (pruning by ratio, per-segment codecs) depend on. A worker killed mid-job is restarted
by Ray and its batch retried; the retry rewrites the same staged segment, and the writer imports only
the segments the finished job lists, so nothing is duplicated or lost. Nothing touches the collection
before the import, so a job killed earlier leaves it as it was; running it again clears its staging.

    from sieve.service.ray_ingest import ingest_with_ray
    with SyncEngine(data="./sieve-data") as engine:
        report = ingest_with_ray("corpus/*.jsonl", "notes", engine)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from sieve.index.bulk import (job_folder, mark_staged, remove_job, shard_job, stage_segment, staged_folder,
                              staged_marks, start_job)
from sieve.index.documents import BadLine, Document, batches, parse_jsonl, validate_document
from sieve.index.errors import InvalidArgument, SieveError
from sieve.index.pipeline import check_documents, split_pruned
from sieve.index.registry import make_retrievers
from sieve.index.segment import PreparedBatch
from sieve.index.settings import CollectionSettings
from sieve.service.router import shard_addresses, shard_of

log = logging.getLogger("sieve.ray")

STAGES = ("read", "prune", "encode", "pool", "build")


@dataclass
class Work:
    """One batch on its way through the stages (a row of the dataset, pickled)."""

    key: str  # [shard<i>of<n>-]<file number>-<batch number>: the staged segment's name, and the commit order
    documents: list[Document]
    lines: int  # lines (or Parquet rows) of the file this batch read, skipped ones included
    skipped: list[str]  # the malformed lines among them, as `sieve ingest` reports them
    pruned: list[Document] = field(default_factory=list)
    quality: object = None
    encoded: dict = field(default_factory=dict)
    encoder: str = ""  # the encoding worker (node:pid), so a report can say how many did the work
    seconds: dict = field(default_factory=dict)  # per stage, this batch's share
    digest: str = ""  # of the batch's documents: a resumed job keeps a staged segment only if it matches
    resumed: bool = False  # staged by an earlier run of the job from the same documents: every stage skips it

    def row(self) -> dict:
        return {"key": self.key, "work": pickle.dumps(self, protocol=5)}


def _work(row: dict) -> Work:
    return pickle.loads(row["work"])


def _timed(stage: str):
    def wrap(step):
        @functools.wraps(step)
        def timed(self, row):
            work = _work(row)
            if work.resumed:
                return row
            start = time.perf_counter()
            step(self, work)
            work.seconds[stage] = work.seconds.get(stage, 0.0) + time.perf_counter() - start
            return work.row()
        return timed
    return wrap


# Stages ---------------------------------------------------------------------------------------------
def _parquet_rows(data: bytes, path: Path):
    """Parquet rows as documents, or BadLines (row numbers from 1), checked as JSONL lines are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for number, record in enumerate(pq.read_table(pa.BufferReader(data)).to_pylist(), start=1):
        try:
            doc = Document.from_json(record)
            validate_document(doc)
        except InvalidArgument as error:
            yield BadLine(path, number, str(error))
        else:
            yield doc


def read_batches(row: dict, files: list[str], batch_size: int, shards: int = 0,
                 staged: dict[str, str] | None = None) -> list[dict]:
    """A file's bytes -> its batches, cut by the rule of `sieve ingest` (documents.batches); behind a
    router of `shards` shards, each batch split into the parts the router would send each shard. A batch
    whose segment an earlier run staged from the same documents (`staged`: name -> digest) is resumed."""
    start = time.perf_counter()
    path, number = Path(row["path"]), files.index(row["path"])
    items = _parquet_rows(row["bytes"], path) if path.suffix == ".parquet" \
        else parse_jsonl(row["bytes"].splitlines(), path)
    seen = [0]

    def counted(items):
        for item in items:
            seen[0] += 1
            yield item

    problems: list[str] = []
    works, read = [], 0
    for n, (docs, lines) in enumerate(batches(counted(items), batch_size, problems)):
        works.append(Work(f"{number:05d}-{n:07d}", docs, lines - read, problems[:]))
        problems.clear()
        read = lines
    if seen[0] > read or not works:  # malformed lines after the last batch, or a file with no document
        works.append(Work(f"{number:05d}-{len(works):07d}", [], seen[0] - read, problems[:]))
    if shards:
        works = [part for work in works for part in route(work, shards)]
    for work in works:
        work.seconds["read"] = (time.perf_counter() - start) / len(works)
        work.digest = xxhash.xxh3_64_hexdigest(pickle.dumps(work.documents, protocol=5))
        if work.documents and (staged or {}).get(work.key) == work.digest:
            work.resumed, work.documents = True, []  # its segment and summary are in the job folder
    return [work.row() for work in works]


def route(work: Work, shards: int) -> list[Work]:
    """A batch's documents by owning shard (Router._owners' rule, in batch order), as one Work a shard; the
    first carries the batch's line counts. A batch with no document stays whole (nothing is staged)."""
    owned: dict[int, list[Document]] = {}
    for doc in work.documents:
        owned.setdefault(shard_of(doc.id, shards), []).append(doc)
    if not owned:
        return [work]
    parts = [Work(f"{shard_job(shard, shards)}-{work.key}", docs, 0, []) for shard, docs in sorted(owned.items())]
    parts[0].lines, parts[0].skipped = work.lines, work.skipped
    return parts


class Prune:
    """Validation with the writer's limits, then quality pruning (its model loaded once per actor)."""

    def __init__(self, settings: dict, max_docs: int, max_chars: int):
        self.settings = CollectionSettings.from_dict(settings)
        self.limits = (max_docs, max_chars)

    @_timed("prune")
    def __call__(self, work: Work) -> None:
        if work.documents:
            check_documents(work.documents, self.settings, *self.limits)
            work.documents, work.pruned, work.quality = split_pruned(work.documents, self.settings)


class Encode:
    """Every index's encoder on the kept passages; the multi-vector index's token vectors are pooled by the
    next stage. A stateful actor: the models load once, on its GPU where it has one."""

    def __init__(self, settings: dict, threads: int):
        import torch

        if threads:  # the CPUs this actor holds; Ray's default (OMP_NUM_THREADS) may differ
            torch.set_num_threads(threads)
        self.retrievers = make_retrievers(CollectionSettings.from_dict(settings))
        for retriever in self.retrievers.values():  # load the models now, not in the first batch
            if hasattr(retriever, "encoder"):
                retriever.encoder

    @_timed("encode")
    def __call__(self, work: Work) -> None:
        import ray

        work.encoder = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"
        if work.documents:
            for name, retriever in self.retrievers.items():
                work.encoded[name] = retriever.token_vectors([d.content for d in work.documents]) \
                    if hasattr(retriever, "pool") else retriever.encode_documents(work.documents)


class Build:
    """Token pooling of the multi-vector index (CPU work: Ward clustering, as its encode_documents does),
    then the batch as a checksummed segment in the job's staging folder; what comes back is its summary.
    An actor, so the retrievers are made once per worker rather than once per batch."""

    def __init__(self, settings: dict, folder: str):
        self.settings = CollectionSettings.from_dict(settings)
        self.retrievers = make_retrievers(self.settings)
        self.folder = folder

    def __call__(self, row: dict) -> dict:
        work = _work(row)
        if work.resumed:  # the driver takes its summary from the job folder
            return {"key": work.key, "documents": 0, "indexed": 0, "lines": 0, "encoder": "", "skipped": "[]",
                    "seconds": "{}", "resumed": True}
        start = time.perf_counter()
        for name, retriever in self.retrievers.items():
            if hasattr(retriever, "pool") and name in work.encoded:
                work.encoded[name] = retriever.pool(work.encoded[name])
        work.seconds["pool"] = time.perf_counter() - start
        start = time.perf_counter()
        documents = work.documents + work.pruned
        if documents:
            batch = PreparedBatch(documents, len(work.documents), work.encoded, work.quality)
            # a routed batch goes to its shard's folder, which that shard's writer imports
            stage_segment(staged_folder(self.folder, work.key), work.key, batch, self.retrievers, self.settings)
        work.seconds["build"] = time.perf_counter() - start
        summary = {"key": work.key, "documents": len(documents), "indexed": len(work.documents), "lines": work.lines,
                   "encoder": work.encoder, "skipped": json.dumps(work.skipped), "seconds": json.dumps(work.seconds),
                   "resumed": False}
        if documents:
            mark_staged(self.folder, work.key, {**summary, "digest": work.digest})
        return summary


# The job --------------------------------------------------------------------------------------------
@dataclass
class JobReport:
    job: str  # the staged job's folder (or URL)
    segments: list[str]  # staged, in commit order
    lines: int = 0
    indexed: int = 0
    pruned: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  # busy seconds per stage, summed over batches and workers
    encoders: int = 0  # encoder worker processes that encoded a batch (a restarted one counts again)
    resumed: int = 0  # segments an earlier run of the job had staged, kept (`resume`)
    wall_seconds: float = 0.0
    committed: object = None  # the writer's UpsertResult (or UpsertResponse), once imported


def corpus_files(source: str) -> tuple[object, list[str]]:
    """(pyarrow-compatible file system, sorted files) of a file, folder, glob or fsspec URL; a folder's
    *.jsonl and *.parquet files, a BEIR folder's corpus.jsonl."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source)
    if fs.isdir(root):
        beir = f"{root.rstrip('/')}/corpus.jsonl"
        files = [beir] if fs.isfile(beir) else \
            [p for p in fs.find(root) if p.endswith((".jsonl", ".json", ".parquet"))]
    else:
        files = fs.glob(root) if any(c in root for c in "*?[") else ([root] if fs.exists(root) else [])
    if not files:
        raise InvalidArgument(f"no corpus files at {source} (JSONL or Parquet)")
    return fs, sorted(files)


def default_job_id(source: str, collection: str) -> str:
    """The same command names the same job, so that running it again clears what a killed run staged."""
    where = source if "://" in source else os.path.abspath(source)
    return xxhash.xxh3_64_hexdigest(f"{collection}\0{where}".encode())


def stage_job(source: str, settings: CollectionSettings, staging: str, collection: str, *,
              job_id: str = "", batch_size: int = 64, workers: int = 0, cpus_per_worker: float = 1,
              max_docs: int = 1024, max_chars: int = 100_000, shards: int = 0, resume: bool = False,
              progress: bool = True, encoder=Encode) -> JobReport:
    """Run the pipeline on the Ray cluster this process is connected to (ray.init) and stage every batch's
    segment; nothing is committed. `workers`: encoder actors (0: one per GPU, else one per
    `cpus_per_worker` CPUs). `shards`: the router's shard count for a sharded collection (each shard's
    segments in a folder of their own), 0 for one writer. `resume`: keep what an earlier, interrupted run
    of this job (same id, same settings) staged from the same documents, and encode only the rest.
    Raises the first batch's error (e.g. INVALID_ARGUMENT for a bad document)."""
    import ray

    if not 1 <= batch_size <= max_docs:
        raise InvalidArgument(f"batch size must be within 1..{max_docs}, not {batch_size}")
    fs, files = corpus_files(source)
    folder = job_folder(staging, collection, job_id or default_job_id(source, collection))
    kept = start_job(folder, settings, resume)
    for shard in range(shards):
        kept = start_job(f"{folder}/{shard_job(shard, shards)}", settings, kept) and kept
    marks = staged_marks(folder) if kept else {}
    started = time.perf_counter()
    plain = settings.to_dict()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = ray.cluster_resources().get("CPU", 1)
    workers = workers or gpus or max(1, int(cpus // cpus_per_worker))
    device = {"num_gpus": 1} if gpus else {"num_cpus": cpus_per_worker}
    light = {"num_cpus": 0}  # the light stages never wait for CPUs the encoders hold; they are bounded below
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from tqdm import tqdm

    # A block a batch, so that each batch is a task of its own and every worker gets work. A dataset keeps
    # the context it was created in: set before the first stage, restored once the job has run.
    context = ray.data.DataContext.get_current()
    block_size, context.target_max_block_size = context.target_max_block_size, 1
    report, rows = JobReport(folder, []), []
    try:
        dataset = ray.data.read_binary_files(files, include_paths=True, filesystem=PyFileSystem(FSSpecHandler(fs)),
                                             ray_remote_args=light)
        staged = {name: mark["digest"] for name, mark in marks.items()}
        dataset = dataset.flat_map(read_batches, fn_kwargs={"files": files, "batch_size": batch_size,
                                                            "shards": shards, "staged": staged}, **light)
        dataset = dataset.map(Prune, fn_constructor_args=(plain, max_docs, max_chars), concurrency=workers, **light)
        dataset = dataset.map(encoder, fn_constructor_args=(plain, int(cpus_per_worker) if not gpus else 0),
                              concurrency=workers, **device)
        dataset = dataset.map(Build, fn_constructor_args=(plain, folder), concurrency=workers, **light)
        with tqdm(desc=f"ray ingest {collection}", unit="batch", disable=not progress) as bar:
            for row in dataset.iter_rows():
                if row["resumed"]:
                    row = {**marks[row["key"]], "resumed": True}
                    report.resumed += 1
                rows.append(row)
                report.lines += row["lines"]
                report.indexed += row["indexed"]
                report.pruned += row["documents"] - row["indexed"]
                report.skipped += json.loads(row["skipped"])
                bar.set_postfix(read=report.lines, pruned=report.pruned, encoded=report.indexed,
                                skipped=len(report.skipped), refresh=False)
                bar.update()
    except Exception as error:
        raise _sieve_error(error) from None
    finally:
        context.target_max_block_size = block_size
    report.encoders = len({row["encoder"] for row in rows if row["indexed"] and not row["resumed"]})
    for row in sorted(rows, key=lambda r: r["key"]):
        if row["documents"]:
            report.segments.append(row["key"])
        for stage, seconds in json.loads(row["seconds"]).items() if not row["resumed"] else ():
            report.seconds[stage] = report.seconds.get(stage, 0.0) + seconds
    report.wall_seconds = time.perf_counter() - started
    return report


def _sieve_error(error: Exception) -> Exception:
    """The Sieve error a stage raised (e.g. a bad document), rather than Ray's wrapping of it: across
    processes Ray keeps the original only as text in its traceback, so it is rebuilt from that."""
    from sieve.index import errors

    found = re.findall(r"sieve\.index\.errors\.(\w+): (.*)", str(error))
    if found and isinstance(getattr(errors, found[-1][0], None), type) and \
            issubclass(getattr(errors, found[-1][0]), SieveError):
        return getattr(errors, found[-1][0])(found[-1][1])
    return error


def settings_of(target, collection: str) -> tuple[CollectionSettings, int, int, int]:
    """(settings, max documents a batch, max characters a document, shards: 0 unless a router) of a
    collection at an engine (SyncEngine) or a server (SieveClient)."""
    from .client import SieveClient, struct_dict

    if isinstance(target, SieveClient):
        from .config import ServerConfig

        defaults = ServerConfig()  # a server does not publish its limits: the defaults
        info = target.describe(collection)
        shards = len(struct_dict(info.stats.details).get("shards", {}))  # a router lists its shards there
        settings = CollectionSettings.from_dict(struct_dict(info.settings))
        return settings, defaults.max_batch_documents, defaults.max_document_chars, shards
    shards = len(shard_addresses(target.config.shards)) if target.config.shards else 0
    return (target.settings(collection), target.config.max_batch_documents, target.config.max_document_chars,
            shards)


def ingest_with_ray(source: str, collection: str, target, *, staging: str = "", address: str | None = None,
                    **options) -> JobReport:
    """Stage a corpus on Ray (connecting to `address`, or starting a local cluster), then commit it at the
    writer in one generation. `target`: a SyncEngine over the data directory, or a SieveClient of the writer
    (then `staging` must be a folder or URL it can read, under its SIEVE_IMPORT_ROOTS). Options: stage_job's."""
    import ray

    settings, max_docs, max_chars, shards = settings_of(target, collection)
    if not staging:
        from .client import SieveClient
        from .engine import STAGING

        if isinstance(target, SieveClient):
            raise InvalidArgument("name a staging folder or URL the server can read (under its SIEVE_IMPORT_ROOTS)")
        staging = str(Path(target.config.data) / STAGING)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    report = stage_job(source, settings, staging, collection, max_docs=max_docs, max_chars=max_chars,
                       shards=shards, **options)
    if report.segments:
        report.committed = target.import_segments(collection, report.job, report.segments)
        if shards:  # each shard removed its own folder; what is left is the job's empty root
            remove_job(report.job)
    return report


def report_dict(report: JobReport) -> dict:
    plain = dataclasses.asdict(dataclasses.replace(report, committed=None))
    if report.committed is not None:
        plain["committed"] = {"upserted": report.committed.upserted, "pruned": report.committed.pruned,
                              "generation": report.committed.generation}
    return plain
