"""Documents, and reading them from JSONL files or BEIR-layout folders."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InvalidArgument

MAX_ID_CHARS = 512


@dataclass(frozen=True)
class Document:
    id: str
    text: str = ""
    title: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def content(self) -> str:
        """What the encoders see: title and text, as BEIR models are evaluated."""
        return f"{self.title}\n{self.text}" if self.title else self.text

    def to_json(self) -> dict:
        return {"_id": self.id, "title": self.title, "text": self.text, "metadata": self.metadata}

    @classmethod
    def from_json(cls, obj: object) -> "Document":
        """Build from a BEIR/JSONL object ({"_id","title","text","metadata"}); "id" is accepted too."""
        if not isinstance(obj, dict):
            raise InvalidArgument("a document must be a JSON object")
        doc_id = obj.get("_id", obj.get("id"))
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidArgument("'metadata' must be a JSON object")
        for key in ("title", "text"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise InvalidArgument(f"'{key}' must be a string")
        return cls(id=doc_id, title=obj.get("title") or "", text=obj.get("text") or "", metadata=metadata)


def validate_document(doc: Document) -> None:
    if not isinstance(doc.id, str) or not doc.id.strip():
        raise InvalidArgument("document id is missing or empty")
    if len(doc.id) > MAX_ID_CHARS:
        raise InvalidArgument(f"document id longer than {MAX_ID_CHARS} characters: {doc.id[:40]}...")
    if not (doc.title.strip() or doc.text.strip()):
        raise InvalidArgument(f"document {doc.id!r} has neither title nor text")


def stored_size(doc: Document) -> int:
    """Characters of text, title and metadata (as stored JSON): what a per-document size limit counts."""
    return len(doc.text) + len(doc.title) + (len(json.dumps(doc.metadata, ensure_ascii=False)) if doc.metadata else 0)


def validate_batch(docs: list[Document], max_docs: int | None = None, max_chars: int | None = None) -> None:
    """Reject the whole batch on the first problem, so that nothing is half-written."""
    if not docs:
        raise InvalidArgument("the batch holds no documents")
    if max_docs is not None and len(docs) > max_docs:
        raise InvalidArgument(f"the batch holds {len(docs)} documents; the limit is {max_docs}")
    seen: set[str] = set()
    for position, doc in enumerate(docs):
        try:
            validate_document(doc)
        except InvalidArgument as error:
            raise InvalidArgument(f"document {position} of the batch: {error}") from None
        if max_chars is not None and (size := stored_size(doc)) > max_chars:
            raise InvalidArgument(f"document {position} ({doc.id!r}) is {size} characters of text, title "
                                  f"and metadata; the limit is {max_chars}")
        if doc.id in seen:
            raise InvalidArgument(f"document id {doc.id!r} appears twice in one batch")
        seen.add(doc.id)


@dataclass(frozen=True)
class BadLine:
    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def read_jsonl(path: str | Path) -> Iterator[Document | BadLine]:
    """Yield each line's document, or a BadLine naming the file and line of one that is malformed."""
    path = Path(path)
    with path.open("rb") as lines:
        yield from parse_jsonl(lines, path)


def parse_jsonl(lines: Iterable[bytes], path: Path) -> Iterator[Document | BadLine]:
    """read_jsonl over lines already read (a Ray worker's file, from any file system)."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            doc = Document.from_json(json.loads(raw.decode("utf-8")))
            validate_document(doc)
        except UnicodeDecodeError:
            yield BadLine(path, number, "not valid UTF-8")
        except json.JSONDecodeError as error:
            yield BadLine(path, number, f"not valid JSON ({error.msg})")
        except InvalidArgument as error:
            yield BadLine(path, number, str(error))
        else:
            yield doc


def batches(items: Iterable[Document | BadLine], size: int,
            problems: list[str]) -> Iterator[tuple[list[Document], int]]:
    """Batches of valid documents, each with the number of lines read up to its end (skipped ones too,
    appended to `problems`); a repeated id starts a new batch so the later line wins. `sieve ingest` and
    the Ray path cut a file with this one rule, so their batches (and pruning, segments) are the same."""
    batch: dict[str, Document] = {}
    lines = 0
    for item in items:
        if isinstance(item, BadLine):
            problems.append(str(item))
        else:
            if item.id in batch or len(batch) >= size:
                yield list(batch.values()), lines
                batch = {}
            batch[item.id] = item
        lines += 1
    if batch:
        yield list(batch.values()), lines


def corpus_file(path: str | Path) -> Path:
    """A JSONL file, or the corpus.jsonl of a BEIR-layout folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no such corpus file: {path}")
    return path
