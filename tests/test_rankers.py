"""The reranker with early-layer pruning: real MiniLM weights, real SciFact passages, small slices."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from sieve.index.beir import load_beir, passage_text
from sieve.index.errors import InvalidArgument
from sieve.rankers import PruningOptions, RerankResult, load_reranker
from sieve.rankers.calibration import split_train_queries
from sieve.rankers.first_stage import SCIFACT_DIR

QUERY = "Aspirin reduces the risk of myocardial infarction."


@pytest.fixture(scope="module")
def passages() -> list[str]:
    with open(SCIFACT_DIR / "corpus.jsonl") as f:
        rows = [json.loads(line) for line in itertools.islice(f, 20)]
    return [passage_text(row) for row in rows]


@pytest.fixture(scope="module")
def reranker():
    return load_reranker("", dtype="float32")


def test_shipped_reranker_has_a_head_at_every_layer(reranker):
    assert reranker.num_layers == 6
    assert reranker.checkpoint_layers == (1, 2, 3, 4, 5, 6)


def test_no_pruning_matches_a_plain_full_forward(reranker, passages):
    result = reranker.rerank(QUERY, passages, 10, PruningOptions(prune=False))
    model = reranker.model
    batch = reranker.encode(QUERY, passages)
    with torch.inference_mode():
        hidden = model.bert(**batch).last_hidden_state  # transformers' own forward, not ours
        scores = model.score(6, hidden, *model.segment_masks(batch))
    assert result.order == torch.argsort(scores, descending=True, stable=True).tolist()
    assert result.scores == pytest.approx(sorted(scores.tolist(), reverse=True), abs=1e-4)
    assert result.survivors == [len(passages)]


def test_pruning_really_skips_rows_in_later_layers(reranker, passages):
    before = list(reranker.rows_processed)
    result = reranker.rerank(QUERY, passages, 5, PruningOptions(checkpoints=(1, 3), margin=0.0, safety=3))
    rows = [after - b for after, b in zip(reranker.rows_processed, before)]
    assert rows[1] == len(passages)
    assert result.survivors[0] == len(passages) and result.survivors[1] < len(passages)
    assert rows[2] == rows[3] == result.survivors[1]  # layers 2-3 ran on layer-1 survivors only
    assert rows[6] == result.survivors[2] < len(passages)
    assert sum(rows) < 6 * len(passages)
    assert len(result.order) == result.survivors[-1] >= 5


@pytest.mark.parametrize("k", [1, 7, 20, 30])
def test_pruning_never_returns_fewer_than_k(reranker, passages, k):
    result = reranker.rerank(QUERY, passages, k, PruningOptions(checkpoints=(1, 2, 3, 4, 5), margin=0.0, safety=0))
    assert len(result.order) >= min(k, len(passages))
    assert len(set(result.order)) == len(result.order) and set(result.order) <= set(range(len(passages)))
    assert result.scores == sorted(result.scores, reverse=True)


def test_calibrated_pruning_keeps_the_top_of_the_full_ranking(reranker, passages):
    full = reranker.rerank(QUERY, passages, 5, PruningOptions(prune=False))
    pruned = reranker.rerank(QUERY, passages, 5, PruningOptions())  # calibrated margins, default checkpoints
    assert len(set(full.order[:5]) & set(pruned.order[:5])) >= 4


def test_rerank_many_matches_one_at_a_time(reranker, passages):
    requests = [(QUERY, passages[:8], 3, PruningOptions(checkpoints=(2,), margin=0.5, safety=1)),
                ("cancer stem cells", passages[8:], 4, PruningOptions(prune=False))]
    together = reranker.rerank_many(requests)
    for request, result in zip(requests, together):
        alone = reranker.rerank(*request)
        assert isinstance(result, RerankResult)
        assert result.order == alone.order and result.survivors == alone.survivors
        assert result.scores == pytest.approx(alone.scores, abs=1e-4)


@pytest.mark.parametrize("checkpoints, margins", [((1, 3), {1: 0.5, 3: 0.2}), ((2,), {2: 1.0}), ((1, 2, 3, 4, 5), {})])
def test_simulated_pruning_is_what_the_reranker_does(reranker, passages, checkpoints, margins):
    """Calibration chooses settings by simulating them on unpruned per-layer scores; that is only sound
    if the reranker, pruning for real, keeps the same candidates and orders them the same way."""
    from sieve.rankers.pruning import simulate_pruning

    batch = reranker.encode(QUERY, passages)
    with torch.inference_mode():
        layer_scores = reranker.model(batch).float()  # [6, n], every head on every candidate
    survivors, order, rows = simulate_pruning(layer_scores, 5, checkpoints, margins, safety=2)
    before = sum(reranker.rows_processed)
    result = reranker.rerank(QUERY, passages, 5, PruningOptions(checkpoints=checkpoints, margins=margins, safety=2))
    assert result.survivors == survivors and result.order == order.tolist()
    assert sum(reranker.rows_processed) - before == rows
    if not margins:  # no margin at any layer: nothing is pruned
        assert survivors == [len(passages)] * 6 and rows == 6 * len(passages)


def test_per_layer_margins_apply_to_their_layer_only(reranker, passages):
    tight = reranker.rerank(QUERY, passages, 3, PruningOptions(checkpoints=(1, 2), margins={2: 0.0}, safety=0))
    assert tight.survivors[1] == len(passages) and tight.survivors[2] < len(passages)


@pytest.mark.parametrize("options", [
    dict(margins={1: -0.5}), dict(margins={0: 1.0}), dict(margins={"1": 1.0}), dict(margins=[1.0]),
    dict(margin=1.0, margins={1: 1.0}), dict(checkpoints=(3, 2)), dict(checkpoints=()), dict(checkpoints=(0,)), dict(checkpoints=(1, 1)),
    dict(margin=-1.0), dict(margin=float("nan")), dict(safety=-1), dict(safety=1.5), dict(prune="yes"),
])
def test_bad_options_are_refused(options):
    with pytest.raises(InvalidArgument):
        PruningOptions(**options)


@pytest.mark.parametrize("query, passages, k, message", [
    ("", ["a passage"], 1, "query"),
    ("   ", ["a passage"], 1, "query"),
    ("q", [], 1, "passages"),
    ("q", ["a passage"], 0, "k must be"),
    ("q", ["p"] * 1001, 1, "at most 1000"),
    ("q", ["x" * 100_001], 1, "characters"),
    ("q", ["fine", None], 1, "passage 1"),
])
def test_bad_requests_are_refused(reranker, query, passages, k, message):
    with pytest.raises(InvalidArgument, match=message):
        reranker.rerank(query, passages, k, PruningOptions(prune=False))


def test_checkpoint_outside_the_model_is_refused(reranker, passages):
    with pytest.raises(InvalidArgument, match="no trained score head"):
        reranker.rerank(QUERY, passages, 3, PruningOptions(checkpoints=(2, 9)))
    with pytest.raises(InvalidArgument, match="no trained score head"):
        reranker.rerank(QUERY, passages, 3, PruningOptions(margins={9: 1.0}))


@pytest.fixture(scope="module")
def hub_cross_encoder(tmp_path_factory) -> str:
    """A plain Hugging Face cross-encoder folder (BERT weights, a linear head on the pooled [CLS]), as a
    user would bring one; its head is untrained, which changes nothing about how it must be run."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from sieve.index.encoders import resolve_encoder

    folder = tmp_path_factory.mktemp("hub-cross-encoder")
    torch.manual_seed(3)
    BertForSequenceClassification.from_pretrained(resolve_encoder(""), num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_encoder("")).save_pretrained(folder)
    return str(folder)


