"""Passage-quality estimators and static pruning, on ADI and a SciFact slice with real models."""
import json

import numpy as np
import pytest

from sieve.index.collection import Collection
from sieve.index.documents import Document
from sieve.index.errors import InvalidArgument, NotFound
from sieve.index.quality import (
    MIN_BATCH_FOR_RATIO, QUALITY_ARTIFACT, prune_mask, quality_model, score_passages, split_by_quality,
)
from sieve.index.settings import CollectionSettings

from conftest import DATASETS

DATA = DATASETS
JUNK = ["buy now " * 40, "asdkj qwpoe zmxnv " * 10, "click here", "x"]
EDGE = ["", "x", "word " * 5000, "Der Hund läuft schnell über die Wiese.", "中文文本" * 200]
UNSUPERVISED = ["unique_terms", "lm_divergence", "embedding_norm"]


def corpus(name: str, limit: int | None = None) -> list[Document]:
    with open(DATA / name / "corpus.jsonl") as lines:
        docs = [Document.from_json(json.loads(line)) for line in lines]
    return docs[:limit] if limit else docs


@pytest.fixture(scope="module")
def adi() -> list[Document]:
    return corpus("adi")


@pytest.mark.parametrize("estimator,dataset", [(e, "adi") for e in UNSUPERVISED] + [("supervised", "scifact")])
def test_junk_scores_below_real_passages(estimator, dataset):
    # The supervised classifier learnt SciFact's notion of a useful passage: it is checked on its own
    # domain (on ADI, off-domain, "buy now" x 40 scores near the median real passage).
    real_docs = corpus(dataset, 82)
    scores = score_passages([d.content for d in real_docs] + JUNK, estimator)
    real, junk = scores[:len(real_docs)], scores[len(real_docs):]
    assert junk.max() < np.median(real), (estimator, junk, np.median(real))


@pytest.mark.parametrize("estimator", UNSUPERVISED + ["supervised"])
def test_edge_passages_get_finite_scores(adi, estimator):
    scores = score_passages([d.content for d in adi[:10]] + EDGE, estimator)
    assert scores.dtype == np.float32 and len(scores) == 10 + len(EDGE) and np.isfinite(scores).all()


def test_supervised_model_prefers_judged_scifact_passages():
    """SciFact train positives (the classifier's own label) outrank other passages on average."""
    from sieve.index.beir import load_beir, passage_text, relevant

    docs, _, qrels = load_beir(DATA / "scifact", "train")
    judged = set().union(*relevant(qrels, docs).values())
    positives = sorted(judged)[:60]
    negatives = [d for d in sorted(docs) if d not in judged][:60]
    scores = score_passages([passage_text(docs[d]) for d in positives + negatives], "supervised")
    assert scores[:60].mean() > scores[60:].mean()


def test_percentile_and_threshold_counts():
    scores = np.arange(100, dtype="float32")[::-1].copy()
    assert prune_mask(scores, 0.25, None).sum() == 25
    assert set(np.flatnonzero(prune_mask(scores, 0.25, None))) == set(range(75, 100))  # the lowest
    assert prune_mask(scores, 0.0, None).sum() == 0
    assert prune_mask(scores, 0.5, 10.0).sum() == 10  # a threshold takes precedence
    assert prune_mask(scores, 0.0, 1000.0).all()  # a threshold may prune everything: it says so
    small = scores[:MIN_BATCH_FOR_RATIO - 1]
    assert prune_mask(small, 0.5, None).sum() == 0  # no percentile of a handful of passages


def test_split_keeps_order_and_aligns_scores(adi):
    settings = CollectionSettings(quality_estimator="unique_terms", prune_ratio=0.25)
    kept, pruned, quality = split_by_quality(adi, settings)
    assert len(pruned) == int(0.25 * len(adi)) and len(kept) + len(pruned) == len(adi)
    scores = dict(zip([d.id for d in kept + pruned], quality))
    assert max(scores[d.id] for d in pruned) <= min(scores[d.id] for d in kept)
    assert [d.id for d in kept] == [d.id for d in adi if d.id in {k.id for k in kept}]


def test_collection_prunes_lists_and_reinstates(tmp_path, adi):
    settings = CollectionSettings(indexes=("bm25",), quality_estimator="lm_divergence", prune_ratio=0.25)
    collection = Collection.create(tmp_path / "c", settings)
    result = collection.upsert(adi)
    assert (result.upserted, result.pruned) == (len(adi) - 20, 20)
    pruned = collection.pruned()
    assert len(pruned) == 20 and [q for _, q in pruned] == sorted(q for _, q in pruned)
    victim = pruned[0][0]
    query = collection.encode_queries("bm25", [collection.get(victim).content])[0]
    assert victim not in [h.id for h in collection.search({"bm25": query}, 82).hits]
    collection.reinstate([victim])
    assert victim not in {doc_id for doc_id, _ in collection.pruned()}
    assert collection.search({"bm25": query}, 1).hits[0].id == victim
    with pytest.raises(NotFound):
        collection.reinstate(["not-a-pruned-id"])
    collection.compact()
    assert len(collection.pruned()) == 19 and collection.stats()["documents"] == len(adi) - 19
    collection.close()


def test_small_batches_are_not_pruned_by_ratio(tmp_path, adi):
    settings = CollectionSettings(indexes=("bm25",), quality_estimator="unique_terms", prune_ratio=0.5)
    collection = Collection.create(tmp_path / "c", settings)
    assert collection.upsert(adi[:5]).pruned == 0
    collection.close()


def test_missing_quality_artifact_is_rejected(tmp_path):
    assert (QUALITY_ARTIFACT / "model.safetensors").is_file()  # the shipped one
    with pytest.raises(InvalidArgument, match="no quality artifact"):
        quality_model(str(tmp_path / "nowhere"))
