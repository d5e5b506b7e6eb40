"""Reranking benchmark: the fused first stage, the reranker with and without early pruning, the peer.

Every setting reranks the same candidates: RRF(BM25, MiniLM dense) top-20 / top-50 / top-100 on
SciFact test. Settings of one depth run interleaved query by query, so load from other processes
on this shared machine hits them alike and the ratios stay fair. The peer is
sentence_transformers.CrossEncoder.predict over the same BERT weights (latency only: its linear
head is not ours). Zero-shot: Cranfield, CISI, Medline top-20, reranked pipeline vs first stage.

    python -m bench.rerank --threads 2            # writes bench/results/rerank.{json,md,png}
    python -m bench.rerank --exit-heads scifact:300:60,cranfield:100,cisi:76,medline:30   # rerank_exit_heads.*
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

from sieve.rankers import NO_PRUNING, PruningOptions, fuse_with_first_stage, load_reranker
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
        for name, setting in settings.items():  # options for `reranker`, or (another reranker, options)
            model, options = setting if isinstance(setting, tuple) else (reranker, setting)
            started = time.perf_counter()
            result = model.rerank(queries[q], passages, 10, options)
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
    parser.add_argument("--exit-heads", default="", metavar="DATASET:QUERIES,...",
                        help="only the label-free exit heads section, on these datasets and test query counts, "
                             "a third number for top-100 queries with the pre-ranker (e.g. scifact:300:60,"
                             "cranfield:100,cisi:76,medline:30); writes rerank_exit_heads.*")
    parser.add_argument("--exit-heads-depth", type=int, default=30, help="candidates per query there")
    parser.add_argument("--pseudo-queries", type=int, default=200, help="pseudo-queries the heads train on")
    parser.add_argument("--gate-queries", type=int, default=60, help="pseudo-queries of the label-free gate")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.exit_heads:
        args.out.mkdir(parents=True, exist_ok=True)
        return exit_heads_report(args.exit_heads, args.exit_heads_depth, args.pseudo_queries, args.gate_queries,
                                 args.out)
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


# Label-free exit heads --------------------------------------------------------------------------------------
def exit_heads_section(name: str, limit: int, deep_limit: int, depth: int, pseudo: int, gate_queries: int) -> dict:
    """Sieve's reranker as "any cross-encoder": its early heads dropped, new ones trained label-free (with a
    distilled pre-ranker) on the collection's own pseudo-queries and first stage, against its deep-supervised
    heads, on the same test candidates. Timed (rerank_depth: interleaved per query): the unpruned model and
    each head set's calibrated default, at `depth` on `limit` queries and, for `deep_limit` queries, at top
    100 with the pre-ranker. Simulated (calibration's cost model, each head set's own calibrated margins,
    scored on the test queries): the fastest setting of each at equal top-10 agreement. And the gates: the
    judged-query decision (reranked pipeline beats the first stage) against a label-free one (pseudo-queries,
    their source passage as the one relevant)."""
    from sieve.index.documents import Document
    from sieve.rankers.calibration import pruning_frontier, scaled_candidates
    from sieve.rankers.exit_heads import heads_size, layer_scores, observe, pseudo_queries, save_heads, train_exit_heads
    from sieve.rankers.pre_ranker import PreRankedReranker
    from sieve.rankers.reranker import open_reranker, with_exit_heads

    corpus, queries, qrels, qids, candidates, _ = first_stage_run(name, max(depth, 100 if deep_limit else 0))
    stage = FirstStage(corpus, cache=cache_dir("reranker") / f"{name}_first_stage")
    made = pseudo_queries([Document(d, corpus[d]["text"], corpus[d]["title"]) for d in corpus], pseudo + gate_queries)
    train_queries, gate = made[:pseudo], made[pseudo:]

    def requests(pairs):
        found = stage.search([q for q, _ in pairs], depth)
        return [(q, [passage_text(corpus[d]) for d in c.ids[:depth]]) for (q, _), c in zip(pairs, found)], found

    deep = load_reranker("")
    started = time.perf_counter()
    fresh = open_reranker("")
    config, pre = train_exit_heads(fresh, requests(train_queries)[0], pre_ranker=True)
    seconds = time.perf_counter() - started
    folder = Path(tempfile.mkdtemp(prefix="exit-heads-")) / "exit_heads"
    save_heads(fresh.model, folder, {"reranker": "", **config}, pre)
    loaded = with_exit_heads(open_reranker(""), folder)
    label_free = loaded.main if isinstance(loaded, PreRankedReranker) else loaded
    cut = config["pre_ranker"]["chosen"] or next(o for o in config["pre_ranker"]["options"] if o["recall"] == "0.995")
    cascade = PreRankedReranker(label_free, pre, cut["margin"])
    print(name, "label-free heads", config["pruning"], "pre-ranker", cut, f"{seconds:.0f} s", flush=True)

    settings = {"full (no pruning)": NO_PRUNING, "deep-supervised default": PruningOptions(),
                "label-free default": (label_free, PruningOptions()),
                "label-free + pre-ranker": (cascade, PruningOptions())}
    weight = deep.fusion_weight
    section = {"queries": min(limit, len(qids)), "depth": depth,
               f"top{depth}": rerank_depth(deep, settings, None, corpus, queries, qrels, qids, candidates, depth,
                                           limit, weight, 0)}
    if deep_limit:
        section["top100"] = rerank_depth(deep, settings, None, corpus, queries, qrels, qids, candidates, 100,
                                         deep_limit, weight, 0)

    scores = {"deep": [], "label_free": []}
    layers = tuple(range(1, deep.num_layers))
    for q, cands in tqdm(list(zip(qids, candidates))[:limit], desc=f"{name} layer scores", mininterval=10):
        passages = [passage_text(corpus[d]) for d in cands.ids[:depth]]
        seen = observe(deep.model, deep.tokenizer, [(queries[q], passages)], layers, deep.max_length, deep.dtype)
        scores["deep"] += layer_scores(deep.model, seen)
        scores["label_free"] += layer_scores(label_free.model, seen)
    deep_config = json.loads((ARTIFACT / "config.json").read_text())
    frontiers = {"deep": pruning_frontier(scores["deep"], deep_config["margins_by_recall"]),
                 "label_free": pruning_frontier(scores["label_free"], config["margins_by_recall"],
                                                candidates=scaled_candidates(deep.num_layers))}
    matched = {}
    for agreement in (0.95, 0.98, 0.99):
        best = {heads: max([s["speedup"] for s in frontier if s["top10_overlap"] >= agreement], default=1.0)
                for heads, frontier in frontiers.items()}
        matched[str(agreement)] = {**best, "ratio": round(best["label_free"] / best["deep"], 3)}

    block = section[f"top{depth}"]
    gate_requests, gate_found = requests(gate)
    source = {f"g{i}": {doc: 1} for i, (_, doc) in enumerate(gate)}
    pseudo_first, pseudo_reranked = {}, {}
    for i, ((text, passages), found) in enumerate(zip(gate_requests, gate_found)):
        ids, first = found.ids[:depth], found.rrf[:depth].tolist()
        result = label_free.rerank(text, passages, 10, PruningOptions())
        pseudo_first[f"g{i}"] = list(zip(ids, first))
        pseudo_reranked[f"g{i}"] = [(ids[j], s) for j, s in fuse_with_first_stage(result, first, weight)]
    judged = {"first_stage_ndcg10": block["first_stage_ndcg10_same_queries"],
              "reranked_ndcg10": block["settings"]["full (no pruning)"]["ndcg10_pipeline"]}
    free = {"queries": len(gate), "first_stage_ndcg10": ndcg(pseudo_first, source),
            "reranked_ndcg10": ndcg(pseudo_reranked, source)}
    for gate_figures in (judged, free):
        gate_figures["on"] = gate_figures["reranked_ndcg10"] > gate_figures["first_stage_ndcg10"]
    return {**section, "matched_agreement": matched, "frontiers": frontiers,
            "gates": {"judged": judged, "label_free": free, "agree": judged["on"] == free["on"]},
            "label_free_heads": {"training_seconds": round(seconds, 1), "bytes": heads_size(folder),
                                 "default": config["pruning"], "pre_ranker": config["pre_ranker"],
                                 "pre_ranker_cut_used": cut, "training": config["training"]}}


def exit_heads_report(spec: str, depth: int, pseudo: int, gate_queries: int, out: Path) -> None:
    """spec: dataset:queries[:top-100 queries],..."""
    report = {"depth": depth, "pseudo_queries": pseudo, "threads": torch.get_num_threads(), "datasets": {}}
    for item in spec.split(","):
        name, limit, *deep = item.split(":")
        report["datasets"][name] = exit_heads_section(name, int(limit), int(deep[0]) if deep else 0, depth, pseudo,
                                                      gate_queries)
        print(name, json.dumps({k: v for k, v in report["datasets"][name].items() if k != "frontiers"}, indent=1),
              flush=True)
        (out / "rerank_exit_heads.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "rerank_exit_heads.md").write_text(exit_heads_markdown(report))
    exit_heads_plot(report, out / "rerank_exit_heads.png")
    print(exit_heads_markdown(report))


def exit_heads_markdown(report: dict) -> str:
    lines = [f"# Label-free exit heads and a distilled pre-ranker on Sieve's reranker ({report['threads']} threads)", "",
             "Timed, interleaved per query; nDCG@10 of the reranker alone and of the pipeline (fused with the "
             "first stage); overlap: top-10 agreement with the unpruned model.", "",
             "| dataset | candidates | queries | setting | nDCG@10 reranker | ratio to full | pipeline | top-10 overlap "
             "| ms/query | speedup | survivors |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, section in report["datasets"].items():
        for depth, block in section.items():
            if not depth.startswith("top"):
                continue
            for setting, row in block["settings"].items():
                lines.append(f"| {name} | {depth} | {block['queries']} | {setting} | {row['ndcg10_reranker']:.3f} | "
                             f"{row['ndcg_ratio']:.3f} | {row['ndcg10_pipeline']:.3f} | {row['top10_overlap']:.3f} | "
                             f"{row['ms_per_query']:.0f} | {row['speedup']:.2f} | {row['mean_survivors']} |")
    lines += ["", "Simulated speedup (rows run, heads at 3% of a layer) of the fastest calibrated setting at equal "
              f"top-10 agreement on the test queries (top {report['depth']}):", "",
              "| dataset | agreement >= | deep-supervised | label-free | label-free / deep |", "|---|---|---|---|---|"]
    for name, section in report["datasets"].items():
        for agreement, row in section["matched_agreement"].items():
            lines.append(f"| {name} | {agreement} | {row['deep']:.2f} | {row['label_free']:.2f} | {row['ratio']:.2f} |")
    lines += ["", "Training (heads and pre-ranker), and the gates (reranked pipeline vs first stage):", "",
              "| dataset | training s (pre-ranker s) | bytes | pre-ranker cut | judged gate (first / reranked) | "
              "label-free gate (first / reranked) | agree |", "|---|---|---|---|---|---|---|"]
    for name, section in report["datasets"].items():
        heads, gates = section["label_free_heads"], section["gates"]
        judged, free = gates["judged"], gates["label_free"]
        chosen = heads["pre_ranker"]["chosen"]
        cut = (f"margin {chosen['margin']:.2f} (held-out overlap {chosen['top10_overlap']})" if chosen else
               f"none calibrated; measured at recall 0.995, margin {heads['pre_ranker_cut_used']['margin']:.2f}")
        lines.append(f"| {name} | {heads['training_seconds']:.0f} ({heads['pre_ranker']['training']['seconds']:.0f}) | "
                     f"{heads['bytes']:,} | {cut} | {'on' if judged['on'] else 'off'} "
                     f"({judged['first_stage_ndcg10']:.3f} / {judged['reranked_ndcg10']:.3f}) | "
                     f"{'on' if free['on'] else 'off'} ({free['first_stage_ndcg10']:.3f} / {free['reranked_ndcg10']:.3f}) "
                     f"| {'yes' if gates['agree'] else 'no'} |")
    return "\n".join(lines) + "\n"


def exit_heads_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (timed, simulated) = plt.subplots(1, 2, figsize=(12, 5))
    markers = {"full (no pruning)": "o", "deep-supervised default": "s", "label-free default": "^",
               "label-free + pre-ranker": "D"}
    for (name, section), color in zip(report["datasets"].items(), ["tab:blue", "tab:orange", "tab:green", "tab:red"]):
        for depth, block in section.items():
            if depth.startswith("top"):
                for setting, row in block["settings"].items():
                    timed.scatter(row["ms_per_query"], row["ndcg10_reranker"], color=color, marker=markers[setting],
                                  facecolors="none" if depth == "top100" else color)
        for heads, style in (("deep", "-"), ("label_free", "--")):
            points = sorted((s["speedup"], s["top10_overlap"]) for s in section["frontiers"][heads])
            simulated.plot([p[0] for p in points], [p[1] for p in points], style, color=color,
                           label=f"{name} {heads.replace('_', '-')}")
        timed.scatter([], [], color=color, label=name)
    for setting, marker in markers.items():
        timed.scatter([], [], color="grey", marker=marker, label=setting)
    timed.set_xscale("log")
    timed.set_xlabel("rerank ms per query (log; hollow: top 100)")
    timed.set_ylabel("nDCG@10, reranker alone")
    timed.legend(fontsize=7)
    simulated.set_xlabel("simulated speedup over the unpruned model")
    simulated.set_ylabel("top-10 agreement with the unpruned model (test queries)")
    simulated.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
