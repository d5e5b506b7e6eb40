"""Bytes on disk: checksums, sealed JSON records, atomic writes, and OS errors as clear statuses.

Every file a collection stores is recorded with its size and xxHash3 (a segment's meta.json lists its
files; manifests and meta.json carry the checksum of their own content), so that truncation, flipped
bytes and zeroed ranges are all found when a segment is opened, and named, instead of being served.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path

import xxhash

from .errors import AlreadyExists, CorruptIndex, InvalidArgument, NotFound, ResourceExhausted, Unavailable

CHUNK = 4 << 20
SEAL = "xxh3"  # the key of a sealed record's checksum
TEMPORARY_PREFIX = ".tmp-"  # every file or folder a write creates before its final rename


def file_checksum(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def row_checksum(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def _canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def seal(record: dict) -> bytes:
    """JSON that carries the checksum of its own content."""
    return json.dumps({**record, SEAL: xxhash.xxh3_64_hexdigest(_canonical(record))}).encode()


def unseal(raw: bytes, label: str) -> dict:
    """The record of seal(); a record written before checksums existed (no seal) is returned as read."""
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise CorruptIndex(f"{label}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise CorruptIndex(f"{label}: not a JSON object")
    stored = record.pop(SEAL, None)
    if stored is not None and stored != xxhash.xxh3_64_hexdigest(_canonical(record)):
        raise CorruptIndex(f"{label}: checksum mismatch (the file was changed or damaged)")
    return record


def verify_files(directory: Path, files: dict, label: str) -> None:
    """Each recorded file has its size and, where recorded, its checksum."""
    for name, record in files.items():
        size, checksum = (record, None) if isinstance(record, int) else (record["bytes"], record["xxh3"])
        path = directory / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            raise CorruptIndex(f"{label}/{name}: expected {size} bytes, found "
                               f"{'no file' if found is None else found} (truncated or replaced?)")
        if checksum is not None and file_checksum(path) != checksum:
            raise CorruptIndex(f"{label}/{name}: checksum mismatch (bytes changed on disk)")


def describe_files(directory: Path) -> dict:
    return {path.name: {"bytes": path.stat().st_size, "xxh3": file_checksum(path)}
            for path in sorted(directory.iterdir()) if path.is_file()}


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old content or the new, never a part; nothing is left behind on failure."""
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_temporary(directory: Path) -> list[str]:
    """Delete what interrupted writes left in a folder (their final rename never happened)."""
    removed = []
    for path in directory.iterdir() if directory.is_dir() else ():
        # ".manifest-*.tmp" is the name writes used before TEMPORARY_PREFIX
        if path.name.startswith(TEMPORARY_PREFIX) or (path.name.startswith(".") and path.name.endswith(".tmp")):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


@contextlib.contextmanager
def storage_errors(data_dir: Path):
    """OS errors of a write become a status a client can act on: a full disk is RESOURCE_EXHAUSTED,
    any other I/O failure UNAVAILABLE. The message names no server path."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f"{shutil.disk_usage(data_dir).free} bytes free"
            except OSError:
                free = "free space unknown"
            raise ResourceExhausted(f"disk full at the data directory ({free}); nothing of this write was "
                                    "kept: free space or grow the volume, then retry") from error
        raise Unavailable(f"the data directory cannot be written ({os.strerror(error.errno or 0) or error}); "
                          "nothing of this write was kept: retry, or check the volume") from error


def _remote(url: str):
    """(file system, root path) of an fsspec URL; a protocol without its driver installed is named."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise InvalidArgument(f"{url}: this server cannot reach that file system ({error})") from None


@contextlib.contextmanager
def remote_errors(url: str):
    try:
        yield
    except FileNotFoundError:
        raise NotFound(f"nothing at {url}") from None
    except OSError as error:
        raise Unavailable(f"{url}: {error.strerror or error}; nothing was changed here, retry") from None


def upload_folder(folder: Path, url: str, last: tuple[str, ...] = ()) -> None:
    """Copy a folder to an fsspec URL that must not exist yet; files named in `last` go last, so that a
    copy cut short lacks them and reads as incomplete (object stores have no atomic rename)."""
    fs, root = _remote(url)
    with remote_errors(url):
        if fs.exists(root):
            raise AlreadyExists(f"{url} exists already; name a new folder")
        files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
        for path in files:
            target = f"{root.rstrip('/')}/{path.relative_to(folder).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(path), target)


def download_folder(url: str, folder: Path) -> None:
    fs, root = _remote(url)
    with remote_errors(url):
        files = fs.find(root)
        if not files:
            raise NotFound(f"nothing at {url}")
        prefix = root.rstrip("/") + "/"
        for name in files:
            relative = name[len(prefix):] if name.startswith(prefix) else name.rsplit("/", 1)[-1]
            if ".." in relative.split("/"):
                raise InvalidArgument(f"{url}: file name {relative!r} leaves the folder")
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(folder / relative))