def test_a_hub_cross_encoder_runs_layer_by_layer_to_its_own_scores(hub_cross_encoder, passages):
    from transformers import AutoModelForSequenceClassification

    external = load_reranker(hub_cross_encoder, dtype="float32")
    assert external.checkpoint_layers == (external.num_layers,) == (6,)
    result = external.rerank(QUERY, passages[:8], 3, PruningOptions(prune=False))
    plain = AutoModelForSequenceClassification.from_pretrained(hub_cross_encoder).eval()
    with torch.inference_mode():
        logits = plain(**external.encode(QUERY, passages[:8])).logits[:, 0]
    assert result.order == torch.argsort(logits, descending=True, stable=True).tolist()[:len(result.order)]
    assert result.scores == pytest.approx(sorted(logits.tolist(), reverse=True), abs=1e-4)
    # pruning is every request's default: without early heads it reranks unpruned instead of failing
    assert external.rerank(QUERY, passages[:8], 3, PruningOptions()).survivors == [8]
    with pytest.raises(InvalidArgument, match="only at its last layer.*sieve train exit-heads"):
        external.rerank(QUERY, passages[:8], 3, PruningOptions(checkpoints=(2,)))


def short_requests(passages: list[str], count: int) -> list[tuple[str, list[str]]]:
    """Pseudo-queries over short passages (first sentences): the frozen model runs fast on them."""
    from sieve.index.documents import Document
    from sieve.rankers.exit_heads import pseudo_queries

    with open(SCIFACT_DIR / "corpus.jsonl") as f:
        rows = [json.loads(line) for line in itertools.islice(f, 200)]
    docs = [Document(r["_id"], r["text"], r["title"]) for r in rows]
    snippets = [r["text"][:200] for r in rows]
    queries = pseudo_queries(docs, count)
    return [(text, snippets[i % 150:i % 150 + 16]) for i, (text, _) in enumerate(queries)]


