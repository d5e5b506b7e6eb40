"""A collection: immutable segments on disk, tombstones, and an atomically replaced manifest.

Ingestion flows one way: documents -> quality pruning -> encoding by every index -> a new segment
directory -> a new manifest. Only the last step changes what searches see, and it is a rename, so a
crash at any point leaves the previous generation intact. Deletes and replacements are tombstones
(segment, row); external ids never shift. Compaction rewrites live rows into one segment without
re-encoding anything.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .documents import Document, validate_batch
from .errors import CorruptIndex, InvalidArgument, NotFound, ReadOnly
from .fusion import reciprocal_rank, weighted_scores
from .registry import make_retrievers
from .settings import CollectionSettings

log = logging.getLogger(__name__)

MANIFESTS_KEPT = 2  # the newest, and the one before it to fall back to if the newest is damaged
FUSION_DEPTH = 100  # each retriever's list length before fusion
AUTO_COMPACT_SEGMENTS = 32
AUTO_COMPACT_DELETED_RATIO = 0.3


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Segment:
    """An immutable batch of documents: stored text, ids, and each retriever's part."""

    def __init__(self, directory: Path, retrievers: dict):
        self.directory = directory
        self.name = directory.name
        try:
            meta = json.loads((directory / "meta.json").read_text())
            for name, size in meta["files"].items():  # a truncated or replaced file names itself
                found = (directory / name).stat().st_size if (directory / name).exists() else None
                if found != size:
                    raise CorruptIndex(f"{directory / name}: expected {size} bytes, found "
                                       f"{'no file' if found is None else found} (truncated or replaced?)")
            self.bytes = sum(meta["files"].values())
            self.indexed: int = meta["indexed"]  # rows [0, indexed) are searchable, the rest were pruned
            self.ids: list[str] = json.loads((directory / "ids.json").read_text())
            self.offsets = np.load(directory / "offsets.npy")
            quality = directory / "quality.npy"
            self.quality = np.load(quality) if quality.exists() else None
            self._docs = open(directory / "docs.jsonl", "rb")
            if len(self.ids) != len(self.offsets) - 1 or self.offsets[-1] != os.fstat(self._docs.fileno()).st_size:
                raise CorruptIndex(f"{directory / 'docs.jsonl'}: size does not match its offsets (truncated?)")
            # A segment whose every passage was pruned has no index parts, only stored documents.
            self.parts = {name: r.open(directory) for name, r in retrievers.items()} if self.indexed else {}
        except CorruptIndex:
            raise
        except Exception as error:  # any unreadable file names itself in the message
            raise CorruptIndex(f"segment {directory} cannot be read: {error}") from error
        self._read_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def document(self, row: int) -> Document:
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        with self._read_lock:
            self._docs.seek(start)
            raw = self._docs.read(end - start)
        return Document.from_json(json.loads(raw))

    def close(self) -> None:
        self._docs.close()

    @staticmethod
    def write(directory: Path, docs: list[Document], indexed: int, encoded: dict[str, Any],
              retrievers: dict, quality: np.ndarray | None) -> None:
        directory.mkdir(parents=True)
        offsets = [0]
        with open(directory / "docs.jsonl", "wb") as f:
            for doc in docs:
                f.write(json.dumps(doc.to_json(), ensure_ascii=False).encode() + b"\n")
                offsets.append(f.tell())
        np.save(directory / "offsets.npy", np.asarray(offsets, "int64"))
        (directory / "ids.json").write_text(json.dumps([doc.id for doc in docs]))
        if quality is not None:
            np.save(directory / "quality.npy", quality.astype("float32"))
        if indexed:
            for name, retriever in retrievers.items():
                retriever.write(directory, encoded[name])
        files = {path.name: path.stat().st_size for path in directory.iterdir()}
        (directory / "meta.json").write_text(json.dumps({"indexed": indexed, "documents": len(docs), "files": files}))
        for path in directory.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(directory)


@dataclass(frozen=True)
class Snapshot:
    """What one search sees: a generation's segments and their tombstones. Never mutated."""

    generation: int
    segments: tuple[Segment, ...]
    deleted: tuple[np.ndarray, ...]  # sorted deleted rows, per segment
    id_map: dict[str, tuple[int, int]]  # external id -> (segment position, row), live only

    @property
    def searchable(self) -> list[int]:
        """Positions of the segments that have index parts (not every passage pruned)."""
        return [i for i, s in enumerate(self.segments) if s.indexed]

    def parts(self, name: str) -> list:
        return [self.segments[i].parts[name] for i in self.searchable]

    def searchable_deleted(self) -> list[np.ndarray]:
        return [self.deleted[i][self.deleted[i] < self.segments[i].indexed] for i in self.searchable]

    @property
    def live_indexed(self) -> int:
        return sum(1 for seg, row in self.id_map.values() if row < self.segments[seg].indexed)


