"""A collection's commit records: settings.json and the manifests, each naming the segments and
tombstones of one generation, checked field by field on read; and the Snapshot a generation serves."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptIndex, InvalidArgument
from .segment import SEGMENT_NAME, Segment
from .settings import CollectionSettings
from .storage import unseal

MANIFESTS_KEPT = 2  # the newest, and the one before it to fall back to if the newest is damaged
MANIFEST_KEYS = {"generation", "segments", "deleted", "committed_at"}


def read_manifest(path: Path, label: str) -> dict:
    """A manifest whose checksum and every field check out, or CorruptIndex naming what is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CorruptIndex(f"{label}: cannot be read ({error.strerror})") from None
    manifest = unseal(raw, label)

    def check(condition: bool, what: str) -> None:
        if not condition:
            raise CorruptIndex(f"{label}: {what}")

    check(set(manifest) >= {"generation", "segments", "deleted"}, "a field is missing")
    check(set(manifest) <= MANIFEST_KEYS, f"unknown field(s) {sorted(set(manifest) - MANIFEST_KEYS)}")
    check(type(manifest["generation"]) is int and manifest["generation"] >= 0, "'generation' is not a number >= 0")
    segments, deleted = manifest["segments"], manifest["deleted"]
    check(isinstance(segments, list) and all(isinstance(n, str) and SEGMENT_NAME.fullmatch(n) for n in segments)
          and len(set(segments)) == len(segments), "'segments' is not a list of distinct segment names")
    check(isinstance(deleted, dict) and set(deleted) <= set(segments)
          and all(isinstance(rows, list) and all(type(r) is int and r >= 0 for r in rows) for rows in deleted.values()),
          "'deleted' is not a mapping of its segments to row numbers")
    return manifest


def manifest_number(path: Path) -> int:
    return int(path.stem.split("-")[1])


def read_settings(directory: Path) -> CollectionSettings:
    path = directory / "settings.json"
    label = str(path.relative_to(directory.parent))
    try:
        return CollectionSettings.from_dict(unseal(path.read_bytes(), label))
    except OSError as error:
        raise CorruptIndex(f"{label}: cannot be read ({error.strerror})") from None
    except InvalidArgument as error:
        raise CorruptIndex(f"{label}: {error}") from None


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

    @classmethod
    def from_manifest(cls, manifest: dict, segments: list[Segment]) -> Snapshot:
        """The snapshot a manifest describes, over its segments (opened, in the manifest's order)."""
        deleted = tuple(np.array(sorted(manifest["deleted"].get(s.name, [])), "int64") for s in segments)
        for segment, gone in zip(segments, deleted):
            if len(gone) and gone[-1] >= len(segment):
                raise CorruptIndex(f"tombstone row {gone[-1]} is beyond {segment.label} ({len(segment)} rows)")
        id_map: dict[str, tuple[int, int]] = {}
        for position, (segment, gone) in enumerate(zip(segments, deleted)):
            dead = set(gone.tolist())
            for row, doc_id in enumerate(segment.ids):
                if row not in dead:
                    id_map[doc_id] = (position, row)
        return cls(manifest["generation"], tuple(segments), deleted, id_map)