@pytest.fixture(scope="module")
def trained_heads(hub_cross_encoder, passages, tmp_path_factory):
    from sieve.rankers.exit_heads import save_heads, train_exit_heads
    from sieve.rankers.reranker import open_reranker

    fresh = open_reranker(hub_cross_encoder, dtype="float32")
    config, pre = train_exit_heads(fresh, short_requests(passages, 24), epochs=30, pre_ranker=True)
    folder = tmp_path_factory.mktemp("heads") / "exit_heads"
    save_heads(fresh.model, folder, {"reranker": hub_cross_encoder, **config}, pre)
    return folder, config


def test_exit_heads_trained_without_labels_let_a_hub_cross_encoder_prune(hub_cross_encoder, trained_heads, passages):
    from sieve.rankers.exit_heads import heads_size

    folder, config = trained_heads
    assert config["early_layers"] == [1, 2, 3, 4, 5] and config["training"]["pseudo_queries"] == 24
    assert set(config["margins_by_recall"]["0.99"]) == {"1", "2", "3", "4", "5"}
    assert heads_size(folder) < 4_000_000  # five small heads and a pre-ranker, not a copy of the model (88 MB)
    headed = load_reranker(hub_cross_encoder, "float32", None, str(folder), "v1")
    plain = load_reranker(hub_cross_encoder, dtype="float32")
    assert headed.checkpoint_layers == (1, 2, 3, 4, 5, 6) and plain.checkpoint_layers == (6,)
    unpruned = headed.rerank(QUERY, passages, 5, PruningOptions(prune=False))
    assert unpruned.order == plain.rerank(QUERY, passages, 5, PruningOptions(prune=False)).order
    before = list(headed.rows_processed)
    pruned = headed.rerank(QUERY, passages, 5, PruningOptions(checkpoints=(2,), margin=0.0, safety=2))
    assert pruned.survivors[1] < len(passages)
    assert headed.rows_processed[6] - before[6] == pruned.survivors[1]  # later layers ran on survivors only
    # the heads learned the final ranking: at layer 5 their top 5 holds most of the final top 5
    from sieve.rankers.exit_heads import layer_scores, observe

    seen = observe(headed.model, headed.tokenizer, [(QUERY, passages)], (5,), headed.max_length)
    scores = layer_scores(headed.model, seen)[0]
    top = lambda row: set(np.argsort(-row)[:5].tolist())  # noqa: E731
    assert len(top(scores[4]) & top(scores[5])) >= 3


