"""Bulk import: the staging folder a batch job fills with prebuilt segments, and the writer reads.

    <staging>/<collection>-<job id>/job.json        the collection's settings the segments were built with
    <staging>/<collection>-<job id>/<segment name>/ one segment each, written by segment.py's Segment.write
    <staging>/<collection>-<job id>/shard<i>of<n>/  for a sharded collection, a job folder for each shard,
                                                    its segments' names prefixed with it

`staging` is a local folder or any fsspec URL (s3://, gs://, file://) that the workers can write and the
writer can read. A segment is written aside and renamed (locally) or uploaded with meta.json last (object
stores), so a segment cut short by a killed worker reads as incomplete and is never listed by the job:
the writer imports exactly the segments the job names, in its order, after verifying every checksum
(Collection.import_segments). A job id names one job: starting it again clears what an earlier,
interrupted run left, so a rerun is idempotent, or (resumed) keeps the segments whose batch has not
changed (each marked by a <segment name>.staged.json written after it); the writer removes the folder
once committed.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from pathlib import Path

from .errors import CorruptIndex, FailedPrecondition, InvalidArgument, NotFound
from .segment import PreparedBatch, Segment
from .settings import CollectionSettings
from .storage import TEMPORARY_PREFIX, _remote, remote_errors, seal, unseal, upload_folder

JOB_FILE = "job.json"
STAGED_MARK = ".staged.json"  # beside a staged segment: its batch's summary, written once the segment is
STAGED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a plain folder name: never a path


def is_url(location: str) -> bool:
    return "://" in location


def job_folder(staging: str, collection: str, job_id: str) -> str:
    if not STAGED_NAME.fullmatch(f"{collection}-{job_id}"):
        raise InvalidArgument(f"job id {job_id!r}: letters, digits, '_', '.', '-' only")
    return f"{staging.rstrip('/')}/{collection}-{job_id}"


def shard_job(shard: int, shards: int) -> str:
    """A sharded job's folder for one shard's segments, and the prefix of their names."""
    return f"shard{shard}of{shards}"


SHARD_PREFIX = re.compile(r"shard(\d+)of(\d+)-")


def staged_folder(folder: str, name: str) -> str:
    """Where segment `name` of a job is staged: its shard's folder when the job is routed, else the job's."""
    match = SHARD_PREFIX.match(name)
    return f"{folder}/{shard_job(int(match[1]), int(match[2]))}" if match else folder


def routed_segments(segments: list[str], shards: int) -> dict[int, list[str]]:
    """A sharded job's segment names by shard, once the job is known to be routed for `shards` shards."""
    owned: dict[int, list[str]] = {}
    for name in segments:
        match = SHARD_PREFIX.match(name)
        if not match:
            raise FailedPrecondition(f"staged segment {name} was built for one writer, not routed over shards: "
                                     "run the job against the router")
        shard, staged_for = int(match[1]), int(match[2])
        if staged_for != shards or shard >= shards:
            raise FailedPrecondition(f"the job was routed for {staged_for} shards, the collection has {shards}: "
                                     "run it again")
        owned.setdefault(shard, []).append(name)
    return owned


def start_job(folder: str, settings: CollectionSettings, resume: bool = False) -> bool:
    """The job folder with its job.json: emptied of whatever an earlier run of this job left, unless
    `resume` and that run used the same settings. Whether it was kept."""
    record = seal({"settings": settings.to_dict()})
    if is_url(folder):
        fs, root = _remote(folder)
        with remote_errors(folder):
            if resume and fs.exists(f"{root}/{JOB_FILE}") and fs.cat_file(f"{root}/{JOB_FILE}") == record:
                return True
            if fs.exists(root):
                fs.rm(root, recursive=True)
            fs.makedirs(root, exist_ok=True)
            fs.pipe_file(f"{root}/{JOB_FILE}", record)
        return False
    job = Path(folder) / JOB_FILE
    if resume and job.is_file() and job.read_bytes() == record:
        return True
    shutil.rmtree(folder, ignore_errors=True)
    Path(folder).mkdir(parents=True)
    job.write_bytes(record)
    return False


