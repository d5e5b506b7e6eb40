"""Token pooling (Clavié, Chaffin, Adams 2024): fewer vectors per document, no model change.

Each document's token vectors are clustered by Ward hierarchical clustering and every cluster is
stored as its re-normalised mean. Runs at ingestion only; queries are never pooled.
"""
from __future__ import annotations

import os

import numpy as np
from joblib import Parallel, delayed
from scipy.cluster.hierarchy import fcluster, linkage
from tqdm.auto import tqdm

from .errors import InvalidArgument

PARALLEL_MIN_DOCUMENTS = 256  # below this, starting worker processes costs more than it saves
CHUNK_DOCUMENTS = 64  # documents per worker task


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype="float32")
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def pool_tokens(vectors: np.ndarray, pool_factor: int, protected: int = 1) -> np.ndarray:
    """Pool one document's (L2-normalised) token vectors into about len/pool_factor vectors.

    The first `protected` tokens (e.g. [CLS]) are kept as they are; the others are clustered into
    max(n_unprotected // pool_factor, 1) clusters, as PyLate counts them. pool_factor 1 returns
    the input unchanged.
    """
    if not isinstance(pool_factor, (int, np.integer)) or pool_factor < 1:
        raise InvalidArgument(f"pool_factor must be a whole number >= 1, not {pool_factor!r}")
    if protected < 0:
        raise InvalidArgument(f"protected must be >= 0, not {protected!r}")
    if vectors.ndim != 2:
        raise InvalidArgument(f"expected a (tokens, dimension) array, got shape {vectors.shape}")
    if pool_factor == 1:
        return vectors
    kept, rest = vectors[:protected], vectors[protected:]
    clusters = max(len(rest) // pool_factor, 1)
    if len(rest) <= 1 or clusters >= len(rest):
        return vectors
    rest = normalize(rest)
    # Ward is defined on Euclidean distances; on unit vectors ||a - b||^2 = 2 * cosine distance,
    # so Ward on the normalised vectors is Ward on cosine distance.
    labels = fcluster(linkage(rest, method="ward"), t=clusters, criterion="maxclust") - 1
    count = labels.max() + 1
    sums = np.zeros((count, rest.shape[1]), dtype="float32")
    np.add.at(sums, labels, rest)
    pooled = normalize(sums)
    return np.vstack([kept.astype("float32", copy=False), pooled])


def _pool_chunk(chunk: list[np.ndarray], pool_factor: int, protected: int) -> list[np.ndarray]:
    return [pool_tokens(vectors, pool_factor, protected) for vectors in chunk]


def pool_documents(documents: list[np.ndarray], pool_factor: int, protected: int = 1,
                   workers: int | None = None, progress: bool = False) -> list[np.ndarray]:
    """pool_tokens over many documents, in worker processes when the batch is large enough."""
    if pool_factor == 1:
        return list(documents)
    workers = workers or min(2, os.cpu_count() or 1)
    chunks = [documents[i:i + CHUNK_DOCUMENTS] for i in range(0, len(documents), CHUNK_DOCUMENTS)]
    bar = tqdm(total=len(documents), desc=f"pooling x{pool_factor}", unit="doc", disable=not progress)
    pooled: list[np.ndarray] = []
    if workers > 1 and len(documents) >= PARALLEL_MIN_DOCUMENTS:
        # Separate (loky) processes: Ward holds the GIL, and forking a threaded server is unsafe.
        results = Parallel(n_jobs=workers, return_as="generator")(
            delayed(_pool_chunk)(chunk, pool_factor, protected) for chunk in chunks)
    else:
        results = (_pool_chunk(chunk, pool_factor, protected) for chunk in chunks)
    for result in results:
        pooled.extend(result)
        bar.update(len(result))
    bar.close()
    return pooled
