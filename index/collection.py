"""A collection: immutable segments on disk, tombstones, and an atomically replaced manifest.

Ingestion flows one way: documents -> quality pruning -> encoding by every index -> a new segment
directory -> a new manifest. Only the last step changes what searches see, and it is a rename, so a
crash at any point leaves the previous generation intact. Deletes and replacements are tombstones
(segment, row); external ids never shift. Compaction rewrites live rows into one segment without
re-encoding anything. Segments are segment.py's, manifests and snapshots manifest.py's, and
rebuilding a damaged collection is repair.py's.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .documents import Document
from .errors import CorruptIndex, InvalidArgument, NotFound, ReadOnly
from .filters import Filter
from .fusion import fuse
from .manifest import MANIFESTS_KEPT, Snapshot, manifest_number, read_manifest, read_settings
from .pipeline import check_documents, encode, split_pruned
from .registry import make_retrievers
from .repair import QUARANTINE
from .segment import SEGMENT_NAME, PreparedBatch, Segment, write_segment
from .settings import CollectionSettings
from .storage import TEMPORARY_PREFIX, fsync_dir, remove_temporary, seal, storage_errors, write_atomically

log = logging.getLogger(__name__)

FUSION_DEPTH = 100  # each retriever's list length before fusion
AUTO_COMPACT_SEGMENTS = 32
AUTO_COMPACT_DELETED_RATIO = 0.3
EVALUATION_FILE = "evaluation.json"  # the last measured reranking run (`sieve evaluate`)
EXIT_HEADS = "exit_heads"  # early-exit heads trained label-free for the reranker (`sieve train exit-heads`)


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
class Health:
    """Whether the newest generation is served; what is damaged, kept and moved aside, by relative path."""

    problems: list[str] = field(default_factory=list)  # empty: the newest generation is served
    kept_files: list[str] = field(default_factory=list)  # segments no usable manifest names, kept for repair
    quarantined: list[str] = field(default_factory=list)
    housekeeping_failures: int = 0  # cleanups or compactions after a commit that failed (the commit stood)

    @property
    def state(self) -> str:
        return "degraded" if self.problems else "ok"


class Collection:
    def __init__(self, directory: Path, settings: CollectionSettings, read_only: bool = False):
        self.directory = directory
        self.name = directory.name
        self.settings = settings
        self.read_only = read_only  # a replica of a volume another process writes: never deletes a file
        self.retrievers = make_retrievers(settings)
        self._write_lock = threading.Lock()
        self.health = Health()
        # What tells this collection from an earlier one of its name (dropped, or restored over): when its
        # settings were written. Caches key on it beside the generation, which a new collection restarts.
        self.incarnation = (directory / "settings.json").stat().st_mtime_ns
        self.snapshot = self._load()

    def _label(self, path: Path) -> str:
        return str(path.relative_to(self.directory.parent))

    # Opening and committing --------------------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, settings: CollectionSettings) -> "Collection":
        make_retrievers(settings)  # a setting no retriever accepts (a missing artifact) fails before any file
        staging = directory.with_name(f"{TEMPORARY_PREFIX}{directory.name}-{time.time_ns()}")
        with storage_errors(directory.parent):
            try:  # built aside and renamed: a full disk never leaves half a collection under its name
                (staging / "segments").mkdir(parents=True)
                write_atomically(staging / "settings.json", seal(settings.to_dict()))
                write_atomically(staging / "manifest-0000000000.json",
                                 seal({"generation": 0, "segments": [], "deleted": {}}))
                os.rename(staging, directory)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(directory.parent)
        return cls(directory, settings)

    @classmethod
    def open(cls, directory: Path, read_only: bool = False) -> "Collection":
        return cls(directory, read_settings(directory), read_only)

    def _manifests(self) -> list[Path]:
        return sorted(self.directory.glob("manifest-*.json"), reverse=True)

    def _load(self, opened: dict[str, Segment] | None = None) -> Snapshot:
        """The newest manifest whose files all verify. When a newer one is damaged, the collection is
        degraded: an older generation is served, writes are refused and nothing is deleted until a repair."""
        if not self.read_only:
            remove_temporary(self.directory)
            remove_temporary(self.directory / "segments")
        tried = dict(opened or {})
        problems = []
        for path in self._manifests():
            label = self._label(path)
            try:
                manifest = read_manifest(path, label)
                segments = []
                for name in manifest["segments"]:
                    if name not in tried:
                        folder = self.directory / "segments" / name
                        tried[name] = Segment(folder, self.retrievers, self._label(folder), self.settings.filterable)
                    segments.append(tried[name])
                snapshot = Snapshot.from_manifest(manifest, segments)
            except Exception as error:  # any failure: this generation is unusable, the server stays up
                reason = str(error) if isinstance(error, CorruptIndex) else f"{type(error).__name__}: {error}"
                problems.append(reason if reason.startswith(label) else f"{label}: {reason}")
                log.error("collection %s: %s; trying the previous generation", self.name, problems[-1])
                continue
            for name, segment in tried.items():
                if name not in manifest["segments"] and name not in (opened or {}):
                    segment.close()
            self.health.problems = problems
            self.health.kept_files = [self._label(d) for d in sorted((self.directory / "segments").iterdir())
                                      if d.name not in manifest["segments"]] if problems else []
            quarantine = self.directory / QUARANTINE
            self.health.quarantined = [self._label(p) for p in sorted(quarantine.rglob("*"))
                                       if p.parent in (quarantine, quarantine / "segments")
                                       and p.name != "segments"] if quarantine.is_dir() else []
            if problems:
                log.warning("collection %s is degraded: serves generation %d, refuses writes until repaired; "
                            "kept: %s", self.name, snapshot.generation, ", ".join(self.health.kept_files) or "-")
            elif not self.read_only:
                self.snapshot = snapshot
                self._tidy()
            return snapshot
        raise CorruptIndex("; ".join(problems) or f"{self.name}: no manifest")

    def _remove_orphans(self, kept: int = MANIFESTS_KEPT) -> None:
        """Segments no kept manifest names (a crash before the commit, or compacted away) are deleted;
        nothing is, if any kept manifest cannot be read."""
        manifests = self._manifests()
        referenced = set()
        for path in manifests[:kept]:
            referenced |= set(read_manifest(path, self._label(path))["segments"])
        for path in manifests[kept:]:
            path.unlink(missing_ok=True)
        for directory in (self.directory / "segments").iterdir():
            if directory.name not in referenced and SEGMENT_NAME.fullmatch(directory.name):
                shutil.rmtree(directory)

    def _tidy(self, kept: int = MANIFESTS_KEPT) -> None:
        """Housekeeping after a commit or a load: a failure is logged and counted, and never turns the
        committed write into an error; the next commit tries again."""
        try:
            self._remove_orphans(kept)
        except Exception as error:
            self.health.housekeeping_failures += 1
            log.error("collection %s: cleanup after generation %d failed, retried after the next commit: %s",
                      self.name, self.snapshot.generation, error)

    def evaluation(self) -> dict | str | None:
        """The last measured reranking run: its figures, None if never measured, or why it cannot be read.
        Read each time (a small file, off the event loop): `sieve evaluate` writes it from another process."""
        path = self.directory / EVALUATION_FILE
        try:
            figures = json.loads(path.read_text())
            if not isinstance(figures, dict):
                raise ValueError("not a JSON object")
            return figures
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            return f"{self.name}/{EVALUATION_FILE} cannot be read ({error})"

    def record_evaluation(self, figures: dict) -> None:
        """A side record beside the index (replicas write it too: `sieve evaluate` opens read-only)."""
        with storage_errors(self.directory.parent):
            write_atomically(self.directory / EVALUATION_FILE, json.dumps(figures, indent=2).encode())

    @property
    def exit_heads(self) -> Path:
        """Where the reranker's label-free exit heads live (written whole by rankers/exit_heads.save_heads)."""
        return self.directory / EXIT_HEADS

    def refresh(self) -> bool:
        """Read-only replicas: switch to a newer generation written by the writer, if there is one."""
        newest = self._manifests()
        if not newest or manifest_number(newest[0]) <= self.snapshot.generation:
            return False
        snapshot = self._load({s.name: s for s in self.snapshot.segments})
        changed = snapshot.generation != self.snapshot.generation
        self.snapshot = snapshot
        return changed

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"this replica serves {self.name!r} read-only; send writes to the writer")
        if self.health.problems:
            raise CorruptIndex(f"collection {self.name!r} is degraded: it serves generation "
                               f"{self.snapshot.generation} and refuses writes until `sieve collections repair "
                               f"{self.name}` ({self.health.problems[0]})")

    def _commit(self, batch: PreparedBatch | None, segments: list[Segment], deleted: dict[str, list[int]],
                kept: int = MANIFESTS_KEPT, replaces: tuple[str, ...] = ()) -> Snapshot:
        """Write the batch's segment (if any), then the manifest: the commit point. A failure before it
        leaves the previous generation and nothing of this write on disk."""
        newest = self._manifests()
        generation = max(self.snapshot.generation, manifest_number(newest[0]) if newest else 0) + 1
        path = self.directory / f"manifest-{generation:010d}.json"
        with storage_errors(self.directory.parent):
            segment = self._new_segment(batch, replaces) if batch is not None else None
            segments = segments + ([segment] if segment else [])
            manifest = {
                "generation": generation,
                "segments": [s.name for s in segments],
                "deleted": {name: rows for name, rows in deleted.items() if rows},
                "committed_at": time.time(),
            }
            try:
                write_atomically(path, seal(manifest))
            except BaseException:
                if path.exists():  # committed; only the folder's fsync failed
                    self.snapshot = Snapshot.from_manifest(manifest, segments)
                elif segment is not None:  # renamed into place but never named by a manifest
                    segment.close()
                    shutil.rmtree(segment.directory, ignore_errors=True)
                raise
        self.snapshot = Snapshot.from_manifest(manifest, segments)
        self._tidy(kept)
        return self.snapshot

    def _deleted_lists(self) -> dict[str, list[int]]:
        return {s.name: d.tolist() for s, d in zip(self.snapshot.segments, self.snapshot.deleted)}

    def _new_segment(self, batch: PreparedBatch, replaces: tuple[str, ...] = ()) -> Segment:
        return write_segment(self.directory / "segments", f"seg-{time.time_ns():020d}", batch, self.retrievers,
                             self.settings.filterable, self._label, replaces)

    # Writing -----------------------------------------------------------------------------------
    def prepare(self, docs: list[Document], prune: bool = True, progress: bool = False,
                max_docs: int | None = None, max_chars: int | None = None) -> PreparedBatch:
        """Validation (once, with the caller's limits), quality pruning, then encoding by every index: the
        costly part, outside the write lock."""
        self._check_writable()
        check_documents(docs, self.settings, max_docs, max_chars)
        kept, pruned, quality = split_pruned(docs, self.settings, prune)
        encoded = encode(kept, self.retrievers)
        return PreparedBatch(kept + pruned, len(kept), encoded, quality)

    def commit(self, batch: PreparedBatch) -> UpsertResult:
        """Make a prepared batch visible; earlier versions of its ids become tombstones. Returning means
        committed: housekeeping afterwards never raises."""
        with self._write_lock:
            self._check_writable()
            deleted = self._deleted_lists()
            snapshot = self.snapshot
            for doc in batch.documents:
                if doc.id in snapshot.id_map:
                    position, row = snapshot.id_map[doc.id]
                    deleted[snapshot.segments[position].name].append(row)
            generation = self._commit(batch if batch.documents else None, list(snapshot.segments),
                                      deleted).generation
        self._maybe_compact()
        return UpsertResult(batch.indexed, len(batch.documents) - batch.indexed, generation)

    def import_segments(self, folders: list[Path]) -> UpsertResult:
        """Bulk import: segments built elsewhere with this collection's settings (service/ray_ingest.py),
        moved in, opened (so every checksum is verified) and committed in ONE generation, in order. Earlier
        versions of their ids become tombstones, a later segment's version winning, as in upserts. A
        failure before the manifest leaves the collection as it was (the segments moved in are removed)."""
        with self._write_lock, storage_errors(self.directory.parent):
            self._check_writable()
            snapshot = self.snapshot
            deleted = self._deleted_lists()
            segments = list(snapshot.segments)
            where = dict(snapshot.id_map)  # id -> (position, row) of its current version
            imported: list[Path] = []
            name = 0
            try:
                for folder in folders:
                    name = max(time.time_ns(), name + 1)  # names are creation times: commit order for repair
                    target = self.directory / "segments" / f"seg-{name:020d}"
                    shutil.move(folder, target)  # a rename where the staging is on this file system
                    imported.append(target)
                    try:
                        segment = Segment(target, self.retrievers, self._label(target), self.settings.filterable)
                    except CorruptIndex as error:
                        raise InvalidArgument(f"staged segment {folder.name} fails verification: {error}") from None
                    for row, doc_id in enumerate(segment.ids):
                        if doc_id in where:
                            position, earlier = where[doc_id]
                            deleted.setdefault(segments[position].name, []).append(earlier)
                        where[doc_id] = (len(segments), row)
                    segments.append(segment)
                generation = self._commit(None, segments, deleted).generation
            except BaseException:
                if self.snapshot is snapshot:  # not committed: nothing of this import stays
                    for segment in segments[len(snapshot.segments):]:
                        segment.close()
                    for target in imported:
                        shutil.rmtree(target, ignore_errors=True)
                raise
        self._maybe_compact()
        new = segments[len(snapshot.segments):]
        indexed = sum(s.indexed for s in new)
        return UpsertResult(indexed, sum(len(s) for s in new) - indexed, generation)

    def upsert(self, docs: list[Document], prune: bool = True, max_docs: int | None = None,
               max_chars: int | None = None) -> UpsertResult:
        return self.commit(self.prepare(docs, prune, max_docs=max_docs, max_chars=max_chars))

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
            generation = self._commit(None, list(snapshot.segments), deleted).generation if found \
                else snapshot.generation
        self._maybe_compact()
        return found, missing, generation

    def filter(self, spec: dict) -> Filter:
        """A filter checked against this collection's filterable fields (INVALID_ARGUMENT if it does not fit)."""
        return Filter(spec, self.settings.filterable)

    def matching(self, filter: Filter) -> list[str]:
        """Ids of the live documents (indexed or pruned) a filter admits."""
        admits = filter.admits
        snapshot = self.snapshot
        found = []
        for position, (segment, gone) in enumerate(zip(snapshot.segments, snapshot.deleted)):
            rows = np.flatnonzero(admits(segment.columns, segment.ids))
            found += [segment.ids[r] for r in np.setdiff1d(rows, gone, assume_unique=True)]
        return found

    def delete_matching(self, filter: Filter) -> tuple[int, int]:
        """(deleted, generation): every live document the filter admits, in one commit."""
        ids = self.matching(filter)
        if not ids:
            return 0, self.snapshot.generation
        deleted, _, generation = self.delete(ids)
        return deleted, generation

    def copy_to(self, target: Path) -> int:
        """A consistent copy of the generation served now, as a collection folder that opens on its own:
        hard links where the file system allows (segments are immutable), copies elsewhere. Returns the
        generation copied."""
        with self._write_lock:
            snapshot = self.snapshot
            manifest = self.directory / f"manifest-{snapshot.generation:010d}.json"
            staging = target.with_name(f"{TEMPORARY_PREFIX}{target.name}")
            with storage_errors(target.parent):
                try:
                    (staging / "segments").mkdir(parents=True)
                    for path in (self.directory / "settings.json", manifest, self.directory / EVALUATION_FILE):
                        if path.name != EVALUATION_FILE or path.exists():
                            shutil.copy2(path, staging / path.name)
                    for segment in snapshot.segments:
                        shutil.copytree(segment.directory, staging / "segments" / segment.name,
                                        copy_function=_link_or_copy)
                    if (self.directory / EXIT_HEADS).is_dir():
                        shutil.copytree(self.directory / EXIT_HEADS, staging / EXIT_HEADS)
                    os.rename(staging, target)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
        return snapshot.generation

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
            batch = PreparedBatch(documents, indexed, encoded, quality) if documents else None
            # The old segments go at once (kept=1) to reclaim the space; a repair knows the new one replaces them.
            self._commit(batch, [], {}, kept=1, replaces=tuple(s.name for s in snapshot.segments))
            log.info("collection %s compacted into %d segment(s)", self.name, 1 if batch else 0)

    def _maybe_compact(self) -> None:
        snapshot = self.snapshot
        total = sum(len(s) for s in snapshot.segments)
        deleted = sum(len(d) for d in snapshot.deleted)
        if len(snapshot.segments) > AUTO_COMPACT_SEGMENTS or (total and deleted / total > AUTO_COMPACT_DELETED_RATIO):
            try:
                self.compact()
            except Exception as error:  # the write that triggered it is committed; the next one retries
                self.health.housekeeping_failures += 1
                log.error("collection %s: automatic compaction failed, retried after the next write: %s",
                          self.name, error)

    # Reading -----------------------------------------------------------------------------------
    def check_retrievers(self, names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
        return self.settings.check_retrievers(names, self.name)

    def encode_queries(self, name: str, texts: list[str]) -> list[Any]:
        return self.retrievers[name].encode_queries(texts)

    def search(self, queries: dict[str, Any], k: int, fusion: str = "",
               params: dict[str, dict] | None = None, filter: Filter | None = None) -> SearchResult:
        """Search with encoded queries (retriever name -> representation), fuse, return the top k.
        `params`: per retriever, this search's overrides of its settings. `filter`: only documents it
        admits are retrieved, by every retriever (see filters.py)."""
        snapshot = self.snapshot
        rankings, timings = self._rankings(snapshot, queries, k if len(queries) == 1 else max(k, FUSION_DEPTH),
                                           params, filter)
        start = time.perf_counter()
        fused = fuse(fusion or self.settings.fusion, rankings, self.settings.rrf_k, self.settings.fusion_weights)
        timings["fusion"] = (time.perf_counter() - start) * 1000
        hits = [SearchHit(snapshot.segments[s].ids[r], score, snapshot.segments[s].document(r))
                for (s, r), score in fused[:k]]
        return SearchResult(hits, snapshot.generation, timings)

    def candidates(self, queries: dict[str, Any], depth: int, params: dict[str, dict] | None = None,
                   filter: Filter | None = None) -> tuple[dict[str, list[tuple[str, float]]], int, dict[str, float]]:
        """Each retriever's best `depth` (id, raw score), unfused, the generation and timings: what a shard
        of a larger collection contributes to its router's merge."""
        snapshot = self.snapshot
        rankings, timings = self._rankings(snapshot, queries, depth, params, filter)
        ids = {name: [(snapshot.segments[s].ids[r], score) for (s, r), score in ranking]
               for name, ranking in rankings.items()}
        return ids, snapshot.generation, timings

    def statistics(self, queries: dict[str, Any]) -> dict[str, Any]:
        """Corpus statistics of the lexical retrievers for their encoded queries (see CorpusStatistics)."""
        snapshot = self.snapshot
        return {name: self.retrievers[name].statistics(snapshot.parts(name), snapshot.searchable_deleted(), query)
                for name, query in queries.items() if self.retrievers[name].needs_corpus_statistics}

    def _rankings(self, snapshot: Snapshot, queries: dict[str, Any], depth: int, params: dict[str, dict] | None,
                  filter: Filter | None) -> tuple[dict[str, list], dict[str, float]]:
        deleted = snapshot.searchable_deleted()
        searchable = snapshot.searchable
        hidden = None
        if filter is not None:
            hidden = [np.flatnonzero(~filter.admits(s.columns, s.ids)[:s.indexed])
                      for s in (snapshot.segments[i] for i in searchable)]
        rankings, timings = {}, {}
        for name, query in queries.items():
            start = time.perf_counter()
            hits = self.retrievers[name].search(snapshot.parts(name), deleted, query, depth, (params or {}).get(name),
                                                hidden)
            rankings[name] = [((searchable[h.segment], h.row), h.score) for h in hits]
            timings[name] = (time.perf_counter() - start) * 1000
        return rankings, timings

    def get(self, doc_id: str) -> Document:
        snapshot = self.snapshot
        if doc_id not in snapshot.id_map:
            raise NotFound(f"no document {doc_id!r} in collection {self.name!r}")
        position, row = snapshot.id_map[doc_id]
        return snapshot.segments[position].document(row)

    def get_many(self, ids: list[str]) -> tuple[list[Document], list[str], int]:
        """(documents found, in the order asked; ids not found; generation), from one snapshot."""
        snapshot = self.snapshot
        found, missing = [], []
        for doc_id in ids:
            if doc_id in snapshot.id_map:
                position, row = snapshot.id_map[doc_id]
                found.append(snapshot.segments[position].document(row))
            else:
                missing.append(doc_id)
        return found, missing, snapshot.generation

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
        with self._write_lock:
            for segment in self.snapshot.segments:
                segment.close()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)
