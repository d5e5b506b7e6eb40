"""Multi-vector (ColBERT-style) retrieval over token-pooled vectors, PLAID-like.

A document is its encoder's token vectors (L2-normalised), pooled at ingestion (pooling.py); a
query is its unpooled token vectors, scored by MaxSim: for each query token the best dot product
over the document's vectors, summed.

Each segment trains its own spherical k-means centroids over its stored vectors. Every vector keeps
its centroid id, and an inverted list maps each centroid to the documents that have a vector in it.
The vectors themselves are stored per `compression`:
  none      float16 (768 bytes a 384-d vector)
  pq        faiss product quantisation of the vector
  residual  faiss product quantisation of the vector minus its centroid (IVF-ADC / PLAID)
with at most 64 bytes a vector (codes plus the 2-byte centroid id) for pq and residual: an OPQ rotation
(faiss OPQMatrix, learned per segment) then 48 sub-quantisers of 10 bits for 384 dimensions. The rotation
spreads the variance over the sub-vectors; measured on pooled vectors it keeps the ranking much better
than plain PQ at the same bytes (bench/multivector.py).

Search, per segment, as PLAID does, without a pass over all vectors:
  1. a query-by-centroid score table (query tokens x centroids);
  2. centroid pruning: each query token keeps its `nprobe` best centroids, and of those the ones
     scoring at least `centroid_threshold` (its best always);
  3. candidate generation from the inverted lists of the kept centroids only: a document's approximate
     MaxSim sums, per query token, the best kept centroid it has a vector in (one scatter-max over
     the list entries, a few thousand per query rather than every stored vector);
  4. the best `candidates` documents are rescored by full centroid interaction (every vector
     replaced by its centroid, from the table);
  5. the best `exact_candidates` of those are decoded and scored by exact MaxSim.
Files are memory-mapped; nothing is held in memory but the centroids. The arithmetic (score table,
gathers, segmented maxima, exact products) runs in torch, on the GPU when there is one: what a search
reads from the files moves there, never the whole index.
"""
from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
import torch

from .documents import Document
from .encoders import device, load_encoder
from .errors import CorruptIndex, InvalidArgument
from .pooling import normalize, pool_documents
from .retriever import Hit, Retriever, dir_bytes, excluded, top_hits
from .settings import CollectionSettings

PREFIX = "mv."
PQ_FILE, OPQ_FILE = f"{PREFIX}pq.faiss", f"{PREFIX}opq.faiss"  # the quantiser, its rotation (newer segments)
MAX_CODE_BYTES = 64  # per stored vector, centroid id included
CENTROID_ID_BYTES = 2  # uint16 ids
MAX_CENTROIDS = 2**16
PQ_MIN_VECTORS = 1024  # below this a segment is too small to train 1,024-entry codebooks: float16
TRAIN_SAMPLE = 65_536  # vectors sampled to train the product quantiser
KMEANS_POINTS_PER_CENTROID = 64
KMEANS_ITERATIONS = 10
PQ_ITERATIONS = 10  # faiss's default 25 triples training time for little gain
OPQ_TRAIN_SAMPLE = TRAIN_SAMPLE  # 16k vectors measured worse on CISI (0.981 vs 0.989 of uncompressed)
OPQ_ITERATIONS = 20
PQ_BITS = (10, 9, 8)  # bits a sub-quantiser code, the most the budget allows (2**10 <= PQ_MIN_VECTORS: codebooks train)
SEED = 1234
SEARCH_DEVICE = torch.device(device())
# Stored vectors scored a block at a time on a CPU (1,024 measured fastest); a GPU takes them all at once
BLOCK_VECTORS = 1 << 10 if SEARCH_DEVICE.type == "cpu" else 1 << 30
GATHER_CELLS = 1 << 22  # (query tokens x documents) scores candidate generation holds at once (16 MB)


def centroid_count(vectors: int) -> int:
    """A power of two near 4 * sqrt(vectors) (PLAID uses 16 *; fewer trains faster on a CPU)."""
    if vectors == 0:
        return 0
    return int(min(2 ** math.floor(math.log2(max(4 * math.sqrt(vectors), 1))), MAX_CENTROIDS, vectors))


