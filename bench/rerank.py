"""Reranking benchmark: the fused first stage, the reranker with and without early pruning, the peer.

Every setting reranks the same candidates: RRF(BM25, MiniLM dense) top-20 / top-50 / top-100 on
SciFact test. Settings of one depth run interleaved query by query, so load from other processes
on this shared machine hits them alike and the ratios stay fair. The peer is
sentence_transformers.CrossEncoder.predict over the same BERT weights (latency only: its linear
head is not ours). Zero-shot: Cranfield, CISI, Medline top-20, reranked pipeline vs first stage.

    python -m bench.rerank --threads 2            # writes bench/results/rerank.{json,md,png}
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ir_measures
import numpy as np
import torch
from tqdm import tqdm

from sieve.rankers import PruningOptions, fuse_with_first_stage, load_reranker
from sieve.rankers.reranker import ARTIFACT
from sieve.index.beir import DATASETS, cache_dir, load_beir, passage_text
from sieve.rankers.first_stage import FirstStage
from sieve.rankers.calibration import cheapest_setting
from sieve.service.client import SieveClient
from sieve.service.process import ServerProcess
from sieve.v1 import sieve_pb2 as pb

from .common import under_load

NDCG = ir_measures.nDCG @ 10
RESULTS = Path(__file__).parent / "results"
DEV_OVERLAPS = (0.99, 0.95, 0.9)  # besides the default: the cheapest calibrated settings at these dev overlaps


def pruning_settings(config: dict) -> dict[str, PruningOptions]:
    """The unpruned model, the shipped default, the cheapest settings on calibration's simulated frontier
    at a few dev top-10 overlaps, and a fixed aggressive setting."""
    settings = {"full (no pruning)": PruningOptions(prune=False)}
    if config.get("default_checkpoints"):
        settings[f"default @{_layers(config['default_checkpoints'])}"] = PruningOptions()
    for overlap in DEV_OVERLAPS:
        best = cheapest_setting(config.get("pruning_frontier", []), overlap)
        if best:
            settings.setdefault(f"prune @{_layers(best['checkpoints'])}, dev overlap {best['top10_overlap']:.3f}",
                                PruningOptions(checkpoints=tuple(best["checkpoints"]),
                                               margins={int(l): m for l, m in best["margins"].items()}))
    settings["prune @1,2 margin 0.5"] = PruningOptions(checkpoints=(1, 2), margin=0.5)
    return settings


def _layers(checkpoints) -> str:
    return ",".join(map(str, checkpoints))


def ndcg(run: dict[str, list[tuple[str, float]]], qrels: dict) -> float:
    qrel_list = [ir_measures.Qrel(q, d, r) for q in run for d, r in qrels.get(q, {}).items()]
    scored = [ir_measures.ScoredDoc(q, d, float(s)) for q, ranking in run.items() for d, s in ranking]
    return float(ir_measures.calc_aggregate([NDCG], qrel_list, scored)[NDCG])


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def first_stage_run(name: str, depth: int = 100, multivector: bool = False):
    corpus, queries, qrels = load_beir(DATASETS / name, "test")
    stage = FirstStage(corpus, cache=cache_dir("reranker") / f"{name}_first_stage", multivector=multivector)
    qids = sorted(queries)
    started = time.perf_counter()
    candidates = [stage.search([queries[q]], depth)[0] for q in qids]  # one at a time, like a service
    latency = (time.perf_counter() - started) / len(qids)
    return corpus, queries, qrels, qids, candidates, latency


def peer_folder(reranker) -> str:
    """A sentence-transformers CrossEncoder folder with the reranker's BERT weights and a linear head."""
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    from sieve.index.encoders import resolve_encoder

    folder = tempfile.mkdtemp(prefix="peer-ce-")
    model = BertForSequenceClassification.from_pretrained(resolve_encoder(""), num_labels=1)
    model.bert.load_state_dict(reranker.model.bert.float().state_dict())
    reranker.model.bert.to(reranker.dtype)
    model.save_pretrained(folder)
    reranker.tokenizer.save_pretrained(folder)
    return CrossEncoder(folder, max_length=reranker.max_length, device="cpu")


