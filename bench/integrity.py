"""What verifying every stored file costs: checksum throughput and the start-up of a SciFact-sized collection.

    python -m bench.integrity [--dataset scifact] [--indexes dense,bm25] [--repeats 5]

Segments are verified when they are opened (sizes and xxHash3 of every file), so the cost is paid at
start-up and after each commit, never on a search. Measured in one run on a warm page cache: the
collection's open time with verification, the checksum pass alone over the same files, and their
difference (the open time verification would save).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from sieve.index.collection import Collection
from sieve.index.settings import CollectionSettings
from sieve.index.storage import file_checksum

from .common import load_corpus, write_results

BATCH = 256


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--indexes", default="dense,bm25")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    docs = load_corpus(args.dataset)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / args.dataset
        collection = Collection.create(folder, CollectionSettings(indexes=tuple(args.indexes.split(","))))
        started = time.perf_counter()
        for start in tqdm(range(0, len(docs), BATCH), desc=f"ingest {args.dataset}", unit="batch"):
            collection.upsert(docs[start:start + BATCH])
        ingest_s = time.perf_counter() - started
        collection.compact()  # one segment, as a long-lived collection mostly is
        collection.close()
        files = [p for p in (folder / "segments").rglob("*") if p.is_file()]
        total = sum(p.stat().st_size for p in files)

        def checksum_all():
            for path in files:
                file_checksum(path)

        checksum_all()  # warm the page cache, as a restart on the same machine finds it
        checksum_s = median_seconds(checksum_all, args.repeats)
        open_s = median_seconds(lambda: Collection.open(folder, read_only=True).close(), args.repeats)

    figures = {
        "dataset": args.dataset, "indexes": args.indexes, "documents": len(docs), "files": len(files),
        "bytes": total, "ingest_seconds": ingest_s, "checksum_seconds": checksum_s,
        "checksum_mb_per_s": total / checksum_s / 1e6, "open_seconds_verified": open_s,
        "open_seconds_without_checksums": open_s - checksum_s, "verification_share_of_open": checksum_s / open_s,
    }
    markdown = "\n".join([
        f"# Verification cost: {args.dataset} ({len(docs)} documents, indexes {args.indexes})",
        "",
        f"Stored: {len(files)} files, {total / 1e6:.1f} MB in one segment; warm page cache; median of "
        f"{args.repeats}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| xxHash3 over every stored file | {figures['checksum_mb_per_s']:.0f} MB/s |",
        f"| open (start-up) with verification | {open_s * 1000:.0f} ms |",
        f"| the checksum pass alone | {checksum_s * 1000:.0f} ms ({figures['verification_share_of_open']:.0%} of the open) |",
        f"| open without checksums (difference) | {(open_s - checksum_s) * 1000:.0f} ms |",
        f"| ingestion of the corpus (for scale) | {ingest_s:.0f} s |",
        "",
    ])
    write_results("integrity", figures, markdown)


if __name__ == "__main__":
    main()