def subquantizers(dimension: int) -> tuple[int, int]:
    """(sub-vectors, bits each): the most sub-vectors of a byte that divide the dimension and fit the
    byte budget, then the most bits a code those allow (384 dimensions: 48 of 10 bits, 60 bytes)."""
    budget = MAX_CODE_BYTES - CENTROID_ID_BYTES
    m = max(m for m in range(1, budget + 1) if dimension % m == 0)
    return m, next(bits for bits in PQ_BITS if math.ceil(m * bits / 8) <= budget)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated np.arange(start, start + length) for each pair, without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, "int64")
    ends = np.cumsum(lengths)
    shift = np.repeat(starts - (ends - lengths), lengths)
    return np.arange(total, dtype="int64") + shift


def maxsim(query: np.ndarray, vectors: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """MaxSim of one query against consecutive documents of `lengths` vectors each (all > 0)."""
    cpu = torch.device("cpu")
    return summed_max(on(vectors, cpu).float() @ on(query, cpu).float().T, lengths)


def summed_max(similarities: torch.Tensor, lengths: np.ndarray) -> np.ndarray:
    """MaxSim from (vectors, query tokens) similarities of consecutive documents of `lengths` vectors each.
    A scatter-max by owning document: on a CPU 4x faster than torch.segment_reduce over the same rows."""
    lengths = on(np.asarray(lengths, "int64"), similarities.device)
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=similarities.device), lengths)
    best = torch.full((len(lengths), similarities.shape[1]), -torch.inf, device=similarities.device)
    best.scatter_reduce_(0, owner[:, None].expand_as(similarities), similarities, "amax")
    return best.sum(1).cpu().numpy()


def on(array: np.ndarray, where: torch.device) -> torch.Tensor:
    """A numpy array as a tensor on `where` (copied where torch cannot share it: a read-only memory map)."""
    return torch.from_numpy(np.require(array, requirements=("C", "W"))).to(where)


