"""The GPU paths give what the CPU paths give (run by bench/gpu.sh on a lent GPU; skipped elsewhere).

They need no dataset and hold for any weights (bench/gpu.sh runs them with random ones): each compares the
same computation on the GPU and on the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sieve.index.multivector import MultiVectorRetriever, TokenBatch
from sieve.index.settings import CollectionSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


def clustered_documents(documents: int = 600, dimension: int = 384, seed: int = 0) -> TokenBatch:
    """Unit token vectors around a few hundred topics, 20-60 a document: enough structure for centroids."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(300, dimension)).astype("float32")
    vectors = []
    for _ in range(documents):
        picked = topics[rng.integers(0, len(topics), rng.integers(20, 60))]
        noisy = picked + 0.3 * rng.normal(size=picked.shape).astype("float32")
        vectors.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
    return TokenBatch.from_documents(vectors, [len(v) for v in vectors], dimension)


@pytest.mark.parametrize("compression", ["none", "residual"])
def test_multivector_search_on_the_gpu_equals_the_cpu(tmp_path, compression):
    retriever = MultiVectorRetriever(CollectionSettings(indexes=("multivector",), compression=compression))
    batch = clustered_documents()
    retriever.write(tmp_path, batch)
    on_gpu, on_cpu = retriever.open(tmp_path), retriever.open(tmp_path)
    on_cpu.device = torch.device("cpu")
    assert on_gpu.device.type == "cuda"
    gone = [np.zeros(0, "int64")]
    for query in [batch.vectors[batch.offsets[d]:batch.offsets[d] + 12] for d in range(0, 600, 60)]:
        gpu = retriever.search([on_gpu], gone, query, 10)
        cpu = retriever.search([on_cpu], gone, query, 10)
        assert [h.row for h in gpu] == [h.row for h in cpu]
        np.testing.assert_allclose([h.score for h in gpu], [h.score for h in cpu], rtol=1e-4)


def test_the_encoder_on_the_gpu_embeds_as_on_the_cpu():
    from sentence_transformers import SentenceTransformer

    from sieve.index.encoders import load_encoder, resolve_encoder

    texts = ["early pruning of reranker candidates", "token pooling keeps the ranking"]
    gpu = load_encoder("", 256).embed(texts)
    cpu = SentenceTransformer(resolve_encoder(""), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(gpu, cpu, atol=2e-3)


def test_the_reranker_on_the_gpu_ranks_as_on_the_cpu():
    from sieve.rankers import NO_PRUNING
    from sieve.rankers.reranker import open_reranker

    passages = [f"passage {i} about {'retrieval' if i % 3 else 'cooking'} and {'indexes' if i % 5 else 'soup'}"
                for i in range(40)]
    gpu = open_reranker("", dtype="float32", device="cuda").rerank("retrieval indexes", passages, 10, NO_PRUNING)
    cpu = open_reranker("", dtype="float32", device="cpu").rerank("retrieval indexes", passages, 10, NO_PRUNING)
    assert len(set(gpu.order) & set(cpu.order)) >= 9