def test_a_distilled_pre_ranker_cuts_candidates_before_the_reranker(hub_cross_encoder, trained_heads, passages):
    from scipy.stats import spearmanr

    from sieve.rankers.exit_heads import PRE_RANKER_FILE
    from sieve.rankers.pre_ranker import PreRankedReranker, load_pre_ranker

    folder, config = trained_heads
    options = config["pre_ranker"]["options"]
    assert len(options) == 5 and all(0 < o["top10_overlap"] <= 1 for o in options)
    assert (folder / PRE_RANKER_FILE).stat().st_size < 3_000_000  # its layers and head; embeddings stay packaged
    pre = load_pre_ranker(folder / PRE_RANKER_FILE)
    headed = load_reranker(hub_cross_encoder, "float32", None, str(folder), "v1")
    main = headed.main if isinstance(headed, PreRankedReranker) else headed
    # distilled: on the passages it learnt from, it orders them as the main model does
    query, texts = short_requests(passages, 24)[-1]
    final = main.rerank(query, texts, len(texts), PruningOptions(prune=False))
    by_index = dict(zip(final.order, final.scores))
    assert spearmanr(pre.scores(query, texts).numpy(), [by_index[i] for i in range(len(texts))])[0] > 0.3
    cascade = PreRankedReranker(main, pre, margin=0.0)
    result = cascade.rerank(QUERY, passages, 5, PruningOptions(checkpoints=(2,), margin=1e6))
    assert result.survivors[:2] == [20, 10]  # k + safety left after the cut, all of them through layer 2
    assert len(result.order) == 10 and set(result.order) <= set(range(20))
    unpruned = cascade.rerank(QUERY, passages, 5, PruningOptions(prune=False))
    assert unpruned.survivors == [20] and unpruned.order == main.rerank(QUERY, passages, 5, PruningOptions(prune=False)).order
    with pytest.raises(InvalidArgument):
        cascade.rerank(QUERY, [], 5)


def test_exit_heads_refuse_other_weights_and_damaged_files(hub_cross_encoder, trained_heads, tmp_path):
    import shutil

    from sieve.index.errors import FailedPrecondition
    from sieve.rankers.exit_heads import HEADS_FILE
    from sieve.rankers.reranker import open_reranker, with_exit_heads

    folder, _ = trained_heads
    with pytest.raises(FailedPrecondition, match="trained for .* retrain them"):
        with_exit_heads(load_reranker("", dtype="float32"), folder)  # the shipped model is other weights
    damaged = shutil.copytree(folder, tmp_path / "exit_heads")
    (damaged / HEADS_FILE).write_bytes((damaged / HEADS_FILE).read_bytes()[:1000])
    with pytest.raises(InvalidArgument, match="cannot be used"):
        with_exit_heads(open_reranker(hub_cross_encoder, dtype="float32"), damaged)


