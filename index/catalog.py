"""The collections of one data directory: create, open, list, drop."""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path

from .collection import Collection
from .errors import AlreadyExists, CorruptIndex, InvalidArgument, NotFound, ReadOnly
from .repair import RepairReport, repair
from .settings import CollectionSettings
from .storage import remove_temporary, storage_errors

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Catalog:
    def __init__(self, data_dir: str | Path, read_only: bool = False):
        self.data_dir = Path(data_dir)
        self.read_only = read_only
        if not read_only:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.collections: dict[str, Collection] = {}
        self.broken: dict[str, str] = {}  # name -> why it could not be opened
        self.refresh()

    def refresh(self) -> None:
        """Open collections that appeared, forget dropped ones, and (read-only) follow new generations."""
        present = set()
        if not self.read_only:
            remove_temporary(self.data_dir)  # collections whose creation was interrupted
        for directory in sorted(self.data_dir.iterdir()) if self.data_dir.is_dir() else []:
            if directory.name.startswith(".trash-") and not self.read_only:
                shutil.rmtree(directory, ignore_errors=True)
            if not (directory.is_dir() and NAME.fullmatch(directory.name) and (directory / "settings.json").exists()):
                continue
            present.add(directory.name)
            try:
                if directory.name in self.collections:
                    self.collections[directory.name].refresh()
                else:
                    self.collections[directory.name] = Collection.open(directory, self.read_only)
                self.broken.pop(directory.name, None)
            except Exception as error:  # whatever the damage, only this collection is out of service
                reason = str(error) if isinstance(error, CorruptIndex) else f"{type(error).__name__}: {error}"
                log.error("collection %s cannot be opened: %s", directory.name, reason)
                self.broken[directory.name] = reason
        for name in set(self.collections) - present:
            self.collections.pop(name).close()

    def get(self, name: str) -> Collection:
        if not name:
            raise InvalidArgument("no collection named in the request")
        try:
            return self.collections[name]
        except KeyError:
            if name in self.broken:
                raise CorruptIndex(f"collection {name!r} is damaged and out of service until `sieve collections "
                                   f"repair {name}` (or drop): {self.broken[name]}") from None
            raise NotFound(f"no collection named {name!r}") from None

    def create(self, name: str, settings: CollectionSettings) -> Collection:
        if self.read_only:
            raise ReadOnly("this replica is read-only; create collections on the writer")
        if not NAME.fullmatch(name or ""):
            raise InvalidArgument(
                f"invalid collection name {name!r}: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
        with self._lock:
            if name in self.collections or (self.data_dir / name).exists():
                raise AlreadyExists(f"collection {name!r} already exists")
            collection = Collection.create(self.data_dir / name, settings)
            self.collections[name] = collection
            return collection

    def repair(self, name: str) -> RepairReport:
        """Rebuild a degraded or damaged collection from its intact files, then serve it again."""
        if self.read_only:
            raise ReadOnly("this replica is read-only; repair collections on the writer")
        with self._lock:
            if name not in self.collections and name not in self.broken:
                raise NotFound(f"no collection named {name!r}")
            collection = self.collections.pop(name, None)
            if collection is not None:
                collection.close()  # waits for a write half-way through
            try:
                report = repair(self.data_dir / name)
            finally:
                self.refresh()
            return report

    def restore(self, snapshot: Path, name: str) -> Collection:
        """A snapshot folder (Collection.copy_to) as collection `name`, verified (every checksum) first."""
        if self.read_only:
            raise ReadOnly("this replica is read-only; restore collections on the writer")
        if not NAME.fullmatch(name or ""):
            raise InvalidArgument(f"invalid collection name {name!r}")
        if not (snapshot / "settings.json").is_file():
            raise NotFound(f"no snapshot at {snapshot.name!r}")
        source = Collection.open(snapshot, read_only=True)  # verifies every file it will serve
        try:
            if source.health.problems:
                raise CorruptIndex(f"snapshot {snapshot.name!r} is damaged: {source.health.problems[0]}")
            with self._lock:
                if name in self.collections or (self.data_dir / name).exists():
                    raise AlreadyExists(f"collection {name!r} already exists; drop it first or restore under "
                                        "another name")
                source.copy_to(self.data_dir / name)
                os.utime(self.data_dir / name / "settings.json")  # a new incarnation (Collection.incarnation)
                self.collections[name] = Collection.open(self.data_dir / name)
                return self.collections[name]
        finally:
            source.close()

    def drop(self, name: str) -> None:
        if self.read_only:
            raise ReadOnly("this replica is read-only; drop collections on the writer")
        with self._lock:
            if name not in self.broken:  # a damaged collection can be dropped too
                self.get(name)
            collection = self.collections.pop(name, None)
            self.broken.pop(name, None)
            trash = self.data_dir / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            with storage_errors(self.data_dir):
                (self.data_dir / name).rename(trash)  # atomic: a crash never leaves half a collection
            if collection is not None:
                collection.close()
            shutil.rmtree(trash, ignore_errors=True)

    def names(self) -> list[str]:
        return sorted(self.collections)
