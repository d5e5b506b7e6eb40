"""Token-pooled multi-vector index: pooling really shrinks the index, compression fits its budget,
MaxSim finds the right documents, and deletes and compaction behave, on the real ADI collection."""
from __future__ import annotations

from pathlib import Path

import faiss
import ir_measures
import numpy as np
import pytest
import torch
from ir_measures import nDCG

from sieve.index.beir import load_judged_queries
from sieve.index.collection import Collection
from sieve.index.documents import Document
from sieve.index.errors import InvalidArgument
from sieve.index.multivector import MAX_CODE_BYTES, MultiVectorRetriever, TokenBatch
from sieve.index.pooling import pool_documents, pool_tokens
from sieve.index.settings import CollectionSettings

from conftest import DATASETS
from conftest import corpus as load_corpus

ADI = DATASETS / "adi"


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """On a shared 2-core machine OpenMP threads spin against each other; training is tiny here."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return load_corpus("adi")


@pytest.fixture(scope="module")
def tokens(corpus) -> list[np.ndarray]:
    """Unpooled, normalised token vectors of every ADI document (encoded once for the module)."""
    return MultiVectorRetriever(CollectionSettings()).token_vectors([d.content for d in corpus])


def build(tmp_path: Path, tokens: list[np.ndarray], **settings) -> tuple[MultiVectorRetriever, object]:
    retriever = MultiVectorRetriever(CollectionSettings(indexes=("multivector",), **settings))
    directory = tmp_path / f"seg-{len(list(tmp_path.iterdir()))}"
    directory.mkdir()
    retriever.write(directory, retriever.pool(tokens))
    return retriever, retriever.open(directory)


@pytest.fixture(scope="module")
def adi_index(tmp_path_factory, tokens):
    """Whole-ADI segments, built once per (pool factor, compression)."""
    built = {}

    def get(pool_factor: int, compression: str):
        if (pool_factor, compression) not in built:
            built[pool_factor, compression] = build(
                tmp_path_factory.mktemp("adi"), tokens, pool_factor=pool_factor, compression=compression)
        return built[pool_factor, compression]
    return get


def run_queries(retriever, part, k=10) -> dict[str, dict[str, float]]:
    queries, _ = load_judged_queries(ADI)
    vectors = retriever.encode_queries(list(queries.values()))
    ids = [d.id for d in load_corpus("adi")]
    return {qid: {ids[h.row]: h.score for h in retriever.search([part], [np.zeros(0, "int64")], v, k)}
            for qid, v in zip(queries, vectors)}


# Pooling ------------------------------------------------------------------------------------------
def test_pool_factor_one_is_identity(tokens):
    assert all(pool_tokens(t, 1, 1) is t for t in tokens[:5])


def test_pooling_keeps_protected_tokens_and_unit_norm(tokens):
    document = tokens[0]
    pooled = pool_tokens(document, 3, protected=2)
    assert np.array_equal(pooled[:2], document[:2])
    assert len(pooled) == 2 + (len(document) - 2) // 3
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 4])
def test_stored_vectors_shrink_by_the_pool_factor(adi_index, tokens, factor):
    retriever, part = adi_index(factor, "none")
    stats = retriever.stats([part], len(tokens))
    assert stats["vectors_raw"] == sum(len(t) for t in tokens)
    expected = sum(1 + max((len(t) - 1) // factor, 1) for t in tokens)
    assert stats["vectors_stored"] == expected
    assert stats["vectors_stored"] / stats["vectors_raw"] == pytest.approx(1 / factor, abs=0.05)


def test_parallel_pooling_matches_serial(tokens):
    documents = (tokens * 4)[:300]  # enough documents to use worker processes
    parallel = pool_documents(documents, 2, 1, workers=2)
    serial = pool_documents(documents, 2, 1, workers=1)
    assert all(np.array_equal(a, b) for a, b in zip(parallel, serial))


def test_bad_pool_factor_is_refused(tokens):
    with pytest.raises(InvalidArgument):
        pool_tokens(tokens[0], 0, 1)
    with pytest.raises(InvalidArgument):
        CollectionSettings(pool_factor=0)


# Compression and search ---------------------------------------------------------------------------
def test_compressed_vectors_fit_the_byte_budget(adi_index):
    _, uncompressed = adi_index(2, "none")
    exact = uncompressed.decode(np.arange(uncompressed.vectors))
    similarity = {}
    for compression in ("pq", "residual"):
        retriever, part = adi_index(2, compression)
        stats = retriever.stats([part], part.documents)
        assert stats["segment_codecs"] == [compression]
        assert stats["bytes_per_vector"] <= MAX_CODE_BYTES
        similarity[compression] = np.mean(np.sum(part.decode(np.arange(part.vectors)) * exact, axis=1))
    # Decoded vectors stay close to the originals (cosine), and the residual to its centroid more so.
    assert similarity["residual"] > 0.85 and similarity["pq"] > 0.75
    assert similarity["residual"] > similarity["pq"]


@pytest.mark.parametrize("block", [None, 100])
def test_similarities_without_decoding_equal_decoding_then_the_product(adi_index, block, monkeypatch):
    """The search scores codes with the rotation moved onto the query and the centroid part from the
    centroid table, a block of rows at a time: the same numbers as decoding every vector back, then the
    dot products (with blocks of 100 rows, many block boundaries are crossed)."""
    if block:
        monkeypatch.setattr("sieve.index.multivector.BLOCK_VECTORS", block)
    for compression in ("none", "pq", "residual"):
        retriever, part = adi_index(2, compression)
        query = retriever.encode_queries(["computer indexing of library catalogues"])[0]
        positions = np.arange(0, part.vectors, 3)
        expected = part.decode(positions) @ query.T
        on_device = torch.from_numpy(query).to(part.device)
        got = part.similarities(on_device, on_device @ part.centroids_on_device.T, positions).cpu().numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_maxsim_finds_relevant_documents_on_adi(adi_index):
    _, qrels = load_judged_queries(ADI)
    scores = {}
    for compression in ("none", "residual"):
        retriever, part = adi_index(2, compression)
        scores[compression] = ir_measures.calc_aggregate([nDCG @ 10], qrels, run_queries(retriever, part))[nDCG @ 10]
    assert scores["none"] > 0.45  # BM25 gets 0.48 on ADI
    assert scores["residual"] >= 0.95 * scores["none"]


def test_titles_find_their_own_documents(adi_index, corpus):
    retriever, part = adi_index(4, "residual")
    titled = [(row, d) for row, d in enumerate(corpus) if len(d.title.split()) >= 5][:20]
    queries = retriever.encode_queries([d.title for _, d in titled])
    found = sum(retriever.search([part], [np.zeros(0, "int64")], q, 1)[0].row == row
                for (row, _), q in zip(titled, queries))
    assert found >= 18


def test_unusual_texts_encode_and_search(tmp_path):
    retriever = MultiVectorRetriever(CollectionSettings(indexes=("multivector",), pool_factor=2, max_tokens=64))
    texts = ["", "word", "aerodynamics " * 3000,
             "Le chat noir dort sur le canapé du salon.", "Чёрный кот спит на диване.", "黑猫在沙发上睡觉。"]
    batch = retriever.pool(retriever.token_vectors(texts))
    assert len(batch.raw_counts) == len(texts)
    assert batch.raw_counts[2] == 64  # truncated at max_tokens
    assert (batch.lengths >= 1).all() and (batch.lengths <= batch.raw_counts).all()
    retriever.write(tmp_path, batch)
    part = retriever.open(tmp_path)
    hits = retriever.search([part], [np.zeros(0, "int64")], retriever.encode_queries(["Чёрный кот"])[0], 6)
    assert {h.row for h in hits} == set(range(len(texts)))  # a tiny segment: every document scored
    assert hits[0].row in (3, 4, 5)


def test_take_and_concat_keep_documents_in_order(tmp_path, tokens):
    retriever, part = build(tmp_path, tokens[:30], pool_factor=2, compression="none")
    taken = retriever.concat([retriever.take(part, np.array([3, 7])), retriever.take(part, np.array([0]))])
    assert isinstance(taken, TokenBatch) and len(taken.raw_counts) == 3
    expected = np.vstack([part.decode(np.arange(part.offsets[r], part.offsets[r + 1])) for r in (3, 7, 0)])
    np.testing.assert_array_equal(taken.vectors, expected)


# Through a real collection ------------------------------------------------------------------------
def test_collection_deletes_and_compaction(tmp_path, corpus):
    settings = CollectionSettings(indexes=("bm25", "multivector"), retrievers=("multivector",), pool_factor=2)
    collection = Collection.create(tmp_path / "c", settings)
    docs = corpus[:40]
    collection.upsert(docs[:25])
    collection.upsert(docs[25:])
    titles = [d for d in docs if len(d.title.split()) >= 5][:8]
    queries = dict(zip([d.id for d in titles], collection.encode_queries("multivector", [d.title for d in titles])))

    def top(doc: Document, k: int = 3) -> list[str]:
        return [hit.id for hit in collection.search({"multivector": queries[doc.id]}, k).hits]

    before = {d.id: top(d) for d in titles}
    assert sum(before[d.id][0] == d.id for d in titles) >= 7

    victim = titles[0]
    collection.delete([victim.id])
    assert victim.id not in top(victim, k=40)  # every live document, and never the deleted one

    stats_before = collection.stats()["details"]["multivector"]
    collection.compact()
    stats = collection.stats()["details"]["multivector"]
    assert collection.stats()["segments"] == 1
    assert stats["vectors_raw"] < stats_before["vectors_raw"]  # the deleted document's vectors are gone
    assert stats["vectors_stored"] <= 0.55 * stats["vectors_raw"]
    for d in titles[1:]:
        assert top(d)[0] == before[d.id][0]
    assert victim.id not in top(victim, k=40)
    collection.close()


# PLAID-like search ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens_at_once", ["all", "one"])
def test_candidate_generation_scores_only_the_kept_centroids_lists(adi_index, monkeypatch, tokens_at_once):
    """The scatter-max over inverted lists equals, per document, the sum over query tokens of the best
    kept centroid the document has a vector in (written out as loops here), whether the (tokens x documents)
    grid holds every query token or, as in a large segment, one at a time."""
    from sieve.index import multivector
    from sieve.index.multivector import prune_and_gather

    retriever, part = adi_index(2, "none")
    if tokens_at_once == "one":
        monkeypatch.setattr(multivector, "GATHER_CELLS", part.documents)
    query = retriever.encode_queries(["computer based information retrieval systems"])[0]
    table = query @ part.centroids.T
    documents, approximate = prune_and_gather(part, torch.from_numpy(table), nprobe=3, threshold=0.3)
    kept = {}
    for token, row in enumerate(table):
        best = np.argsort(-row)[:3]
        kept[token] = [c for c in best if row[c] >= 0.3] or [best[0]]
    centroids_of = [set(part.centroid_ids[part.offsets[d]:part.offsets[d + 1]].tolist()) for d in range(part.documents)]
    expected = {}
    for d, mine in enumerate(centroids_of):
        hits = [max((table[t, c] for c in cs if c in mine), default=None) for t, cs in kept.items()]
        if any(h is not None for h in hits):
            expected[d] = sum(h for h in hits if h is not None)
    assert documents.tolist() == sorted(expected)
    np.testing.assert_allclose(approximate, [expected[d] for d in documents.tolist()], rtol=1e-5)


def test_search_with_every_centroid_and_candidate_is_exact_maxsim(adi_index):
    from sieve.index.multivector import maxsim

    retriever, part = adi_index(2, "none")
    query = retriever.encode_queries(["the use of computers in libraries"])[0]
    everything = {"nprobe": len(part.centroids), "candidates": part.documents, "exact_candidates": part.documents}
    hits = retriever.search([part], [np.zeros(0, "int64")], query, 10, everything)
    exact = maxsim(query, part.decode(np.arange(part.vectors)), np.diff(part.offsets))
    assert [h.row for h in hits] == np.argsort(-exact)[:10].tolist()
    np.testing.assert_allclose([h.score for h in hits], np.sort(exact)[::-1][:10], rtol=1e-5)
    # the shipped defaults find the same top 3 while scoring exactly a fraction of the collection
    default = retriever.search([part], [np.zeros(0, "int64")], query, 3)
    assert [h.row for h in default] == [h.row for h in hits[:3]]


def test_multivector_knobs_are_validated_in_settings_and_per_search(adi_index):
    retriever, part = adi_index(2, "none")
    query = retriever.encode_queries(["libraries"])[0]
    for bad in ({"nprobe": 0}, {"candidates": -1}, {"exact_candidates": 2.5}, {"centroid_threshold": 3.0}):
        with pytest.raises(InvalidArgument):
            retriever.search([part], [np.zeros(0, "int64")], query, 5, bad)
        with pytest.raises(InvalidArgument):
            CollectionSettings.from_dict({"indexes": ["multivector"], **bad})
    assert CollectionSettings.from_dict({"centroid_threshold": None, "nprobe": 4.0}).nprobe == 4


def test_repeated_compactions_keep_codes_and_scores(tmp_path, corpus):
    """Compacting one segment copies its centroids, ids and residual codes as they are: nothing is
    re-quantised, so every remaining document scores as before, however often it runs (to float32
    rounding: BLAS may sum in another order when the candidate matrix has another shape)."""
    settings = CollectionSettings(indexes=("multivector",), pool_factor=2, compression="residual")
    collection = Collection.create(tmp_path / "c", settings)
    collection.upsert(corpus)
    query = collection.encode_queries("multivector", ["computer based information retrieval"])[0]

    def scores() -> dict[str, float]:
        return {hit.id: hit.score for hit in collection.search({"multivector": query}, len(corpus)).hits}

    def codes() -> np.ndarray:
        part = collection.snapshot.segments[0].parts["multivector"]
        assert part.codec == "residual"
        return np.asarray(part.payload)

    before, first_codes = scores(), codes()
    for round_ in range(3):
        victim = corpus[round_].id
        collection.delete([victim])
        collection.compact()
        assert len(collection.snapshot.segments) == 1
        now = scores()
        assert victim not in now
        assert now == pytest.approx({doc_id: score for doc_id, score in before.items() if doc_id in now}, rel=1e-6)
        assert set(now) == set(before) - {d.id for d in corpus[:round_ + 1]}
    start = int(collection.snapshot.segments[0].parts["multivector"].offsets[0])
    removed = sum(int(n) for n in np.diff(MultiVectorRetriever(settings).pool(
        MultiVectorRetriever(settings).token_vectors([d.content for d in corpus[:3]])).offsets))
    np.testing.assert_array_equal(codes(), first_codes[start + removed:])
    collection.close()


def test_the_dense_and_multivector_indexes_share_one_forward_pass_per_query():
    """A fused search encodes its text for both indexes of one encoder: the second representation comes
    from the first's forward pass, and both equal what each would compute alone."""
    from sieve.index.dense import DenseRetriever
    from sieve.index.encoders import load_encoder

    settings = CollectionSettings(indexes=("dense", "multivector"))
    dense, multivector = DenseRetriever(settings), MultiVectorRetriever(settings)
    encoder = load_encoder(settings.encoder, settings.max_tokens)
    text = "the retrieval of documents by computer, shared encoder check"
    passes = []
    model_encode = encoder.model.encode
    encoder.model.encode = lambda *args, **kwargs: passes.append(args[0]) or model_encode(*args, **kwargs)
    try:
        sentence = dense.encode_queries([text])[0]
        tokens = multivector.encode_queries([text])[0]
        assert len(passes) == 1
    finally:
        encoder.model.encode = model_encode
    np.testing.assert_allclose(sentence, encoder.embed([text])[0], atol=1e-6)
    np.testing.assert_allclose(tokens, multivector.token_vectors([text])[0], atol=1e-6)
    assert np.linalg.norm(sentence) == pytest.approx(1, abs=1e-5)


