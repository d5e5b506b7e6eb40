"""Reranking through the server: the Rerank RPC, retrieve -> fuse -> rerank, limits and defaults."""
from __future__ import annotations

import grpc
import pytest

from sieve.v1 import sieve_pb2 as pb

from conftest import corpus, dataset


@pytest.fixture(scope="module")
def adi(client):
    docs = corpus("adi")
    client.create_collection("adi", {"indexes": ["dense", "bm25"]})
    client.upsert("adi", [docs[i:i + 41] for i in range(0, len(docs), 41)])
    return docs


def code_of(call):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_rerank_rpc_orders_callers_passages(client, adi):
    target = adi[20]
    passages = [(d.id, d.content) for d in adi[:30]]
    response = client.rerank(target.title, passages, k=5)
    assert len(response.results) == 5
    assert response.results[0].id == target.id and response.results[0].index == 20
    assert [r.score for r in response.results] == sorted((r.score for r in response.results), reverse=True)
    everything = client.rerank(target.title, passages, options=pb.RerankOptions(prune=False))
    assert len(everything.results) == 30 and list(everything.survivors) == [30]
    assert everything.results[0].id == target.id


def test_rerank_rpc_takes_per_layer_margins(client, adi):
    passages = [(d.id, d.content) for d in adi[:20]]
    tight = client.rerank(adi[3].title, passages, k=5, options=pb.RerankOptions(checkpoints=[1, 2], margins={1: 0.0}))
    assert list(tight.survivors) == [20, 10, 10]  # k + 5 kept at layer 1; layer 2 has no margin, keeps all
    loose = client.rerank(adi[3].title, passages, k=5, options=pb.RerankOptions(checkpoints=[1, 2], margins={1: 1e6, 2: 0.0}))
    assert list(loose.survivors) == [20, 20, 10]


def test_search_reranks_fused_candidates_with_early_pruning(client, adi):
    target = adi[33]
    request = {"rerank": pb.RerankOptions(enabled=True, candidates=40)}
    response = client.search("adi", target.title, k=5, **request)
    assert len(response.results) == 5 and response.results[0].id == target.id
    assert "rerank" in response.timings_ms
    survivors = list(response.survivors)
    assert survivors[0] == 40 and survivors[-1] < 40 and min(survivors) >= 5
    full = client.search("adi", target.title, k=5, rerank=pb.RerankOptions(enabled=True, candidates=40, prune=False))
    assert list(full.survivors) == [40]
    plain = client.search("adi", target.title, k=5)  # no measured run: the fused first stage
    assert "rerank" not in plain.timings_ms and not plain.survivors
    reason = client.describe("adi").stats.details["rerank"]["reason"]
    assert "no measured run" in reason


@pytest.mark.parametrize("request_fields, words", [
    ({"query": " "}, "query is empty"),
    ({"passages": []}, "no passages"),
    ({"passages": [pb.Passage(id="x", text="a")] * 501}, "limit is 500"),
    ({"passages": [pb.Passage(id="x", text="  ")]}, "is empty"),
    ({"k": -1}, "k must be >= 0"),
    ({"options": pb.RerankOptions(checkpoints=[0])}, "checkpoints"),
    ({"options": pb.RerankOptions(margin=-1)}, "margin"),
    ({"options": pb.RerankOptions(margins={1: -0.5})}, "margins"),
    ({"options": pb.RerankOptions(margin=1.0, margins={1: 0.5})}, "not both"),
    ({"collection": "nowhere"}, "no collection"),
])
def test_rerank_rejects_bad_requests(client, adi, request_fields, words):
    fields = {"query": "indexing", "passages": [pb.Passage(id="a", text="automatic indexing")], **request_fields}
    request = pb.RerankRequest(**fields)
    code, details = code_of(lambda: client.search_stub.Rerank(request, timeout=60))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) and words in details


def test_search_rerank_limits(client, adi):
    code, details = code_of(lambda: client.search("adi", "indexing", rerank=pb.RerankOptions(enabled=True, candidates=900)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1..500" in details


def test_evaluate_measures_and_sets_the_default(server, client, adi):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "sieve.service.cli", "evaluate", "--data", str(server.data),
                          "--collection", "adi", "--queries", str(dataset("adi")), "--candidates", "10"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "reranking is ON" in run.stdout or "reranking is OFF" in run.stdout
    details = client.describe("adi").stats.details["rerank"]
    assert "35 judged queries" in details["reason"]
    assert details["default"] == ("reranking is ON" in run.stdout)
    plain = client.search("adi", adi[5].title, k=3)
    assert ("rerank" in plain.timings_ms) == details["default"]


def test_a_hub_cross_encoder_gets_early_pruning_from_exit_heads_trained_without_labels(tmp_path):
    """A collection reranking with a plain Hugging Face cross-encoder: unpruned, saying why, until
    `sieve train exit-heads` fits heads to its own passages and first stage; then its reranks prune, and a
    snapshot carries the heads."""
    import subprocess
    import sys

    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from sieve.index.encoders import resolve_encoder
    from sieve.service.client import SieveClient
    from sieve.service.process import ServerProcess

    model = tmp_path / "models" / "hub-cross-encoder"
    torch.manual_seed(3)
    BertForSequenceClassification.from_pretrained(resolve_encoder(""), num_labels=1).save_pretrained(model)
    AutoTokenizer.from_pretrained(resolve_encoder("")).save_pretrained(model)
    server = ServerProcess(tmp_path / "data", {"SIEVE_MODEL_ROOTS": str(model.parent)}).start()
    try:
        with SieveClient(server.target) as client:
            docs = corpus("adi")
            client.create_collection("hub", {"indexes": ["bm25"], "reranker": str(model), "quality_estimator": "none",
                                             "rerank_candidates": 15})
            client.upsert("hub", [docs])
            pruning = client.describe("hub").stats.details["rerank"]["pruning"]
            assert pruning.startswith("off:") and "sieve train exit-heads --collection hub" in pruning
            passages = [(d.id, d.content) for d in docs[:30]]
            assert list(client.rerank(docs[4].title, passages, k=5, collection="hub").survivors) == [30]
            code, message = code_of(lambda: client.rerank(docs[4].title, passages, k=5, collection="hub",
                                                          options=pb.RerankOptions(checkpoints=[2])))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "only at its last layer" in message

            run = subprocess.run([sys.executable, "-m", "sieve.service.cli", "train", "exit-heads", "--data",
                                  str(server.data), "--collection", "hub", "--pseudo-queries", "16"],
                                 capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr
            assert "exit heads for 'hub'" in run.stdout and "pseudo-queries x 15 candidates" in run.stdout
            assert "exit heads trained without labels" in client.describe("hub").stats.details["rerank"]["pruning"]
            pruned = client.rerank(docs[4].title, passages, k=5, collection="hub",
                                   options=pb.RerankOptions(checkpoints=[2], margins={2: 0.0}))
            assert list(pruned.survivors)[0] == 30 and list(pruned.survivors)[1] < 30
            full = client.rerank(docs[4].title, passages, k=5, collection="hub", options=pb.RerankOptions(prune=False))
            assert list(full.survivors) == [30]
            snapshot = client.snapshot("hub")
            assert (server.data / snapshot.path / "exit_heads" / "config.json").is_file()
    finally:
        server.stop()