def rerank_depth(reranker, settings, peer, corpus, queries, qrels, qids, candidates, depth, limit, weight,
                 peer_queries):
    qids, candidates = qids[:limit], candidates[:limit]
    runs = {name: {} for name in settings}
    fused = {name: {} for name in settings}
    seconds = {name: 0.0 for name in settings}
    survivors = {name: [] for name in settings}
    overlap = {name: [] for name in settings}
    peer_seconds, peer_full_seconds = 0.0, 0.0
    for n, (q, cands) in enumerate(tqdm(list(zip(qids, candidates)), desc=f"top-{depth}", mininterval=10)):
        ids = cands.ids[:depth]
        passages = [passage_text(corpus[d]) for d in ids]
        for name, options in settings.items():
            started = time.perf_counter()
            result = reranker.rerank(queries[q], passages, 10, options)
            seconds[name] += time.perf_counter() - started
            runs[name][q] = [(ids[i], s) for i, s in zip(result.order, result.scores)]
            fused[name][q] = [(ids[i], s) for i, s in fuse_with_first_stage(result, cands.rrf[:depth].tolist(), weight)]
            survivors[name].append(result.survivors)
        if peer is not None and n < peer_queries:  # latency only, on a prefix of the queries
            started = time.perf_counter()
            peer.predict([(queries[q], p) for p in passages], batch_size=32, show_progress_bar=False)
            peer_seconds += time.perf_counter() - started
            started = time.perf_counter()
            reranker.rerank(queries[q], passages, 10, PruningOptions(prune=False))
            peer_full_seconds += time.perf_counter() - started
        full_top = {d for d, _ in runs["full (no pruning)"][q][:10]}
        for name in settings:
            overlap[name].append(len(full_top & {d for d, _ in runs[name][q][:10]}) / len(full_top))
    base = runs["full (no pruning)"]
    rows = {}
    for name in settings:
        rows[name] = {
            "ndcg10_reranker": ndcg(runs[name], qrels), "ndcg10_pipeline": ndcg(fused[name], qrels),
            "ms_per_query": 1000 * seconds[name] / len(qids),
            "speedup": seconds["full (no pruning)"] / seconds[name],
            "top10_overlap": float(np.mean(overlap[name])),
            "mean_survivors": np.mean(survivors[name], axis=0).round(1).tolist(),
        }
        rows[name]["ndcg_ratio"] = ratio(rows[name]["ndcg10_reranker"], ndcg(base, qrels))
        rows[name]["pipeline_ndcg_ratio"] = ratio(rows[name]["ndcg10_pipeline"],
                                                  rows["full (no pruning)"]["ndcg10_pipeline"])
    if peer is not None:
        measured = min(peer_queries, len(qids))
        rows["peer CrossEncoder.predict"] = {"ms_per_query": 1000 * peer_seconds / measured, "queries": measured,
                                             "speedup": peer_full_seconds / peer_seconds}
    first = {q: list(zip(c.ids[:depth], c.rrf[:depth].tolist())) for q, c in zip(qids, candidates)}
    return {"queries": len(qids), "first_stage_ndcg10_same_queries": ndcg(first, qrels), "settings": rows}


