"""Repair: rebuild a collection's manifest from what is intact on disk; damaged files are moved aside
to <collection>/quarantine, never deleted."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .documents import Document
from .errors import CorruptIndex
from .manifest import manifest_number, read_manifest, read_settings
from .registry import make_retrievers
from .segment import SEGMENT_NAME, PreparedBatch, Segment, write_segment
from .storage import file_checksum, remove_temporary, row_checksum, seal, storage_errors, unseal, write_atomically

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"  # damaged files a repair moved aside; Sieve never deletes them


@dataclass
class RepairReport:
    restored_segments: list[str]
    salvaged_documents: int
    lost_documents: int
    quarantined: list[str]
    note: str


def _salvage(folder: Path) -> tuple[dict[int, Document], int, int | None, tuple[str, ...]]:
    """What of a damaged segment is still intact: ({row: document}, rows in all, rows indexed (None:
    unknown), segments it replaced). A row is intact when docs.jsonl as a whole still has its recorded
    checksum, or else when its own bytes match their row checksum."""
    try:
        meta = unseal((folder / "meta.json").read_bytes(), folder.name)
        indexed, replaces, files = int(meta["indexed"]), tuple(meta.get("replaces", ())), meta["files"]
    except Exception:
        indexed, replaces, files = None, (), {}
    try:
        docs = (folder / "docs.jsonl").read_bytes()
    except OSError:
        docs = b""
    lines = docs.split(b"\n")[:-1]  # JSON escapes newlines inside strings
    recorded = files.get("docs.jsonl")
    if docs and isinstance(recorded, dict) and recorded.get("xxh3") == file_checksum(folder / "docs.jsonl"):
        checksums = [row_checksum(line) for line in lines]
    else:
        try:
            checksums = np.load(folder / "rows.xxh3.npy").tolist()
        except Exception:
            checksums = []  # neither can be trusted: no row can be told intact
    intact = {}
    for row, (line, expected) in enumerate(zip(lines, checksums)):
        if row_checksum(line) == expected:
            try:
                intact[row] = Document.from_json(json.loads(line))
            except Exception:
                pass
    return intact, max(len(lines), len(checksums)), indexed, replaces


def _move_aside(path: Path, quarantine: Path) -> str:
    quarantine.mkdir(parents=True, exist_ok=True)
    target = quarantine / path.name
    if target.exists():
        target = quarantine / f"{path.name}.{time.time_ns()}"
    os.rename(path, target)
    return target.name


def repair(directory: Path) -> RepairReport:
    """Rebuild a collection's manifest from what is intact on disk; damaged files are moved to
    <collection>/quarantine, never deleted.

    The base is the newest manifest that reads, with its tombstones. Segments written after its newest
    one are added in commit order (their names are creation times; a compaction's output replaces the
    segments it rewrote), later versions of an id replacing earlier ones as upserts do. The intact
    documents of a damaged segment are re-encoded into a segment that takes its place in that order."""
    root = directory.parent
    label = lambda path: str(path.relative_to(root))  # noqa: E731
    settings = read_settings(directory)
    retrievers = make_retrievers(settings)
    folders = directory / "segments"
    quarantine = directory / QUARANTINE
    with storage_errors(root):
        remove_temporary(directory)
        remove_temporary(folders)
        manifests = sorted(directory.glob("manifest-*.json"), reverse=True)
        on_disk = {d.name: d for d in folders.iterdir() if SEGMENT_NAME.fullmatch(d.name)}
        readable, damaged_manifests = [], []
        for path in manifests:
            try:
                readable.append((path, read_manifest(path, label(path))))
            except CorruptIndex as error:
                log.warning("repair %s: %s", directory.name, error)
                damaged_manifests.append(path)
        # The base: the newest manifest whose segments are all on disk (intact or not) and its tombstones.
        complete = [(p, m) for p, m in readable if all(name in on_disk for name in m["segments"])]
        base_path, base = (complete or readable or [(None, {"generation": 0, "segments": [], "deleted": {}})])[0]
        damaged_manifests += [p for p, m in readable if m["generation"] > base["generation"] and p != base_path]
        newer_damaged = [p for p in damaged_manifests if manifest_number(p) > base["generation"]]

        newest = max(base["segments"], default="")
        order = list(base["segments"]) + sorted(name for name in on_disk if name > newest)
        intact: dict[str, Segment] = {}
        salvaged: dict[str, tuple[dict[int, Document], int, int | None]] = {}
        for name in list(order):
            if name not in on_disk:
                continue
            try:
                intact[name] = Segment(on_disk[name], retrievers, label(on_disk[name]), settings.filterable)
                replaces = intact[name].replaces
            except CorruptIndex as error:
                log.warning("repair %s: %s", directory.name, error)
                *salvaged[name], replaces = _salvage(on_disk[name])
            order = [n for n in order if n not in replaces]
        missing = [name for name in order if name not in on_disk]
        lost = sum(1 for name in order if name in salvaged for row in range(salvaged[name][1])
                   if row not in salvaged[name][0] and row not in base["deleted"].get(name, ()))

        # Replay the commits: the newest version of each id is live, every earlier one a tombstone.
        live: dict[str, tuple[str, int]] = {}
        deleted: dict[str, list[int]] = {name: list(base["deleted"].get(name, ())) for name in order}
        for name in order:
            gone = set(base["deleted"].get(name, ()))
            rows = range(len(intact[name])) if name in intact else salvaged.get(name, ({},))[0]
            for row in rows:
                if row in gone:
                    continue
                doc_id = intact[name].ids[row] if name in intact else salvaged[name][0][row].id
                if doc_id in live:
                    earlier, earlier_row = live[doc_id]
                    deleted[earlier].append(earlier_row)
                live[doc_id] = (name, row)

        segments, restored, moved = [], [], []
        salvaged_count = 0
        for name in order:
            if name in intact:
                segments.append(intact[name])
                restored += [name] if name not in base["segments"] else []
            elif name in salvaged:
                rows, _, indexed = salvaged[name]
                alive = [row for row in sorted(rows) if live.get(rows[row].id) == (name, row)]
                if alive:
                    kept = [rows[r] for r in alive if indexed is None or r < indexed]
                    pruned = [rows[r] for r in alive if indexed is not None and r >= indexed]
                    encoded = {n: r.encode_documents(kept) for n, r in retrievers.items()} if kept else {}
                    batch = PreparedBatch(kept + pruned, len(kept), encoded, None)
                    segment = write_segment(folders, f"{name}-salvaged", batch, retrievers, settings.filterable, label)
                    segments.append(segment)
                    salvaged_count += len(alive)
                    deleted[segment.name] = []
                moved.append(label(quarantine / "segments" / _move_aside(on_disk[name], quarantine / "segments")))
        for path in damaged_manifests:
            moved.append(label(quarantine / _move_aside(path, quarantine)))

        generation = max([base["generation"], *(manifest_number(p) for p in manifests)]) + 1
        write_atomically(directory / f"manifest-{generation:010d}.json", seal({
            "generation": generation,
            "segments": [s.name for s in segments],
            "deleted": {s.name: sorted(deleted.get(s.name, [])) for s in segments if deleted.get(s.name)},
            "committed_at": time.time(),
        }))
        for segment in {id(s): s for s in [*segments, *intact.values()]}.values():
            segment.close()
    notes = []
    if newer_damaged:
        notes.append(f"deletes made after generation {base['generation']} were recorded only in a damaged "
                     "manifest and cannot be known: send them again if there were any")
    if missing:
        notes.append(f"segments named by generation {base['generation']} are missing from disk: "
                     f"{', '.join(missing)}; restore them from a backup and repair again")
    log.warning("repaired collection %s: generation %d, %d segment(s) restored, %d document(s) salvaged, "
                "%d lost; moved aside: %s", directory.name, generation, len(restored), salvaged_count, lost,
                ", ".join(moved) or "nothing")
    return RepairReport(restored, salvaged_count, lost, moved, "; ".join(notes))

