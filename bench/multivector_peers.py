"""Peers for the multi-vector index (issue #15): LanceDB's multivector IVF_PQ index and fast-plaid.

Runs on the cache files bench/multivector.py writes (the same pooled document vectors and query
tokens as `python -m bench.multivector --speed`), one query at a time, and for each query times
exact brute-force MaxSim in torch (fp32, in memory; the same `brute_force` as bench/multivector.py)
and the peer's search. It writes per-query timings and top-k rows (0-based document index into the
pooled file) of the peer and of exact search as JSON; the main bench computes ratios, agreement and
nDCG from it. This file imports neither sieve nor faiss, so it runs in the fast-plaid venv too
(any python with numpy + torch + the peer).

LanceDB, in the main venv (it pulls no torch; lancedb 0.40.0 when written):

    .venv/bin/pip install -c constraints.txt lancedb
    nice -n 10 .venv/bin/python bench/multivector_peers.py --peer lancedb --settings default,fast \\
        --pooled ~/.cache/sieve/mv/scifact-minilm-256-pool2.npz \\
        --queries ~/.cache/sieve/mv/scifact-minilm-256-queries.npz \\
        --k 100 --out "/tmp/lancedb-{setting}.json"

fast-plaid, in its own venv (fast-plaid's wheels pin an exact torch: fast-plaid 1.7.0.2110 pins
torch==2.11.0, which PyPI serves as a CUDA build of several GB; it runs on CPU with device="cpu"):

    python3 -m venv .venv-fastplaid
    .venv-fastplaid/bin/pip install fast-plaid
    nice -n 10 .venv-fastplaid/bin/python bench/multivector_peers.py --peer fast-plaid --settings default,fast \\
        --pooled ~/.cache/sieve/mv/scifact-minilm-256-pool2.npz \\
        --queries ~/.cache/sieve/mv/scifact-minilm-256-queries.npz \\
        --k 100 --out "/tmp/fast-plaid-{setting}.json"

Settings (PEERS below): "default" is the peer's own defaults at build and search time (metric cosine
for LanceDB, the only metric its multivector search supports). "fast": for fast-plaid, 4 IVF probes and
1024 documents scored in full (defaults 8 and 4096); for LanceDB, whose default index returned the same
top 10 in the same time at nprobes 3 to 20 on SciFact pool 2 (and the same top 100 at 1 to 256 on its
first 1000 documents), 256 partitions at build with 10 probed. A refine_factor (LanceDB rescoring its
candidates with the float32 vectors the table keeps) is in neither setting: 2 made the top 10 equal
exact's on 30 SciFact queries at about 2.3x the default's time.

Threads: torch.set_num_threads(--threads, default 2) for brute force and fast-plaid (libtorch in the
same process); LANCE_CPU_THREADS and RAYON_NUM_THREADS are set to the same number before the peer is
imported (LanceDB's Rust pools). Run it on an otherwise idle machine: with 2 threads and the cores
busy elsewhere, fast-plaid's search slowed up to 25x (thread contention) where 1 thread did not. The
first query runs once for both, untimed, before the timed loop. fast-plaid's build (k-means and
compression on CPU) took about 10 minutes for SciFact pool 2 on 2 shared cores; LanceDB's about 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PEERS = {  # setting -> build parameters, search parameters; None = the peer's default
    "lancedb": {
        "default": {"build": {}, "search": {}},
        # the default index answers the same whatever nprobes (1 to 256: identical rows and time on
        # SciFact), so a faster setting needs partitions to skip: 256 of them, 10 probed
        "fast": {"build": {"num_partitions": 256}, "search": {"nprobes": 10}},
        "refine 2": {"build": {}, "search": {"refine_factor": 2}},  # rescored from the stored float32 vectors
    },
    "fast-plaid": {
        "default": {"build": {}, "search": {}},
        "fast": {"build": {}, "search": {"n_ivf_probe": 4, "n_full_scores": 1024}},
        "faster": {"build": {}, "search": {"n_ivf_probe": 4, "n_full_scores": 256}},
    },
}


def brute_force(vectors: torch.Tensor, lengths: torch.Tensor, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact MaxSim over every document, as a user without an index would: one matmul, a segmented max.
    (A copy of bench/multivector.py's, so that this file does not import sieve.)"""
    similarities = vectors @ torch.from_numpy(query).T  # (stored vectors, query tokens)
    scores = torch.segment_reduce(similarities, "max", lengths=lengths, axis=0).sum(1)
    best = torch.topk(scores, k)
    return best.indices.numpy(), best.values.numpy()


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class LanceDBPeer:
    name = "lancedb"

    def __init__(self, scratch: Path, params: dict):
        import lancedb

        self.lancedb = lancedb
        self.version = lancedb.__version__
        self.scratch = scratch
        self.params = params

    def build(self, vectors: np.ndarray, offsets: np.ndarray) -> dict:
        import pyarrow as pa
        from lancedb.index import IvfPq

        dim = vectors.shape[1]
        cells = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
        documents = pa.ListArray.from_arrays(pa.array(offsets.astype("int32")), cells)
        table = pa.table({"row": pa.array(np.arange(len(offsets) - 1, dtype="int64")), "vector": documents})
        started = time.perf_counter()
        self.table = self.lancedb.connect(self.scratch).create_table("peer", table)
        written = time.perf_counter()
        self.table.create_index("vector", config=IvfPq(distance_type="cosine", **self.params["build"]))
        done = time.perf_counter()
        index = self.table.list_indices()[0]
        folder = self.scratch / "peer.lance"
        index_bytes = directory_bytes(folder / "_indices")
        return {"build_s": done - started, "table_write_s": written - started, "index_s": done - written,
                "index_bytes": index_bytes, "table_bytes_on_disk": directory_bytes(folder),
                "index_details": json.loads(json.dumps(getattr(index, "index_details", None), default=str)),
                "note": "index_bytes: the _indices folder (IVF centroids + PQ codes); the table itself keeps "
                        "the float32 vectors (table_bytes_on_disk), which a refine_factor rescoring reads. "
                        "scores: query tokens - _distance, on MaxSim's scale only with a refine_factor"}

    def search(self, query: np.ndarray, k: int) -> tuple[list[int], list[float]]:
        builder = self.table.search(query, vector_column_name="vector").distance_type("cosine").limit(k)
        knobs = self.params["search"]
        if "nprobes" in knobs:
            builder = builder.nprobes(knobs["nprobes"])
        if "refine_factor" in knobs:
            builder = builder.refine_factor(knobs["refine_factor"])
        found = builder.select(["row", "_distance"]).to_arrow()
        # score = query tokens - _distance: MaxSim exactly with a refine_factor (then _distance is the sum
        # over query tokens of 1 - max cosine); from the PQ codes without one, where only its order means much
        return found["row"].to_pylist(), [len(query) - d for d in found["_distance"].to_pylist()]