def grpc_latency(reranker: str, corpus, queries, qids, candidates, depths=(20, 100), clients=(1, 8),
                 requests: int = 24) -> list[dict]:
    """End-to-end Rerank RPC latency through a real server process, with and without early pruning; the
    requests name a collection whose settings choose the reranker."""
    rows = []
    with tempfile.TemporaryDirectory() as work:
        roots = str(Path(reranker).expanduser().resolve().parent) if reranker else ""  # the server's model policy
        server = ServerProcess(Path(work) / "data", {"SIEVE_MODEL_ROOTS": roots}).start()
        try:
            with SieveClient(server.target) as client:
                client.create_collection("bench", {"indexes": ["bm25"], "reranker": reranker})
                client.rerank(queries[qids[0]], [("warm-up", "loads the model")], collection="bench")
            for depth in depths:
                lists = [[(d, passage_text(corpus[d])) for d in c.ids[:depth]] for c in candidates]
                for prune in (False, True):
                    options = pb.RerankOptions(prune=prune)
                    for n in clients:
                        row = under_load(server.target, n, requests, lambda client, i: client.rerank(
                            queries[qids[i % len(qids)]], lists[i % len(qids)], k=10, collection="bench",
                            options=options, timeout=600))  # 8 clients x 100 candidates queue for minutes
                        rows.append({"depth": depth, "pruning": prune, **row})
                        print("grpc", rows[-1], flush=True)
        finally:
            server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", default="20:300,50:60,100:30", help="depth:queries per depth (a prefix of the sorted test ids)")
    parser.add_argument("--maxsim-queries", default="20:300,30:300",
                        help="depth:queries reranked from RRF(BM25, dense, pooled MaxSim), unpruned and default")
    parser.add_argument("--zero-shot", default="cranfield,cisi,medline")
    parser.add_argument("--zero-shot-queries", type=int, default=40)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--peer-queries", type=int, default=20, help="queries per depth timed for the peer")
    parser.add_argument("--no-grpc", action="store_true")
    parser.add_argument("--grpc-requests", type=int, default=24, help="requests per gRPC load setting")
    parser.add_argument("--reranker", default="", help="artifact folder or model name (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reranker = load_reranker(args.reranker)
    settings = pruning_settings(json.loads((Path(args.reranker or ARTIFACT) / "config.json").read_text()))
    weight = reranker.fusion_weight if reranker.fusion_weight is not None else 0.5
    peer = None if args.no_peer else peer_folder(reranker)
    report = {"threads": args.threads, "dtype": str(reranker.dtype), "fusion_weight": weight,
              "default_checkpoints": list(reranker.default_checkpoints), "margins": reranker.margins,
              "scifact": {}, "zero_shot": {}}

    corpus, queries, qrels, qids, candidates, latency = first_stage_run("scifact")
    first = {q: list(zip(c.ids, c.rrf.tolist())) for q, c in zip(qids, candidates)}
    report["scifact"]["first_stage"] = {"ndcg10": ndcg(first, qrels), "ms_per_query": 1000 * latency, "queries": len(qids)}
    print("scifact first stage", report["scifact"]["first_stage"], flush=True)
    for spec in args.queries.split(","):
        depth, limit = map(int, spec.split(":"))
        report["scifact"][f"top{depth}"] = rerank_depth(reranker, settings, peer, corpus, queries, qrels, qids,
                                                        candidates, depth, limit, weight, args.peer_queries)
        print(f"scifact top{depth}", json.dumps(report["scifact"][f"top{depth}"], indent=1), flush=True)

    if not args.no_grpc:
        report["grpc"] = grpc_latency(args.reranker, corpus, queries, qids, candidates, requests=args.grpc_requests)

    if args.maxsim_queries:
        report["scifact_maxsim"] = maxsim_section(reranker, settings, args.maxsim_queries, weight)
    for name in filter(None, args.zero_shot.split(",")):
        report["zero_shot"][name] = zero_shot(reranker, name, args.zero_shot_queries, weight)
        print(name, report["zero_shot"][name], flush=True)
    write_report(report, args.out)


def maxsim_section(reranker, settings, spec: str, weight: float) -> dict:
    """The unpruned and default reranker over RRF(BM25, dense, pooled MaxSim) candidates."""
    corpus, queries, qrels, qids, candidates, latency = first_stage_run("scifact", multivector=True)
    first = {q: list(zip(c.ids, c.rrf.tolist())) for q, c in zip(qids, candidates)}
    section = {"first_stage": {"ndcg10": ndcg(first, qrels), "ms_per_query": 1000 * latency, "queries": len(qids)}}
    print("scifact first stage with MaxSim", section["first_stage"], flush=True)
    few = {name: settings[name] for name in list(settings)[:2]}  # unpruned and the default
    for item in spec.split(","):
        depth, limit = map(int, item.split(":"))
        section[f"top{depth}"] = rerank_depth(reranker, few, None, corpus, queries, qrels, qids, candidates, depth,
                                              limit, weight, 0)
        print(f"scifact+maxsim top{depth}", json.dumps(section[f"top{depth}"], indent=1), flush=True)
    return section


def zero_shot(reranker, name: str, limit: int, weight: float) -> dict:
    """Top-20 of a collection the reranker never trained on: first stage, reranker alone, pipeline."""
    corpus, queries, qrels, qids, candidates, _ = first_stage_run(name, 20)
    first, alone, fused = {}, {}, {}
    for q, cands in zip(qids[:limit], candidates[:limit]):
        result = reranker.rerank(queries[q], [passage_text(corpus[d]) for d in cands.ids], 10, PruningOptions())
        first[q] = list(zip(cands.ids, cands.rrf.tolist()))
        alone[q] = [(cands.ids[i], s) for i, s in zip(result.order, result.scores)]
        fused[q] = [(cands.ids[i], s) for i, s in fuse_with_first_stage(result, cands.rrf.tolist(), weight)]
    return {"queries": len(first), "first_stage_ndcg10": ndcg(first, qrels),
            "reranker_ndcg10": ndcg(alone, qrels), "pipeline_ndcg10": ndcg(fused, qrels)}


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rerank.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "rerank.md").write_text(markdown(report))
    plot(report, out / "rerank.png")
    print(markdown(report))


