"""Passages/s of the Ray path (1 and 2 workers) against ordinary ingestion on the same machine, with the
stage breakdown; writes bench/results/ray_ingest.{md,json}.

    python -m bench.ray_ingest --docs 400 --indexes dense,bm25
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from sieve.index.beir import DATASETS
from sieve.index.documents import batches, read_jsonl

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--indexes", default="dense,bm25")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import ray

    from sieve.service.ray_ingest import ingest_with_ray
    from sieve.service.sync_engine import SyncEngine

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    lines = (DATASETS / "scifact" / "corpus.jsonl").read_text().splitlines()[:args.docs]
    source = work / "slice.jsonl"
    source.write_text("\n".join(lines) + "\n")
    settings = {"indexes": args.indexes.split(",")}
    cpus = os.cpu_count()
    figures = {"docs": args.docs, "indexes": settings["indexes"], "batch_size": args.batch_size, "cpus": cpus,
               "load_average": os.getloadavg()[0]}
    with SyncEngine(data=str(work / "data")) as engine:
        engine.create_collection("warm", settings)
        engine.upsert("warm", [d for d in read_jsonl(source)][:8])  # the model loaded before timing
        engine.create_collection("plain", settings)
        start = time.perf_counter()
        for batch, _ in batches(read_jsonl(source), args.batch_size, []):
            engine.upsert("plain", batch)
        figures["ordinary"] = {"seconds": time.perf_counter() - start}
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for workers, per_worker in ((1, cpus), (2, cpus // 2)):
            name = f"ray{workers}"
            engine.create_collection(name, settings)
            start = time.perf_counter()
            report = ingest_with_ray(str(source), name, engine, batch_size=args.batch_size, workers=workers,
                                     cpus_per_worker=per_worker, progress=False)
            figures[name] = {"seconds": time.perf_counter() - start, "stage_seconds": report.seconds}
    ray.shutdown()
    rates = {}
    for key in ("ordinary", "ray1", "ray2"):
        figures[key]["passages_per_s"] = args.docs / figures[key]["seconds"]
        rates[key] = figures[key]["passages_per_s"]
    for key in ("ray1", "ray2"):
        figures[key]["ratio_to_ordinary"] = rates[key] / rates["ordinary"]
        # What the workers' busy time alone gives: the pipeline's cost without the cluster's start-up.
        busy = max(figures[key]["stage_seconds"].get("encode", 0) / (1 if key == "ray1" else 2), 1e-9)
        figures[key]["encode_bound_passages_per_s"] = args.docs / busy
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray_ingest.json").write_text(json.dumps(figures, indent=2))
    rows = ["| run | seconds | passages/s | ratio to ordinary | stage busy seconds (read/prune/encode/pool/build) |",
            "|---|---|---|---|---|"]
    for key in ("ordinary", "ray1", "ray2"):
        f = figures[key]
        stages = "/".join(f"{f.get('stage_seconds', {}).get(s, 0):.2f}" for s in
                          ("read", "prune", "encode", "pool", "build")) if key != "ordinary" else "-"
        rows.append(f"| {key} | {f['seconds']:.1f} | {f['passages_per_s']:.1f} | "
                    f"{f.get('ratio_to_ordinary', 1):.2f} | {stages} |")
    text = (f"SciFact, first {args.docs} passages, indexes {','.join(settings['indexes'])}, batches of "
            f"{args.batch_size}, {cpus} CPUs (load average {figures['load_average']:.1f} at start)\n\n"
            + "\n".join(rows) + "\n")
    (RESULTS / "ray_ingest.md").write_text(text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
