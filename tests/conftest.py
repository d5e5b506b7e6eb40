"""Shared fixtures: real datasets, a real server process on a loopback port."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from sieve.index.beir import DATASETS
from sieve.index.documents import Document, read_jsonl
from sieve.service.process import ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"dataset {path} is not available")
    return path


def corpus(name: str) -> list[Document]:
    return [doc for doc in read_jsonl(dataset(name) / "corpus.jsonl") if isinstance(doc, Document)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server") / "data").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server):
    from sieve.service.client import SieveClient

    with SieveClient(server.target) as c:
        yield c