def markdown(report: dict) -> str:
    lines = [f"# Reranking, SciFact test ({report['dtype']}, {report['threads']} threads, fusion weight "
             f"{report['fusion_weight']})", ""]
    for section, title in (("scifact", "RRF(BM25, dense)"), ("scifact_maxsim", "RRF(BM25, dense, pooled MaxSim)")):
        if section in report:
            lines += depth_table(report[section], title)
    return "\n".join(lines + service_tables(report)) + "\n"


def depth_table(section: dict, title: str) -> list[str]:
    first = section["first_stage"]
    lines = [f"Fused first stage {title}: nDCG@10 {first['ndcg10']:.3f}, {first['ms_per_query']:.0f} ms/query "
             f"({first['queries']} queries).", "",
             "| depth | setting | queries | nDCG@10 reranker | nDCG@10 pipeline | ratio | top-10 overlap | ms/query | speedup | survivors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for depth, block in section.items():
        if depth == "first_stage":
            continue
        lines.append(f"| {depth} | first stage (same queries) | {block['queries']} | | "
                     f"{block['first_stage_ndcg10_same_queries']:.3f} | | | | | |")
        for name, row in block["settings"].items():
            if "ndcg10_reranker" not in row:
                lines.append(f"| {depth} | {name} | {row.get('queries', block['queries'])} | | | | | {row['ms_per_query']:.0f} | "
                             f"{row['speedup']:.2f} | |")
                continue
            lines.append(f"| {depth} | {name} | {block['queries']} | {row['ndcg10_reranker']:.3f} | "
                         f"{row['ndcg10_pipeline']:.3f} | {row['ndcg_ratio'] or float('nan'):.3f} | {row['top10_overlap']:.3f} | "
                         f"{row['ms_per_query']:.0f} | {row['speedup']:.2f} | {row['mean_survivors']} |")
    return lines + [""]


def service_tables(report: dict) -> list[str]:
    lines = []
    if report.get("grpc"):
        lines += ["End-to-end Rerank RPC through a real server (10 results; default checkpoints and margins when pruning):",
                  "", "| candidates | pruning | clients | requests | p50 ms | p99 ms | requests/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['depth']} | {'on' if r['pruning'] else 'off'} | {r['clients']} | {r['requests']} | {r['p50_ms']} | "
                  f"{r['p99_ms']} | {r['throughput_qps']} |" for r in report["grpc"]]
    lines += ["", "Zero-shot (top-20, default pruning):", "",
              "| dataset | queries | first stage | reranker alone | pipeline |", "|---|---|---|---|---|"]
    for name, row in report["zero_shot"].items():
        lines.append(f"| {name} | {row['queries']} | {row['first_stage_ndcg10']:.3f} | {row['reranker_ndcg10']:.3f} | "
                     f"{row['pipeline_ndcg10']:.3f} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    blocks = [(section, depth, block) for section in ("scifact", "scifact_maxsim") for depth, block
              in report.get(section, {}).items() if depth != "first_stage"]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for (section, depth, block), color in zip(blocks, colors):
        # each depth is measured on its own query prefix: its first stage is scored on the same queries
        first = report[section]["first_stage"]
        ax.scatter([first["ms_per_query"]], [block["first_stage_ndcg10_same_queries"]], marker="*", s=150, color=color)
        rows = sorted((row["ms_per_query"], row["ndcg10_pipeline"], name, row["top10_overlap"])
                      for name, row in block["settings"].items() if "ndcg10_pipeline" in row)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], color=color, linewidth=0.6, alpha=0.5)
        for ms, value, name, overlap in rows:  # each point labelled with its top-10 overlap with the full model
            full = name.startswith("full")
            ax.scatter(ms, value, color=color, marker="o" if full else ("s" if name.startswith("default") else "^"))
            ax.annotate("full" if full else f"{overlap:.2f}", (ms, value), xytext=(3, 3), textcoords="offset points",
                        fontsize=6)
        stage = "BM25+dense+MaxSim" if section == "scifact_maxsim" else "BM25+dense"
        ax.scatter([], [], color=color, label=f"{stage} {depth}, {block['queries']} queries")
    for marker, meaning in (("*", "first stage"), ("o", "full reranker"), ("s", "default pruning"),
                            ("^", "other pruning (label: top-10 overlap)")):
        ax.scatter([], [], color="grey", marker=marker, label=meaning)
    ax.set_xscale("log")
    ax.set_xlabel("rerank latency per query, ms (log)")
    ax.set_ylabel("pipeline nDCG@10 (SciFact test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