def test_query_batches_larger_than_the_recent_query_memo_are_encoded_whole():
    """A batch of more texts than the memo holds (first-stage runs over hundreds of queries) answers every
    text in order, repeats included, each as encoding it alone gives; the memo keeps only the newest."""
    from sieve.index.dense import DenseRetriever
    from sieve.index.encoders import RECENT_QUERIES, load_encoder

    settings = CollectionSettings(indexes=("dense",))
    encoder = load_encoder(settings.encoder, settings.max_tokens)
    texts = [f"query number {i} about cells" for i in range(RECENT_QUERIES + 6)]
    texts.append(texts[0])  # evicted from the memo by this very batch before it is answered
    vectors = DenseRetriever(settings).encode_queries(texts)
    assert len(vectors) == len(texts)
    np.testing.assert_allclose(np.stack(vectors[:3] + vectors[-1:]), encoder.embed(texts[:3] + texts[-1:]), atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[-1])
    assert len(encoder.recent_queries) == RECENT_QUERIES and texts[-2] in encoder.recent_queries


def test_a_query_batched_with_longer_ones_keeps_only_its_own_tokens():
    """The service encodes concurrent queries in one micro-batch, which pads the shorter texts: a query's
    multi-vector representation (and so its MaxSim scores) must not depend on its batch-mates."""
    from sieve.index.encoders import load_encoder

    settings = CollectionSettings(indexes=("multivector",))
    retriever, encoder = MultiVectorRetriever(settings), load_encoder(settings.encoder, settings.max_tokens)
    short, long = "cell growth", "a much longer question about how proteins fold inside living cells over time"
    encoder.recent_queries.clear()
    batched = retriever.encode_queries([short, long])
    encoder.recent_queries.clear()
    alone = retriever.encode_queries([short])[0]
    assert batched[0].shape == alone.shape == retriever.token_vectors([short])[0].shape
    np.testing.assert_allclose(batched[0], alone, atol=1e-5)


def test_summed_max_is_each_documents_maxsim():
    """The scatter-max by owning document equals the per-document loop it replaces."""
    from sieve.index.multivector import summed_max

    rng = np.random.default_rng(3)
    lengths = np.array([1, 5, 2, 9, 3])
    similarities = rng.standard_normal((lengths.sum(), 4)).astype("float32")
    expected = [block.max(0).sum() for block in np.split(similarities, np.cumsum(lengths)[:-1])]
    np.testing.assert_allclose(summed_max(torch.from_numpy(similarities), lengths), expected, rtol=1e-6)