def mark_staged(folder: str, name: str, summary: dict) -> None:
    """Record that segment `name` is staged (written once it is), so that a resumed job skips its batch."""
    record = seal(summary)
    if is_url(folder):
        fs, root = _remote(folder)
        with remote_errors(folder):
            fs.pipe_file(f"{root}/{name}{STAGED_MARK}", record)
        return
    mark = Path(folder) / f"{name}{STAGED_MARK}"
    tmp = mark.with_name(f"{TEMPORARY_PREFIX}{mark.name}")
    tmp.write_bytes(record)
    tmp.rename(mark)


def staged_marks(folder: str) -> dict[str, dict]:
    """The summaries mark_staged recorded in a job folder, by segment name."""
    if is_url(folder):
        fs, root = _remote(folder)
        with remote_errors(folder):
            paths = [p for p in fs.ls(root, detail=False) if p.endswith(STAGED_MARK)]
            found = {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in paths}
    else:
        found = {p.name: p.read_bytes() for p in Path(folder).glob(f"*{STAGED_MARK}")}
    marks = {}
    for name, raw in found.items():
        try:
            marks[name[:-len(STAGED_MARK)]] = unseal(raw, name)
        except CorruptIndex:  # a damaged mark: its batch is encoded again
            continue
    return marks


def stage_segment(folder: str, name: str, batch: PreparedBatch, retrievers: dict,
                  settings: CollectionSettings) -> None:
    """Write one prepared batch as a segment of the job (a retried batch replaces its earlier attempt)."""
    if is_url(folder):
        with tempfile.TemporaryDirectory() as scratch:
            built = Path(scratch) / name
            _write(built, batch, retrievers, settings)
            fs, root = _remote(folder)
            with remote_errors(folder):
                if fs.exists(f"{root}/{name}"):
                    fs.rm(f"{root}/{name}", recursive=True)
            upload_folder(built, f"{folder}/{name}", last=("meta.json",))
        return
    final = Path(folder) / name
    tmp = final.with_name(f"{TEMPORARY_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    try:
        _write(tmp, batch, retrievers, settings)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(directory: Path, batch: PreparedBatch, retrievers: dict, settings: CollectionSettings) -> None:
    Segment.write(directory, batch.documents, batch.indexed, batch.encoded, retrievers, batch.quality,
                  settings.filterable)


def check_job(folder: Path, settings: CollectionSettings, segments: list[str]) -> list[Path]:
    """The named segments of a local job folder, once the job is known to fit the collection."""
    try:
        job = unseal((folder / JOB_FILE).read_bytes(), f"{folder.name}/{JOB_FILE}")
    except FileNotFoundError:
        raise NotFound(f"no staged job at {folder.name} (its {JOB_FILE} is missing)") from None
    if job.get("settings") != settings.to_dict():
        raise FailedPrecondition(f"job {folder.name} was built with other settings than the collection has now; "
                                 "run the job again")
    if not segments:
        raise InvalidArgument("the import names no segments")
    if len(set(segments)) != len(segments):
        raise InvalidArgument("the import names a segment twice")
    folders = []
    for name in segments:
        if not STAGED_NAME.fullmatch(name):
            raise InvalidArgument(f"staged segment name {name!r} is not a plain folder name")
        if not (folder / name / "meta.json").is_file():
            raise NotFound(f"no staged segment {name} in job {folder.name}")
        folders.append(folder / name)
    return folders


def fetch_job(url: str, local: Path, segments: list[str]) -> None:
    """Copy a job staged under a URL into a local folder (the writer's disk), its job.json and the named
    segments only."""
    from .storage import download_folder

    fs, root = _remote(url)
    local.mkdir(parents=True)
    with remote_errors(url):
        fs.get_file(f"{root}/{JOB_FILE}", str(local / JOB_FILE))
    for name in segments:
        if not STAGED_NAME.fullmatch(name):
            raise InvalidArgument(f"staged segment name {name!r} is not a plain folder name")
        (local / name).mkdir()
        download_folder(f"{url}/{name}", local / name)


def remove_job(folder: str) -> None:
    if is_url(folder):
        fs, root = _remote(folder)
        with remote_errors(folder):
            if fs.exists(root):
                fs.rm(root, recursive=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)