@dataclass
class TokenBatch:
    """Encoded documents: pooled token vectors, flat, and where each document's vectors start."""

    vectors: np.ndarray  # (stored vectors, dimension) float32
    offsets: np.ndarray  # (documents + 1,) int64
    raw_counts: np.ndarray  # (documents,) int64: token vectors before pooling
    # Compaction: the stored part these vectors were decoded from and their positions in it. Written
    # back from one part, its codes are copied as they are: repeated compactions never re-quantise.
    source: tuple["MultiVectorPart", np.ndarray] | None = None

    @classmethod
    def from_documents(cls, documents: list[np.ndarray], raw_counts, dimension: int) -> "TokenBatch":
        lengths = [len(d) for d in documents]
        vectors = np.vstack(documents).astype("float32", copy=False) if documents else np.zeros((0, dimension), "float32")
        return cls(vectors, np.concatenate([[0], np.cumsum(lengths)]).astype("int64"), np.asarray(raw_counts, "int64"))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class MultiVectorPart:
    directory: Path
    codec: str  # what this segment really stores: none, pq or residual
    offsets: np.ndarray  # (documents + 1,) int64
    raw_counts: np.ndarray
    centroids: np.ndarray  # (centroids, dimension) float32, unit norm
    centroid_ids: np.ndarray  # (stored vectors,) uint16
    list_offsets: np.ndarray  # (centroids + 1,) int64 into list_docs
    list_docs: np.ndarray  # documents with a vector in each centroid, grouped by centroid
    payload: np.ndarray  # float16 vectors, or uint8 PQ codes
    quantizer: faiss.ProductQuantizer | None
    rotation: faiss.VectorTransform | None  # OPQ, applied before the quantiser (absent in older segments)

    device = SEARCH_DEVICE  # where searches compute

    @cached_property
    def centroids_on_device(self) -> torch.Tensor:
        return on(self.centroids, self.device)

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def vectors(self) -> int:
        return int(self.offsets[-1])

    def decode(self, positions: np.ndarray) -> np.ndarray:
        """Float32 vectors at these positions (sorted positions read the memory map in order)."""
        if self.codec == "none":
            return np.asarray(self.payload[positions], dtype="float32")
        decoded = self.quantizer.decode(np.ascontiguousarray(self.payload[positions]))
        if self.rotation is not None:
            decoded = self.rotation.reverse_transform(decoded)
        if self.codec == "residual":
            decoded += self.centroids[self.centroid_ids[positions]]
        return decoded

    def similarities(self, query: torch.Tensor, table: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """(vectors, query tokens) dot products of the stored vectors at these positions, on the query's
        device, what decode() then a product would give, for less: <q, c + R'r> = <q, c> + <Rq, r>, so the
        rotation R moves onto the few query tokens (not the many document vectors: 384 x 384 a vector) and
        <q, c> is the centroid score `table` (query x centroid) already holds. On a CPU a block of rows at a
        time, decoded or widened from float16 by torch and multiplied (query-major: faster for odd token
        counts) while in cache."""
        rotated = query
        if self.rotation is not None:
            rotated = on(self.rotation.apply(np.ascontiguousarray(query.cpu().numpy())), query.device)
        by_centroid = table.T.contiguous() if self.codec == "residual" else None
        out = torch.empty((len(positions), len(query)), device=query.device)
        for start in range(0, len(positions), BLOCK_VECTORS):
            rows = positions[start:start + BLOCK_VECTORS]
            if self.codec == "none":
                block = on(self.payload[rows], query.device).float()
            else:
                block = on(self.quantizer.decode(np.ascontiguousarray(self.payload[rows])), query.device)
            scores = (rotated @ block.T).T
            if by_centroid is not None:
                scores += by_centroid[on(self.centroid_ids[rows].astype("int64"), query.device)]
            out[start:start + len(rows)] = scores
        return out

    def code_bytes(self) -> int:
        """Bytes a stored vector costs: its payload row plus its centroid id."""
        return self.payload.shape[1] * self.payload.itemsize + self.centroid_ids.itemsize


@dataclass(frozen=True)
class SearchParams:
    """The knobs of one multi-vector search: the collection's settings, overridden per request."""

    nprobe: int
    centroid_threshold: float | None
    candidates: int
    exact_candidates: int

    @classmethod
    def of(cls, settings: CollectionSettings, overrides: dict | None = None) -> "SearchParams":
        values = {"nprobe": settings.nprobe, "centroid_threshold": settings.centroid_threshold,
                  "candidates": settings.candidates, "exact_candidates": settings.exact_candidates}
        values.update({name: value for name, value in (overrides or {}).items() if value is not None})
        params = cls(**values)
        for name in ("nprobe", "candidates", "exact_candidates"):
            if not isinstance(getattr(params, name), int) or getattr(params, name) < 1:
                raise InvalidArgument(f"multi-vector {name} must be a whole number >= 1, not {getattr(params, name)!r}")
        threshold = params.centroid_threshold
        if threshold is not None and not -1 <= threshold <= 1:
            raise InvalidArgument(f"multi-vector centroid_threshold is a cosine within [-1, 1], not {threshold!r}")
        return params


class MultiVectorRetriever(Retriever):
    name = "multivector"

    @property
    def encoder(self):
        return load_encoder(self.settings.encoder, self.settings.max_tokens)

    # Ingestion -----------------------------------------------------------------------------
    def token_vectors(self, texts: list[str], progress: bool = False) -> list[np.ndarray]:
        """L2-normalised token vectors per text ([CLS] and [SEP] kept), truncated at max_tokens."""
        return [normalize(v) for v in self.encoder.token_embeddings(texts, progress=progress)]

    def pool(self, documents: list[np.ndarray], progress: bool = False) -> TokenBatch:
        pooled = pool_documents(documents, self.settings.pool_factor, self.settings.protected_tokens,
                                progress=progress)
        return TokenBatch.from_documents(pooled, [len(d) for d in documents], self.encoder.dimension)

    def encode_documents(self, docs: list[Document]) -> TokenBatch:
        return self.pool(self.token_vectors([doc.content for doc in docs]), progress=len(docs) >= 1000)

    def write(self, directory: Path, encoded: TokenBatch) -> None:
        if encoded.source is not None:  # rows of one stored part: its centroids, ids and codes as they are
            part, positions = encoded.source
            codec, centroids = part.codec, part.centroids
            ids, payload = np.asarray(part.centroid_ids[positions]), np.asarray(part.payload[positions])
            for name in (PQ_FILE, OPQ_FILE) if codec != "none" else ():
                if (part.directory / name).exists():
                    shutil.copyfile(part.directory / name, directory / name)
        else:
            codec, centroids, ids, payload = self._quantise(directory, encoded.vectors)
        list_offsets, list_docs = inverted_lists(ids, encoded.lengths, len(centroids))
        for name, array in {
            "offsets": encoded.offsets, "raw_counts": encoded.raw_counts, "centroids": centroids,
            "centroid_ids": ids, "list_offsets": list_offsets, "list_docs": list_docs, "payload": payload,
        }.items():
            np.save(directory / f"{PREFIX}{name}.npy", array)
        (directory / f"{PREFIX}meta.json").write_text(json.dumps({
            "codec": codec, "pool_factor": self.settings.pool_factor,
            "protected_tokens": self.settings.protected_tokens, "dimension": centroids.shape[1],
        }))

    def _quantise(self, directory: Path, vectors: np.ndarray):
        """(codec, centroids, centroid ids, payload) trained on these vectors; the quantiser is saved."""
        centroids = train_centroids(vectors, centroid_count(len(vectors)))
        ids = assign(centroids, vectors)
        codec = self.settings.compression if len(vectors) >= PQ_MIN_VECTORS else "none"
        if codec == "none":
            return codec, centroids, ids, vectors.astype("float16")
        targets = vectors - centroids[ids] if codec == "residual" else vectors
        rotation, quantizer = train_quantizer(targets)
        faiss.write_VectorTransform(rotation, str(directory / OPQ_FILE))
        faiss.write_ProductQuantizer(quantizer, str(directory / PQ_FILE))
        return codec, centroids, ids, quantizer.compute_codes(rotate(rotation, targets))

    def open(self, directory: Path) -> MultiVectorPart:
        meta = json.loads((directory / f"{PREFIX}meta.json").read_text())

        def load(name: str) -> np.ndarray:
            return np.load(directory / f"{PREFIX}{name}.npy", mmap_mode="r")

        quantizer = rotation = None
        if meta["codec"] != "none":
            quantizer = faiss.read_ProductQuantizer(str(directory / PQ_FILE))
            if (directory / OPQ_FILE).exists():
                rotation = faiss.read_VectorTransform(str(directory / OPQ_FILE))
        part = MultiVectorPart(
            directory, meta["codec"], np.asarray(load("offsets")), load("raw_counts"),
            np.asarray(load("centroids")), load("centroid_ids"), np.asarray(load("list_offsets")),
            load("list_docs"), load("payload"), quantizer, rotation,
        )
        if len(part.centroid_ids) != part.vectors or len(part.payload) != part.vectors:
            raise CorruptIndex(f"{directory}: multi-vector files disagree on the number of vectors")
        return part

    def take(self, part: MultiVectorPart, rows: np.ndarray) -> TokenBatch:
        rows = np.asarray(rows, "int64")
        starts, lengths = part.offsets[rows], np.diff(part.offsets)[rows]
        positions = ranges(starts, lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("int64")
        return TokenBatch(part.decode(positions), offsets, np.asarray(part.raw_counts[rows], "int64"),
                          (part, positions))

    def concat(self, encoded: list[TokenBatch]) -> TokenBatch:
        dimension = encoded[0].vectors.shape[1] if encoded else self.encoder.dimension
        lengths = np.concatenate([b.lengths for b in encoded]) if encoded else np.zeros(0, "int64")
        return TokenBatch(
            np.vstack([b.vectors for b in encoded]) if encoded else np.zeros((0, dimension), "float32"),
            np.concatenate([[0], np.cumsum(lengths)]).astype("int64"),
            np.concatenate([b.raw_counts for b in encoded]) if encoded else np.zeros(0, "int64"),
            one_source(encoded),
        )

    # Search --------------------------------------------------------------------------------
    def encode_queries(self, texts: list[str]) -> list[np.ndarray]:
        return [normalize(tokens) for _, tokens in self.encoder.queries(texts)]  # queries are never pooled

    def search(self, parts, deleted, query: np.ndarray, k: int, params: dict | None = None,
               hidden: list[np.ndarray] | None = None) -> list[Hit]:
        knobs = SearchParams.of(self.settings, params)
        query = np.asarray(query, "float32")
        if query.ndim != 2 or len(query) == 0:
            raise InvalidArgument(f"a multi-vector query is a (tokens, dimension) array, got shape {query.shape}")
        hits: list[Hit] = []
        for segment, (part, gone) in enumerate(zip(parts, excluded(deleted, hidden))):
            if part.vectors == 0:
                continue
            if query.shape[1] != part.centroids.shape[1]:
                raise InvalidArgument(
                    f"query vectors have dimension {query.shape[1]}, the index {part.centroids.shape[1]}")
            docs, scores = self._search_part(part, gone, query, k, knobs)
            hits.extend(Hit(segment, int(d), float(s)) for d, s in zip(docs, scores))
        return top_hits(hits, k)

    def _search_part(self, part: MultiVectorPart, gone: np.ndarray, query: np.ndarray, k: int,
                     knobs: SearchParams):
        query = on(query, part.device)
        table = query @ part.centroids_on_device.T  # (query tokens, centroids)
        candidates, approximate = prune_and_gather(part, table, knobs.nprobe, knobs.centroid_threshold)
        if len(gone):
            live = ~np.isin(candidates, gone, assume_unique=True)
            candidates, approximate = candidates[live], approximate[live]
            allowed = part.documents - len(gone)
            if len(candidates) < min(k, allowed):  # a selective filter: every allowed row is a candidate
                candidates = np.setdiff1d(np.arange(part.documents), gone, assume_unique=True)
                approximate = centroid_interaction(part, table, candidates)
        exact = max(knobs.exact_candidates, k)
        for keep, interaction in ((max(knobs.candidates, exact), False), (exact, True)):
            if len(candidates) > keep:
                if interaction:
                    approximate = centroid_interaction(part, table, candidates)
                best = np.sort(np.argpartition(-approximate, keep - 1)[:keep])
                candidates, approximate = candidates[best], approximate[best]
        if len(candidates) == 0:
            return candidates, np.zeros(0, "float32")
        lengths = part.offsets[candidates + 1] - part.offsets[candidates]
        scores = summed_max(part.similarities(query, table, ranges(part.offsets[candidates], lengths)), lengths)
        order = np.argsort(-scores, kind="stable")[:k]
        return candidates[order], scores[order]

    def stats(self, parts, live_rows: int) -> dict:
        stored = sum(p.vectors for p in parts)
        index_bytes = sum(dir_bytes(p.directory, PREFIX) for p in parts)
        code_bytes = sum(p.code_bytes() * p.vectors for p in parts)
        return {
            "documents": live_rows,
            "vectors_raw": int(sum(int(np.sum(p.raw_counts)) for p in parts)),
            "vectors_stored": int(stored),
            "pool_factor": self.settings.pool_factor,
            "protected_tokens": self.settings.protected_tokens,
            "compression": self.settings.compression,
            "segment_codecs": sorted({p.codec for p in parts}),
            "dimension": int(parts[0].centroids.shape[1]) if parts else None,
            "bytes_per_vector": code_bytes / stored if stored else None,
            "index_bytes": int(index_bytes),
            "index_bytes_per_vector": index_bytes / stored if stored else None,
        }


def one_source(batches: list[TokenBatch]) -> tuple[MultiVectorPart, np.ndarray] | None:
    """The part all these batches were taken from, with their positions in order; None if they come from
    several parts (a merge trains a codec for the whole) or from new documents."""
    parts = {id(b.source[0]) if b.source else None for b in batches}
    if len(parts) != 1 or None in parts:
        return None
    return batches[0].source[0], np.concatenate([b.source[1] for b in batches])


def prune_and_gather(part: MultiVectorPart, table: torch.Tensor, nprobe: int,
                     threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(documents, approximate MaxSim) from the inverted lists of each query token's kept centroids: per
    token, each document's best kept centroid, summed over tokens. One scatter-max over the lists' entries
    into a (tokens, documents) grid, a few tokens at a time where the grid would be large; no loop over
    documents or centroids."""
    tokens, count = table.shape
    values, top = torch.topk(table, min(nprobe, count), dim=1)  # (tokens, probe), best first
    kept = torch.ones_like(values, dtype=torch.bool) if threshold is None else values >= threshold
    kept[:, 0] = True  # every query token keeps its best centroid
    token = torch.nonzero(kept)[:, 0].cpu().numpy()  # token-major order
    centroid, score = top[kept].cpu().numpy(), values[kept]
    starts = part.list_offsets[centroid]
    lengths = part.list_offsets[centroid + 1] - starts
    documents = on(part.list_docs[ranges(starts, lengths)].astype("int64"), table.device)
    entry_token = np.repeat(token, lengths)
    entry_score = torch.repeat_interleave(score, on(lengths, table.device))
    total = torch.zeros(part.documents, device=table.device)
    seen = torch.zeros(part.documents, dtype=torch.bool, device=table.device)
    step = max(1, GATHER_CELLS // max(part.documents, 1))
    for first in range(0, tokens, step):
        a, b = np.searchsorted(entry_token, [first, first + step])
        if a == b:
            continue
        cells = on(entry_token[a:b] - first, table.device) * part.documents + documents[a:b]
        grid = torch.full((min(step, tokens - first) * part.documents,), -torch.inf, device=table.device)
        grid = grid.scatter_reduce_(0, cells, entry_score[a:b], "amax").view(-1, part.documents)
        touched = grid > -torch.inf
        total += torch.where(touched, grid, 0).sum(0)
        seen |= touched.any(0)
    candidates = torch.nonzero(seen).flatten()
    return candidates.cpu().numpy(), total[candidates].cpu().numpy()


def centroid_interaction(part: MultiVectorPart, table: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
    """PLAID's approximate MaxSim: every vector of the candidates replaced by its centroid's scores."""
    lengths = part.offsets[candidates + 1] - part.offsets[candidates]
    ids = on(part.centroid_ids[ranges(part.offsets[candidates], lengths)].astype("int64"), table.device)
    return summed_max(table.T.contiguous()[ids], lengths)


def train_centroids(vectors: np.ndarray, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros((0, vectors.shape[1]), "float32")
    kmeans = faiss.Kmeans(
        vectors.shape[1], count, niter=KMEANS_ITERATIONS, spherical=True, seed=SEED,
        max_points_per_centroid=KMEANS_POINTS_PER_CENTROID, min_points_per_centroid=1,
    )
    kmeans.train(np.ascontiguousarray(vectors))
    return kmeans.centroids.astype("float32")


def assign(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    if len(vectors) == 0:
        return np.zeros(0, "uint16")
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, ids = index.search(np.ascontiguousarray(vectors), 1)
    return ids[:, 0].astype("uint16")


def sample(vectors: np.ndarray, size: int) -> np.ndarray:
    if len(vectors) > size:
        vectors = vectors[np.random.default_rng(SEED).choice(len(vectors), size, replace=False)]
    return np.ascontiguousarray(vectors)


def train_quantizer(targets: np.ndarray) -> tuple[faiss.OPQMatrix, faiss.ProductQuantizer]:
    """An OPQ rotation, then the product quantiser of the rotated targets."""
    m, bits = subquantizers(targets.shape[1])
    rotation = faiss.OPQMatrix(targets.shape[1], m)
    rotation.niter = OPQ_ITERATIONS
    inner = faiss.ProductQuantizer(targets.shape[1], m, 8)  # the PQ the rotation is fitted with
    quantizer = faiss.ProductQuantizer(targets.shape[1], m, bits)
    quantizer.cp.niter = PQ_ITERATIONS
    for pq in (inner, quantizer):
        pq.cp.min_points_per_centroid = 1  # small segments train on what they have, quietly
    rotation.pq = inner
    with one_thread():
        rotation.train(sample(targets, OPQ_TRAIN_SAMPLE))
    rotation.pq = None  # faiss keeps only a pointer to `inner`, which Python frees on return
    quantizer.train(rotate(rotation, sample(targets, TRAIN_SAMPLE)))
    return rotation, quantizer


def rotate(rotation: faiss.OPQMatrix, vectors: np.ndarray) -> np.ndarray:
    with one_thread():
        return rotation.apply(np.ascontiguousarray(vectors))


@contextmanager
def one_thread():
    """OPQ's training and its rotation differ with the thread count (BLAS's summation order), and a
    segment must be the same bytes wherever it is built (a Ray worker or the writer)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def inverted_lists(ids: np.ndarray, lengths: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """For each centroid, the sorted documents with a vector assigned to it."""
    documents = len(lengths)
    owner = np.repeat(np.arange(documents, dtype="int64"), lengths)
    pairs = np.unique(ids.astype("int64") * max(documents, 1) + owner)
    centroid, doc = np.divmod(pairs, max(documents, 1))
    list_offsets = np.concatenate([[0], np.cumsum(np.bincount(centroid, minlength=count))]).astype("int64")
    return list_offsets, doc.astype("int32")