class FastPlaidPeer:
    name = "fast-plaid"

    def __init__(self, scratch: Path, params: dict):
        from importlib.metadata import version

        from fast_plaid import search

        self.search_module = search
        self.version = version("fast-plaid")
        self.folder = scratch / "fast-plaid"
        self.params = params

    def build(self, vectors: np.ndarray, offsets: np.ndarray) -> dict:
        documents = [torch.from_numpy(vectors[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        started = time.perf_counter()
        self.index = self.search_module.FastPlaid(index=str(self.folder), device="cpu")
        self.index.create(documents_embeddings=documents, **self.params["build"])
        done = time.perf_counter()
        return {"build_s": done - started, "index_bytes": directory_bytes(self.folder),
                "note": "index_bytes: the whole index folder (centroids, residual codes, IVF, metadata; "
                        "with <= 1000 documents fast-plaid also keeps the raw embeddings there)"}

    def search(self, query: np.ndarray, k: int) -> tuple[list[int], list[float]]:
        hits = self.index.search(queries_embeddings=torch.from_numpy(query)[None], top_k=k,
                                 show_progress=False, n_processes=1, **self.params["search"])[0]
        return [int(row) for row, _ in hits], [float(score) for _, score in hits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=sorted(PEERS), required=True)
    parser.add_argument("--settings", default="default,fast",
                        help="settings of PEERS, comma-separated; those with the same build parameters share one build")
    parser.add_argument("--pooled", type=Path, required=True, help="cached_pooled's .npz (vectors, offsets)")
    parser.add_argument("--queries", type=Path, required=True, help="cached_tokens' .npz of the queries")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--n-queries", type=int, default=150, help="the first this many queries")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=None, help="parent of the temporary index folder")
    parser.add_argument("--out", required=True, help="a JSON file a setting, '{setting}' in the path names it")
    args = parser.parse_args()

    os.environ.setdefault("LANCE_CPU_THREADS", str(args.threads))
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)

    pooled = np.load(args.pooled)
    vectors = pooled["vectors"].astype("float32")
    offsets = pooled["offsets"].astype("int64")
    stored = np.load(args.queries)
    queries = np.split(stored["vectors"].astype("float32"), np.cumsum(stored["lengths"])[:-1])[:args.n_queries]
    documents = len(offsets) - 1
    k = min(args.k, documents)
    brute_vectors, lengths = torch.from_numpy(vectors), torch.from_numpy(np.diff(offsets))
    print(f"{args.pooled.name}: {documents} documents, {len(vectors)} vectors; {len(queries)} queries; "
          f"{args.peer} {args.settings}", flush=True)

    builds: dict[str, list[str]] = {}  # build parameters -> the settings searched on that build
    for setting in args.settings.split(","):
        builds.setdefault(json.dumps(PEERS[args.peer][setting]["build"], sort_keys=True), []).append(setting)
    for settings in builds.values():
        scratch = Path(tempfile.mkdtemp(prefix="sieve-peer-", dir=args.scratch))
        try:
            peer = (LanceDBPeer if args.peer == "lancedb" else FastPlaidPeer)(scratch, PEERS[args.peer][settings[0]])
            built = peer.build(vectors, offsets)
            print(f"built in {built['build_s']:.1f} s, {built['index_bytes'] / 1e6:.1f} MB", flush=True)
            for setting in settings:
                peer.params = PEERS[args.peer][setting]
                measure(peer, setting, built, queries, brute_vectors, lengths, k, args)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def measure(peer, setting: str, built: dict, queries: list[np.ndarray], brute_vectors: torch.Tensor,
            lengths: torch.Tensor, k: int, args) -> None:
    """Each query timed by brute force then by the peer, paired; one JSON file for the setting."""
    brute_force(brute_vectors, lengths, queries[0], k)  # warm-up, untimed
    peer.search(queries[0], k)
    per_query = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        exact_rows, exact_scores = brute_force(brute_vectors, lengths, query, k)
        brute_s = time.perf_counter() - started
        started = time.perf_counter()
        rows, scores = peer.search(query, k)
        peer_s = time.perf_counter() - started
        per_query.append({"query": i, "query_tokens": len(query), "peer_s": peer_s, "brute_s": brute_s,
                          "rows": rows, "scores": scores, "exact_rows": exact_rows.tolist(),
                          "exact_scores": exact_scores.tolist()})
    ratios = [q["peer_s"] / q["brute_s"] for q in per_query]
    agreement = [len(set(q["rows"][:10]) & set(q["exact_rows"][:10])) / 10 for q in per_query]
    summary = {"p50_peer_ms": 1000 * float(np.median([q["peer_s"] for q in per_query])),
               "p50_brute_ms": 1000 * float(np.median([q["brute_s"] for q in per_query])),
               "p50_ratio_peer_to_brute": float(np.median(ratios)),
               "top10_agreement": float(np.mean(agreement))}
    result = {"peer": peer.name, "version": peer.version, "setting": setting, "params": peer.params,
              "k": k, "threads": args.threads, "torch": torch.__version__, "python": sys.version.split()[0],
              "pooled": str(args.pooled), "queries_file": str(args.queries), "documents": len(lengths),
              "vectors": len(brute_vectors), **built, "bytes_per_vector": built["index_bytes"] / len(brute_vectors),
              "summary": summary, "per_query": per_query}
    out = Path(args.out.replace("{setting}", setting))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"peer": peer.name, "version": peer.version, "setting": setting,
                      "build_s": round(built["build_s"], 2), "bytes_per_vector": round(result["bytes_per_vector"], 1),
                      **{key: round(value, 3) for key, value in summary.items()}}), flush=True)


if __name__ == "__main__":
    main()
