"""The collections of one data directory: create, open, list, drop."""
from __future__ import annotations

import logging
import re
import shutil
import threading
import uuid
from pathlib import Path

from .collection import Collection
from .errors import AlreadyExists, CorruptIndex, InvalidArgument, NotFound
from .settings import CollectionSettings

log = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Catalog:
    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.collections: dict[str, Collection] = {}
        self.broken: dict[str, str] = {}  # name -> why it could not be opened
        for directory in sorted(self.data_dir.iterdir()):
            if directory.is_dir() and NAME.match(directory.name):
                try:
                    self.collections[directory.name] = Collection.open(directory)
                except CorruptIndex as error:
                    log.error("collection %s cannot be opened: %s", directory.name, error)
                    self.broken[directory.name] = str(error)
            elif directory.name.startswith(".trash-"):
                shutil.rmtree(directory, ignore_errors=True)

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
        with self._lock:
            collection = self.get(name)
            del self.collections[name]
            trash = self.data_dir / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            (self.data_dir / name).rename(trash)  # atomic: a crash never leaves half a collection
            collection.close()
            shutil.rmtree(trash, ignore_errors=True)

    def names(self) -> list[str]:
        return sorted(self.collections)
