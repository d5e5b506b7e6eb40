"""The reranker's training recipe end to end on a small slice of SciFact train (a few real steps)."""
from __future__ import annotations

import json

import pytest
import numpy as np
import torch
from safetensors.torch import load_file

from sieve.index.beir import load_beir
from sieve.rankers import load_reranker
from sieve.rankers.artifact import base_model, save_artifact
from sieve.rankers.calibration import pruning_frontier
from sieve.rankers.training import main as train_main

from conftest import dataset


@pytest.fixture(scope="module")
def small_beir(tmp_path_factory):
    """20 SciFact train claims, their abstracts and 80 other abstracts, in BEIR layout."""
    corpus, queries, qrels = load_beir(dataset("scifact"), "train")
    chosen = sorted(queries)[:20]
    keep = {d for q in chosen for d in qrels[q]} | set(sorted(corpus)[:80])
    folder = tmp_path_factory.mktemp("beir")
    with open(folder / "corpus.jsonl", "w") as f:
        for d in sorted(keep):
            f.write(json.dumps({"_id": d, **corpus[d]}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for q in chosen:
            f.write(json.dumps({"_id": q, "text": queries[q]}) + "\n")
    (folder / "qrels").mkdir()
    with open(folder / "qrels" / "train.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q in chosen for d in qrels[q])
    return folder


def test_training_writes_a_loadable_artifact_of_only_the_trained_weights(small_beir, tmp_path, monkeypatch):
    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "artifact"
    train_main(["--data", str(small_beir), "--out", str(out), "--minutes", "0.15", "--threads", "2",
                "--titles", "10", "--sentences", "10", "--dev-depth", "12", "--checkpoint-minutes", "0.05",
                "--trainable-top", "2"])
    config = json.loads((out / "config.json").read_text())
    curve = config["training"]["dev_curve"]
    assert len(curve) >= 2 and config["training"]["steps"] > 0  # periodic checkpoints plus the final one
    assert set(config["margins_by_recall"]["0.99"]) == {"1", "2", "3", "4", "5"} and 0 < config["fusion_weight"] <= 1
    assert set(config["margins"]) == set(map(str, config["default_checkpoints"]))  # the chosen setting's
    frontier = config["pruning_frontier"]
    assert frontier and all(a["top10_overlap"] >= b["top10_overlap"] and a["speedup"] < b["speedup"]
                            for a, b in zip(frontier, frontier[1:]))

    stored = load_file(str(out / "weights.safetensors"))
    layers = {int(key.split(".")[3]) for key in stored if key.startswith("bert.encoder.layer.")}
    assert layers == {4, 5}  # 0-based: BERT layers 5 and 6, the trainable ones; nothing else is copied
    base, _ = base_model()
    trained = load_reranker(str(out), dtype="float32").model
    assert not torch.equal(trained.bert.encoder.layer[5].output.dense.weight, base.bert.encoder.layer[5].output.dense.weight)
    assert torch.equal(trained.bert.encoder.layer[0].output.dense.weight, base.bert.encoder.layer[0].output.dense.weight)


def test_training_resumes_from_an_artifact(small_beir, tmp_path, monkeypatch):
    monkeypatch.setenv("SIEVE_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--data", str(small_beir), "--minutes", "0.05", "--threads", "2", "--titles", "5",
              "--sentences", "5", "--dev-depth", "12", "--checkpoint-minutes", "0"]
    train_main(common + ["--out", str(first)])
    train_main(common + ["--out", str(second), "--resume", str(first)])
    assert json.loads((second / "config.json").read_text())["resumed_from"] == str(first)
    assert load_file(str(first / "weights.safetensors")).keys() == load_file(str(second / "weights.safetensors")).keys()
    before, after = (load_reranker(str(folder), dtype="float32").model.bert.encoder.layer[5].output.dense.weight
                     for folder in (first, second))
    assert not torch.equal(before, after)  # it trained on from there ...
    assert (before - after).abs().max() < 0.05  # ... not from scratch


def test_artifact_stores_int8_deltas_that_load_back_within_their_rounding(tmp_path):
    model, _ = base_model()
    base = {name: p.detach().clone() for name, p in model.bert.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.bert.encoder.layer[5].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.002)
    save_artifact(model, tmp_path, {"checkpoint_layers": list(model.checkpoint_layers), "max_length": 256,
                                    "training": {"trainable_layers": [6]}}, base)
    stored = load_file(str(tmp_path / "weights.safetensors"))
    assert stored["bert.encoder.layer.5.output.dense.weight.delta_int8"].dtype == torch.int8
    assert not any(".layer.4." in key for key in stored)  # untrained layers are not stored
    loaded = load_reranker(str(tmp_path), dtype="float32").model
    for (name, trained), (_, back) in zip(model.bert.encoder.layer[5].named_parameters(),
                                          loaded.bert.encoder.layer[5].named_parameters()):
        delta = (trained - base[f"encoder.layer.5.{name}"]).abs().max()
        assert (trained - back).abs().max() <= delta / 254 + 1e-3 * trained.abs().max(), name
        assert not torch.equal(back, base[f"encoder.layer.5.{name}"])


def test_pruning_frontier_trades_overlap_for_speed():
    """Early heads that already know the final order prune safely; noisy ones must give up overlap to save."""
    g = torch.Generator().manual_seed(0)
    final = [torch.randn(60, generator=g) for _ in range(20)]
    perfect = [torch.stack([f] * 6) for f in final]
    margins = {r: {str(l): m for l in range(1, 6)} for r, m in (("0.9", 0.1), ("0.99", 1.0))}
    frontier = pruning_frontier(perfect, margins)
    assert max(s["speedup"] for s in frontier) > 2.5 and all(s["top10_overlap"] == 1.0 for s in frontier)

    noisy = [torch.stack([f + torch.randn(60, generator=g) * (6 - l) / 3 for l in range(1, 7)]) for f in final]
    frontier = pruning_frontier(noisy, margins)
    assert len(frontier) >= 2 and frontier[0]["top10_overlap"] > frontier[-1]["top10_overlap"]
    assert frontier[0]["speedup"] < frontier[-1]["speedup"]


def test_first_stage_fuses_pooled_maxsim_from_cached_index_parts(small_beir, tmp_path, monkeypatch):
    from sieve.index.multivector import MultiVectorRetriever
    from sieve.rankers.first_stage import FirstStage

    corpus, _, _ = load_beir(small_beir, "train")
    cache = tmp_path / "first_stage"
    stage = FirstStage(corpus, cache=cache, multivector=True)
    part = stage.parts["multivector"]
    assert part.documents == len(corpus)
    assert part.vectors < 0.6 * int(part.raw_counts.sum())  # pool factor 2 really applied
    plain = FirstStage(corpus, cache=cache)
    doc = sorted(corpus)[3]
    fused, two_way = stage.search([corpus[doc]["title"]], 10)[0], plain.search([corpus[doc]["title"]], 10)[0]
    assert fused.ids[0] == doc
    assert fused.rrf[0] > two_way.rrf[0]  # a third list voted for it
    # the scores beside each candidate are the retrievers' own: exact cosine, and BM25 where BM25 found it
    assert np.allclose(two_way.dense, [stage.parts["dense"].vectors[stage.ids.index(i)] @
                                       stage.retrievers["dense"].encode_queries([corpus[doc]["title"]])[0]
                                       for i in two_way.ids], atol=1e-5)
    assert two_way.bm25[0] > 0

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached index parts should have been reused, not rebuilt")

    monkeypatch.setattr(MultiVectorRetriever, "write", no_encoding)
    again = FirstStage(corpus, cache=cache, multivector=True)
    assert again.search([corpus[doc]["title"]], 10)[0].ids == fused.ids
