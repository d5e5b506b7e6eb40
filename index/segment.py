"""A segment: one immutable batch of documents on disk (stored text, ids, each index's part, metadata
columns, quality scores), every file checksummed; written aside and renamed into place, never changed."""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .documents import Document
from .errors import CorruptIndex
from .filters import read_columns, write_columns
from .storage import TEMPORARY_PREFIX, describe_files, fsync_dir, row_checksum, seal, unseal, verify_files

SEGMENT_NAME = re.compile(r"seg-\d{20}(-salvaged)*")


class Segment:
    """An immutable batch of documents: stored text, ids, and each retriever's part. Every file is
    verified against its recorded size and checksum when the segment is opened."""

    def __init__(self, directory: Path, retrievers: dict, label: str, filterable: dict):
        self.directory = directory
        self.name = directory.name
        self.label = label  # the folder, relative to the data directory: messages name no server path
        try:
            meta = unseal((directory / "meta.json").read_bytes(), f"{label}/meta.json")
            verify_files(directory, meta["files"], label)
            self.bytes = sum(r if isinstance(r, int) else r["bytes"] for r in meta["files"].values())
            self.indexed: int = meta["indexed"]  # rows [0, indexed) are searchable, the rest were pruned
            self.replaces: list[str] = meta.get("replaces", [])  # segments a compaction rewrote into this one
            self.ids: list[str] = json.loads((directory / "ids.json").read_text())
            self.offsets = np.load(directory / "offsets.npy")
            quality = directory / "quality.npy"
            self.quality = np.load(quality) if quality.exists() else None
            self._docs = open(directory / "docs.jsonl", "rb")
            if len(self.ids) != len(self.offsets) - 1 or self.offsets[-1] != os.fstat(self._docs.fileno()).st_size:
                raise CorruptIndex(f"{label}/docs.jsonl: size does not match its offsets (truncated?)")
            # A segment whose every passage was pruned has no index parts, only stored documents.
            self.parts = {name: r.open(directory) for name, r in retrievers.items()} if self.indexed else {}
            self.columns = read_columns(directory, filterable, label)  # the metadata filters read
        except CorruptIndex:
            raise
        except Exception as error:  # any unreadable file names itself, relative to the data directory
            detail = f"{type(error).__name__}: {error}".replace(str(directory), label)
            raise CorruptIndex(f"{label} cannot be read: {detail}") from None
        self._read_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def document(self, row: int) -> Document:
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        with self._read_lock:
            self._docs.seek(start)
            raw = self._docs.read(end - start)
        try:
            return Document.from_json(json.loads(raw))
        except Exception as error:  # changed on disk after it was verified
            raise CorruptIndex(f"{self.label}/docs.jsonl: row {row} cannot be read ({error})") from None

    def close(self) -> None:
        self._docs.close()

    @staticmethod
    def write(directory: Path, docs: list[Document], indexed: int, encoded: dict[str, Any],
              retrievers: dict, quality: np.ndarray | None, filterable: dict, replaces: list[str] = ()) -> None:
        directory.mkdir(parents=True)
        offsets, checksums = [0], []
        with open(directory / "docs.jsonl", "wb") as f:
            for doc in docs:
                line = json.dumps(doc.to_json(), ensure_ascii=False).encode()
                f.write(line + b"\n")
                offsets.append(f.tell())
                checksums.append(row_checksum(line))
        np.save(directory / "offsets.npy", np.asarray(offsets, "int64"))
        # One checksum a row: a repair can tell each intact document of a damaged segment from a changed one.
        np.save(directory / "rows.xxh3.npy", np.asarray(checksums, "uint64"))
        (directory / "ids.json").write_text(json.dumps([doc.id for doc in docs]))
        if quality is not None:
            np.save(directory / "quality.npy", quality.astype("float32"))
        if indexed:
            for name, retriever in retrievers.items():
                retriever.write(directory, encoded[name])
        write_columns(directory, [doc.metadata for doc in docs], filterable)
        meta = {"indexed": indexed, "documents": len(docs), "files": describe_files(directory),
                "replaces": list(replaces)}
        (directory / "meta.json").write_bytes(seal(meta))
        for path in directory.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(directory)


@dataclass
class PreparedBatch:
    """A batch after the costly stages, ready to commit."""

    documents: list[Document]  # kept first, then pruned
    indexed: int
    encoded: dict[str, Any]
    quality: np.ndarray | None


def write_segment(folders: Path, name: str, batch: PreparedBatch, retrievers: dict, filterable: dict, label,
                  replaces: tuple[str, ...] = ()) -> Segment:
    """Written aside, renamed into place, opened (and so verified); nothing is left behind on failure."""
    tmp, final = folders / f"{TEMPORARY_PREFIX}{name}", folders / name
    try:
        Segment.write(tmp, batch.documents, batch.indexed, batch.encoded, retrievers, batch.quality, filterable,
                      replaces)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Segment(final, retrievers, label(final), filterable)
