"""The `sieve` command as a new user meets it: one writer per data directory, messages, help, describe, progress."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sieve.index.documents import Document
from sieve.service.cli import DEFAULT_SERVER, main
from sieve.service.process import ServerProcess, free_port


def sieve(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sieve.service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def serve_fails(data, port: int) -> str:
    """`sieve serve` that must exit 1 with one line and no traceback; returns that line."""
    done = sieve("serve", env={"SIEVE_DATA": str(data), "SIEVE_PORT": str(port), "SIEVE_HOST": "127.0.0.1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.strip()][-1]


def test_a_second_writer_on_a_data_directory_is_refused_and_a_replica_is_not(server):
    line = serve_fails(server.data, free_port())
    assert line.startswith("sieve serve: ") and f"{server.data} already has a writer (pid " in line
    assert "SIEVE_READ_ONLY=true" in line
    replica = ServerProcess(server.data, {"SIEVE_READ_ONLY": "true"}).start()  # fails if it were refused
    assert replica.stop() == 0


def test_a_second_server_on_a_used_port_says_address_in_use(server, tmp_path):
    line = serve_fails(tmp_path / "other-data", server.port)
    assert f"cannot listen on 127.0.0.1:{server.port} (SIEVE_PORT): address in use" in line


def test_an_unreachable_server_gets_a_hint_not_a_traceback(server):
    address = f"127.0.0.1:{free_port()}"
    done = sieve("collections", "list", "--server", address)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"no Sieve server answered at {address}" in done.stderr and "sieve serve" in done.stderr
    answered = sieve("search", "owls", "--collection", "nowhere", "--server", server.target)
    assert answered.returncode == 1 and "NOT_FOUND" in answered.stderr and "hint" not in answered.stderr


def test_describe_shows_real_numbers_as_a_table_and_as_json(server, client):
    client.create_collection("described", {"indexes": ["dense", "bm25"], "hnsw_m": 16})
    client.upsert("described", [[Document("a", "Owls hunt at night."), Document("b", "Bees make honey.")]])
    as_json = sieve("collections", "describe", "described", "--json", "--server", server.target)
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    assert info["stats"]["documents"] == 2 and isinstance(info["stats"]["bytes_on_disk"], int)
    assert info["settings"]["hnsw_m"] == 16 and isinstance(info["settings"]["hnsw_m"], int)
    assert info["settings"]["bm25_b"] == 0.4 and info["details"]["dense"]["vectors"] == 2
    table = sieve("collections", "describe", "described", "--server", server.target).stdout
    assert re.search(r"^documents\s+2$", table, re.M) and re.search(r"^settings\.hnsw_m\s+16$", table, re.M)
    assert re.search(r"^details\.dense\.vectors\s+2$", table, re.M)
    assert re.search(r"^settings\.indexes\s+dense, bm25$", table, re.M)
    assert ".0\n" not in table and '"2"' not in table
    listed = sieve("collections", "list", "--server", server.target).stdout
    assert re.search(r"^described\s+ok\s+2\s+\d+$", listed, re.M)


@pytest.mark.parametrize("command, expected", [
    (["search"], ["-k K", "results to return (default: 10)", f"(default: {DEFAULT_SERVER})", "(default: the collection's)"]),
    (["ingest"], ["(default: 64)", "--strict", "exit 1 if any line was skipped"]),
    (["serve"], ["(default: SIEVE_DATA, else ./sieve-data)", "(default: SIEVE_PORT, else 50051)"]),
    (["pruned"], ["(0: all) (default: 0)"]),
    (["evaluate"], ["(default: test)", "(default: 50)"]),
    ([], ["examples:", "sieve serve"]),
])
def test_help_texts_show_defaults(command, expected, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one flag a line
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    for snippet in expected:
        assert snippet in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_search_needs_a_collection(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["search", "owls"])
    assert exited.value.code == 2 and "the following arguments are required: --collection" in capsys.readouterr().err


def test_ingest_progress_ends_at_100_percent_with_counts(server, tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text("\n".join([json.dumps({"_id": "a", "text": "Owls hunt at night."}), "{not json",
                               json.dumps({"_id": "b", "text": "Bees make honey."}), json.dumps({"title": "no id"})]))
    done = sieve("ingest", str(path), "--collection", "progress", "--batch-size", "1", "--server", server.target)
    assert done.returncode == 0, done.stderr
    final = done.stderr.replace("\r", "\n").split("ingest lines.jsonl: ")[-1]
    assert final.startswith("100%") and "4/4 [" in final and "<00:00" in final  # elapsed<remaining: the ETA
    assert "ingested=2, pruned=0, skipped=2" in final
    assert "ingested 2 documents into 'progress', pruned 0 by quality, skipped 2 malformed lines" in done.stdout