def test_distillation_loss_is_lowest_for_the_final_ranking():
    from sieve.rankers.exit_heads import distillation_loss

    from sieve.rankers.exit_heads import standardised

    final = torch.tensor([[3.0, 1.0, 0.5, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    best = standardised(final, mask)
    assert distillation_loss(best, final, mask) < 1e-6
    assert distillation_loss(best, final * 0.01, mask) < 1e-6  # the final scores' scale does not matter
    assert distillation_loss(best.flip(-1), final, mask) > distillation_loss(best * 0.5, final, mask) > 0
    padded = torch.tensor([[3.0, 1.0, 0.5, -1.0, 7.0]])  # a padded entry changes nothing
    assert distillation_loss(torch.cat([best, torch.zeros(1, 1)], 1), padded,
                             torch.tensor([[True] * 4 + [False]])) < 1e-6


def test_shipped_reranker_beats_bm25_on_held_out_claims(reranker):
    """SciFact train claims that training held out: the judged abstract among BM25's top candidates."""
    import bm25s

    corpus, queries, qrels = load_beir(SCIFACT_DIR, "train")
    ids = list(corpus)
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenize([passage_text(corpus[d]) for d in ids], stopwords="en", show_progress=False),
               show_progress=False)
    _, held_out = split_train_queries(queries)
    bm25_rr, reranker_rr = [], []
    for q in held_out[:30]:
        rows, _ = bm25.retrieve(bm25s.tokenize([queries[q]], stopwords="en", show_progress=False), k=10,
                                show_progress=False)
        candidates = [ids[r] for r in rows[0]]
        if not set(candidates) & set(qrels[q]):
            continue
        result = reranker.rerank(queries[q], [passage_text(corpus[d]) for d in candidates], 10)
        reranked = [candidates[i] for i in result.order]
        bm25_rr.append(next(1 / (r + 1) for r, d in enumerate(candidates) if d in qrels[q]))
        reranker_rr.append(next(1 / (r + 1) for r, d in enumerate(reranked) if d in qrels[q]))
    assert len(bm25_rr) >= 20
    assert sum(reranker_rr) / len(reranker_rr) > sum(bm25_rr) / len(bm25_rr) + 0.05


def test_concurrent_first_loads_share_one_load():
    """The first requests after a start arrive together; they must wait for one load, not race it."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from sieve.index.encoders import loaded_once

    calls = []

    @loaded_once(maxsize=2)
    def load(name):
        calls.append(name)
        time.sleep(0.2)  # a model load takes a while: the others arrive meanwhile
        return object()

    with ThreadPoolExecutor(8) as pool:
        models = list(pool.map(load, ["a"] * 8))
    assert calls == ["a"] and all(m is models[0] for m in models)
    load("b"), load("c")  # past maxsize the oldest is dropped and loads again when asked
    assert load("a") is not models[0] and calls == ["a", "b", "c", "a"]


def test_a_slow_or_failing_load_does_not_hold_up_another_model():
    import threading
    import time

    from sieve.index.encoders import loaded_once

    release = threading.Event()

    @loaded_once(maxsize=4)
    def load(name):
        if name == "unreachable-hub-name":
            release.wait(10)  # as a hub download that hangs
            raise OSError("cannot reach the hub")
        return name

    slow = threading.Thread(target=lambda: pytest.raises(OSError, load, "unreachable-hub-name"))
    slow.start()
    time.sleep(0.1)
    started = time.perf_counter()
    assert load("local-model") == "local-model"
    assert time.perf_counter() - started < 1 and slow.is_alive()
    release.set()
    slow.join()
    with pytest.raises(OSError):  # a failed load is not cached
        release.set() or load("unreachable-hub-name")


def test_calibrated_checkpoint_sets_scale_to_the_model_depth():
    from sieve.rankers.calibration import PRUNING_CANDIDATES, scaled_candidates

    assert scaled_candidates(6) == PRUNING_CANDIDATES
    deep = scaled_candidates(12)
    assert (2, 4, 6, 8, 10) in deep and (2, 6, 10) in deep
    assert all(1 <= layer <= 11 for checkpoints in deep for layer in checkpoints)
    assert scaled_candidates(2) == ((1,),)


def test_pseudo_queries_are_titles_and_sentences_of_their_source():
    from sieve.index.documents import Document
    from sieve.rankers.exit_heads import pseudo_queries

    with open(SCIFACT_DIR / "corpus.jsonl") as f:
        docs = [Document(r["_id"], r["text"], r["title"]) for r in map(json.loads, itertools.islice(f, 60))]
    made = pseudo_queries(docs, 40)
    assert len(made) == 40 and made == pseudo_queries(docs, 40)  # deterministic for a seed
    by_id = {d.id: d for d in docs}
    titles = sum(text == by_id[source].title for text, source in made)
    assert 0 < titles < 40  # both kinds
    assert all(text == by_id[source].title or (text in by_id[source].text and 8 <= len(text.split()) <= 40)
               for text, source in made)