@dataclass
class UpsertResult:
    upserted: int
    pruned: int
    generation: int


@dataclass
class SearchHit:
    id: str
    score: float
    document: Document


@dataclass
class SearchResult:
    hits: list[SearchHit]
    generation: int
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class PreparedBatch:
    """A batch after the costly stages, ready to commit."""

    documents: list[Document]  # kept first, then pruned
    indexed: int
    encoded: dict[str, Any]
    quality: np.ndarray | None


class Collection:
    def __init__(self, directory: Path, settings: CollectionSettings, read_only: bool = False):
        self.directory = directory
        self.name = directory.name
        self.settings = settings
        self.read_only = read_only  # a replica of a volume another process writes: never deletes a file
        self.retrievers = make_retrievers(settings)
        self._write_lock = threading.Lock()
        self.snapshot = self._load()

    # Opening and committing --------------------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, settings: CollectionSettings) -> "Collection":
        make_retrievers(settings)  # a setting no retriever accepts (a missing artifact) fails before any file
        directory.mkdir(parents=True)
        (directory / "segments").mkdir()
        _write_atomically(directory / "settings.json", json.dumps(settings.to_dict(), indent=2).encode())
        _write_atomically(directory / "manifest-0000000000.json", json.dumps(
            {"generation": 0, "segments": [], "deleted": {}}).encode())
        return cls(directory, settings)

    @classmethod
    def open(cls, directory: Path, read_only: bool = False) -> "Collection":
        path = directory / "settings.json"
        try:
            settings = CollectionSettings.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            raise CorruptIndex(f"{path}: {error}") from error
        return cls(directory, settings, read_only)

    def _manifests(self) -> list[Path]:
        return sorted(self.directory.glob("manifest-*.json"), reverse=True)

    def _load(self, opened: dict[str, Segment] | None = None) -> Snapshot:
        """The newest manifest whose files all read; a damaged one is reported and skipped."""
        errors = []
        opened = opened or {}
        for path in self._manifests():
            try:
                manifest = json.loads(path.read_text())
                segments = [opened.get(name) or Segment(self.directory / "segments" / name, self.retrievers)
                            for name in manifest["segments"]]
                snapshot = self._snapshot(manifest, segments)
            except (CorruptIndex, OSError, ValueError, KeyError) as error:
                log.error("collection %s: %s is unusable (%s); trying the previous generation",
                          self.name, path, error)
                errors.append(f"{path}: {error}")
                continue
            if errors:
                log.warning("collection %s serves generation %d", self.name, snapshot.generation)
            self.load_errors = errors
            if not self.read_only:
                self._remove_orphans(manifest)
            return snapshot
        raise CorruptIndex("; ".join(errors) or f"{self.directory}: no manifest")

    @staticmethod
    def _snapshot(manifest: dict, segments: list[Segment]) -> Snapshot:
        deleted = tuple(np.array(sorted(manifest["deleted"].get(s.name, [])), "int64") for s in segments)
        id_map: dict[str, tuple[int, int]] = {}
        for position, (segment, gone) in enumerate(zip(segments, deleted)):
            dead = set(gone.tolist())
            for row, doc_id in enumerate(segment.ids):
                if row not in dead:
                    id_map[doc_id] = (position, row)
        return Snapshot(manifest["generation"], tuple(segments), deleted, id_map)

    def _remove_orphans(self, manifest: dict, kept: int = MANIFESTS_KEPT) -> None:
        """Segments no kept manifest names (a crash mid-write, or compacted away) are deleted."""
        manifests = self._manifests()
        referenced = set(manifest["segments"])
        for path in manifests[:kept]:
            try:
                referenced |= set(json.loads(path.read_text())["segments"])
            except (OSError, ValueError, KeyError):
                pass
        for path in manifests[kept:]:
            path.unlink(missing_ok=True)
        for directory in (self.directory / "segments").iterdir():
            if directory.name not in referenced:
                shutil.rmtree(directory, ignore_errors=True)

    def refresh(self) -> bool:
        """Read-only replicas: switch to a newer generation written by the writer, if there is one."""
        newest = self._manifests()
        if not newest or int(newest[0].stem.split("-")[1]) <= self.snapshot.generation:
            return False
        snapshot = self._load({s.name: s for s in self.snapshot.segments})
        changed = snapshot.generation != self.snapshot.generation
        self.snapshot = snapshot
        return changed

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"this replica serves {self.name!r} read-only; send writes to the writer")

    def _commit(self, segments: list[Segment], deleted: dict[str, list[int]], kept: int = MANIFESTS_KEPT) -> Snapshot:
        generation = self.snapshot.generation + 1
        manifest = {
            "generation": generation,
            "segments": [s.name for s in segments],
            "deleted": {name: rows for name, rows in deleted.items() if rows},
            "committed_at": time.time(),
        }
        _write_atomically(self.directory / f"manifest-{generation:010d}.json", json.dumps(manifest).encode())
        self.snapshot = self._snapshot(manifest, segments)
        self._remove_orphans(manifest, kept)
        return self.snapshot

    def _deleted_lists(self) -> dict[str, list[int]]:
        return {s.name: d.tolist() for s, d in zip(self.snapshot.segments, self.snapshot.deleted)}

    def _new_segment(self, batch: PreparedBatch) -> Segment:
        name = f"seg-{time.time_ns():020d}"
        tmp = self.directory / "segments" / f".tmp-{name}"
        Segment.write(tmp, batch.documents, batch.indexed, batch.encoded, self.retrievers, batch.quality)
        final = self.directory / "segments" / name
        os.rename(tmp, final)
        return Segment(final, self.retrievers)

    # Writing -----------------------------------------------------------------------------------
    def prepare(self, docs: list[Document], prune: bool = True, progress: bool = False) -> PreparedBatch:
        """Quality pruning, then encoding by every index: the costly part, outside the write lock."""
        self._check_writable()
        validate_batch(docs)
        kept, pruned, quality = docs, [], None
        if prune and self.settings.quality_estimator != "none":
            from .quality import split_by_quality

            kept, pruned, quality = split_by_quality(docs, self.settings)
        encoded = {name: r.encode_documents(kept) for name, r in self.retrievers.items()} if kept else {}
        return PreparedBatch(kept + pruned, len(kept), encoded, quality)

    def commit(self, batch: PreparedBatch) -> UpsertResult:
        """Make a prepared batch visible; earlier versions of its ids become tombstones."""
        with self._write_lock:
            deleted = self._deleted_lists()
            snapshot = self.snapshot
            for doc in batch.documents:
                if doc.id in snapshot.id_map:
                    position, row = snapshot.id_map[doc.id]
                    deleted[snapshot.segments[position].name].append(row)
            segments = list(snapshot.segments)
            if batch.encoded or batch.documents:
                segments.append(self._new_segment(batch))
            generation = self._commit(segments, deleted).generation
        self._maybe_compact()
        return UpsertResult(batch.indexed, len(batch.documents) - batch.indexed, generation)

    def upsert(self, docs: list[Document], prune: bool = True) -> UpsertResult:
        return self.commit(self.prepare(docs, prune))

    def delete(self, ids: list[str]) -> tuple[int, list[str], int]:
        """(deleted, ids not found, generation). Other documents keep their ids and rows."""
        self._check_writable()
        if not ids:
            raise InvalidArgument("no ids to delete")
        with self._write_lock:
            snapshot = self.snapshot
            deleted = self._deleted_lists()
            found, missing = 0, []
            for doc_id in dict.fromkeys(ids):
                if doc_id in snapshot.id_map:
                    position, row = snapshot.id_map[doc_id]
                    deleted[snapshot.segments[position].name].append(row)
                    found += 1
                else:
                    missing.append(doc_id)
            generation = self._commit(list(snapshot.segments), deleted).generation if found else snapshot.generation
        self._maybe_compact()
        return found, missing, generation

    def compact(self) -> None:
        """Rewrite every live row into one segment (no re-encoding); drop the tombstones."""
        self._check_writable()
        with self._write_lock:
            snapshot = self.snapshot
            if len(snapshot.segments) <= 1 and not any(len(d) for d in snapshot.deleted):
                return
            kept_rows, pruned_rows = [], []
            for segment, gone in zip(snapshot.segments, snapshot.deleted):
                live = np.setdiff1d(np.arange(len(segment)), gone)
                kept_rows.append(live[live < segment.indexed])
                pruned_rows.append(live[live >= segment.indexed])
            documents = [s.document(int(r)) for s, rows in zip(snapshot.segments, kept_rows) for r in rows]
            indexed = len(documents)
            documents += [s.document(int(r)) for s, rows in zip(snapshot.segments, pruned_rows) for r in rows]
            encoded = {
                name: r.concat([r.take(s.parts[name], rows)
                                for s, rows in zip(snapshot.segments, kept_rows) if len(rows)])
                for name, r in self.retrievers.items()
            } if indexed else {}
            quality = None
            if any(s.quality is not None for s in snapshot.segments):
                def scores(s, rows):
                    return s.quality[rows] if s.quality is not None else np.full(len(rows), np.nan, "float32")
                quality = np.concatenate([scores(s, rows) for s, rows in zip(snapshot.segments, kept_rows)]
                                         + [scores(s, rows) for s, rows in zip(snapshot.segments, pruned_rows)])
            segments = [self._new_segment(PreparedBatch(documents, indexed, encoded, quality))] if documents else []
            # The new segment was just opened, so it reads; the old ones go now to reclaim the space.
            self._commit(segments, {}, kept=1)
            log.info("collection %s compacted into %d segment(s)", self.name, len(segments))

    def _maybe_compact(self) -> None:
        snapshot = self.snapshot
        total = sum(len(s) for s in snapshot.segments)
        deleted = sum(len(d) for d in snapshot.deleted)
        if len(snapshot.segments) > AUTO_COMPACT_SEGMENTS or (total and deleted / total > AUTO_COMPACT_DELETED_RATIO):
            self.compact()

    # Reading -----------------------------------------------------------------------------------
    def check_retrievers(self, names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(names) or self.settings.search_retrievers
        for name in names:
            if name not in self.retrievers:
                raise InvalidArgument(
                    f"collection {self.name!r} has no {name!r} index; it has {', '.join(self.retrievers)}")
        return names

    def encode_queries(self, name: str, texts: list[str]) -> list[Any]:
        return self.retrievers[name].encode_queries(texts)

    def search(self, queries: dict[str, Any], k: int, fusion: str = "") -> SearchResult:
        """Search with encoded queries (retriever name -> representation), fuse, return the top k."""
        fusion = fusion or self.settings.fusion
        snapshot = self.snapshot
        deleted = snapshot.searchable_deleted()
        timings: dict[str, float] = {}
        rankings = {}
        depth = k if len(queries) == 1 else max(k, FUSION_DEPTH)
        searchable = snapshot.searchable
        for name, query in queries.items():
            start = time.perf_counter()
            hits = self.retrievers[name].search(snapshot.parts(name), deleted, query, depth)
            rankings[name] = [((searchable[h.segment], h.row), h.score) for h in hits]
            timings[name] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        if len(rankings) == 1:
            fused = next(iter(rankings.values()))
        elif fusion == "rrf":
            fused = reciprocal_rank(rankings, self.settings.rrf_k, self.settings.fusion_weights or None)
        elif fusion == "weighted":
            fused = weighted_scores(rankings, self.settings.fusion_weights or None)
        else:
            raise InvalidArgument(f"unknown fusion {fusion!r}; choose rrf or weighted")
        timings["fusion"] = (time.perf_counter() - start) * 1000
        hits = [SearchHit(snapshot.segments[s].ids[r], score, snapshot.segments[s].document(r))
                for (s, r), score in fused[:k]]
        return SearchResult(hits, snapshot.generation, timings)

    def get(self, doc_id: str) -> Document:
        snapshot = self.snapshot
        if doc_id not in snapshot.id_map:
            raise NotFound(f"no document {doc_id!r} in collection {self.name!r}")
        position, row = snapshot.id_map[doc_id]
        return snapshot.segments[position].document(row)

    def pruned(self, limit: int = 0) -> list[tuple[str, float]]:
        """Passages dropped by quality pruning and still current, lowest quality first."""
        snapshot = self.snapshot
        records = []
        for doc_id, (position, row) in snapshot.id_map.items():
            segment = snapshot.segments[position]
            if row >= segment.indexed:
                quality = float(segment.quality[row]) if segment.quality is not None else float("nan")
                records.append((doc_id, quality))
        records.sort(key=lambda record: record[1])
        return records[:limit] if limit else records

    def reinstate(self, ids: list[str]) -> UpsertResult:
        pruned = {doc_id for doc_id, _ in self.pruned()}
        unknown = [doc_id for doc_id in ids if doc_id not in pruned]
        if unknown:
            raise NotFound(f"not among the pruned passages of {self.name!r}: {', '.join(unknown[:10])}")
        return self.upsert([self.get(doc_id) for doc_id in ids], prune=False)

    def stats(self) -> dict:
        snapshot = self.snapshot
        live_indexed = snapshot.live_indexed
        details = {}
        for name, retriever in self.retrievers.items():
            details[name] = retriever.stats(snapshot.parts(name), live_indexed)
        # The files this generation uses, from the segments' own records: walking the folder would race
        # with a concurrent commit renaming and removing segment directories.
        bytes_on_disk = sum(s.bytes for s in snapshot.segments)
        return {
            "documents": live_indexed,
            "deleted": int(sum(len(d) for d in snapshot.deleted)),
            "pruned": len(snapshot.id_map) - live_indexed,
            "segments": len(snapshot.segments),
            "bytes_on_disk": bytes_on_disk,
            "generation": snapshot.generation,
            "details": details,
        }

    def close(self) -> None:
        for segment in self.snapshot.segments:
            segment.close()
