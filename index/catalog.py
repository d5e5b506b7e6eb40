"""The collections of one data directory: create, open, list, drop."""
from __future__ import annotations

import logging
import re
import shutil
import threading
import uuid
from pathlib import Path

from .collection import Collection
from .errors import AlreadyExists, CorruptIndex, InvalidArgument, NotFound, ReadOnly, SieveError
from .settings import CollectionSettings

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
        for directory in sorted(self.data_dir.iterdir()) if self.data_dir.is_dir() else []:
            if directory.name.startswith(".trash-") and not self.read_only:
                shutil.rmtree(directory, ignore_errors=True)
            if not (directory.is_dir() and NAME.match(directory.name) and (directory / "settings.json").exists()):
                continue
            present.add(directory.name)
            try:
                if directory.name in self.collections:
                    self.collections[directory.name].refresh()
                else:
                    self.collections[directory.name] = Collection.open(directory, self.read_only)
                self.broken.pop(directory.name, None)
            except SieveError as error:  # damaged files, or settings this version cannot honour
                log.error("collection %s cannot be opened: %s", directory.name, error)
                self.broken[directory.name] = str(error)
        for name in set(self.collections) - present:
            self.collections.pop(name).close()

    def get(self, name: str) -> Collection:
        if not name:
            raise InvalidArgument("no collection named in the request")
        try:
            return self.collections[name]
        except KeyError:
            if name in self.broken:
                raise CorruptIndex(f"collection {name!r} is damaged: {self.broken[name]}") from None
            raise NotFound(f"no collection named {name!r}") from None

    def create(self, name: str, settings: CollectionSettings) -> Collection:
        if self.read_only:
            raise ReadOnly("this replica is read-only; create collections on the writer")
        if not NAME.match(name or ""):
            raise InvalidArgument(
                f"invalid collection name {name!r}: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
        with self._lock:
            if name in self.collections or (self.data_dir / name).exists():
                raise AlreadyExists(f"collection {name!r} already exists")
            collection = Collection.create(self.data_dir / name, settings)
            self.collections[name] = collection
            return collection

    def drop(self, name: str) -> None:
        if self.read_only:
            raise ReadOnly("this replica is read-only; drop collections on the writer")
        with self._lock:
            collection = self.get(name)
            del self.collections[name]
            trash = self.data_dir / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            (self.data_dir / name).rename(trash)  # atomic: a crash never leaves half a collection
            collection.close()
            shutil.rmtree(trash, ignore_errors=True)

    def names(self) -> list[str]:
        return sorted(self.collections)
