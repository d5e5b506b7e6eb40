"""The `sieve` command: serve, ingest, search, manage collections, train."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_SERVER = os.environ.get("SIEVE_SERVER", "127.0.0.1:50051")


def _client(args):
    from .client import SieveClient

    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    return SieveClient(args.server, api_key=os.environ.get("SIEVE_API_KEY", ""), root_certificates=read(args.ca),
                       certificate_chain=read(args.cert), private_key=read(args.key))


def _settings(text: str | None) -> dict:
    if not text:
        return {}
    path = Path(text)
    try:
        return json.loads(path.read_text() if path.is_file() else text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--settings is neither a JSON object nor a JSON file: {error}")


def cmd_serve(args) -> int:
    from .config import ServerConfig, StartupError
    from .logs import setup_logging
    from .server import serve

    try:
        config = ServerConfig.from_env(data=args.data, host=args.host, port=args.port, metrics_port=args.metrics_port)
    except ValueError as error:
        raise SystemExit(f"sieve serve: {error}")
    setup_logging(config.log_format)
    try:
        asyncio.run(serve(config))
    except StartupError as error:
        raise SystemExit(f"sieve serve: {error}") from None
    return 0


def _batches(path: Path, size: int, problems: list):
    """Batches of valid documents; a repeated id starts a new batch so the later line wins."""
    from sieve.index.documents import BadLine, read_jsonl

    batch: dict[str, object] = {}
    for item in read_jsonl(path):
        if isinstance(item, BadLine):
            problems.append(str(item))
            continue
        if item.id in batch or len(batch) >= size:
            yield list(batch.values())
            batch = {}
        batch[item.id] = item
    if batch:
        yield list(batch.values())


def cmd_ingest(args) -> int:
    import grpc
    from tqdm import tqdm

    from sieve.index.documents import corpus_file

    try:
        path = corpus_file(args.path)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with open(path, "rb") as f:
        total_lines = sum(1 for line in f if line.strip())
    problems: list[str] = []
    upserted = pruned = 0
    with _client(args) as client:
        if args.queue:
            from .queue import publish

            published = publish(args.queue, args.collection, _batches(path, args.batch_size, problems),
                                progress=tqdm(total=total_lines, unit="doc", desc=f"queue {path.name}"))
            print(f"queued {published} documents from {path} for collection {args.collection!r}")
        else:
            names = {c.name for c in client.list_collections().collections}
            if args.collection not in names:
                client.create_collection(args.collection, _settings(args.settings))
                print(f"created collection {args.collection!r}", file=sys.stderr)
            sizes: list[int] = []

            def counted():
                for batch in _batches(path, args.batch_size, problems):
                    sizes.append(len(batch))
                    yield batch

            bar = tqdm(total=total_lines, unit="doc", desc=f"ingest {path.name}")
            try:
                for ack in client.upsert_stream(args.collection, counted()):
                    upserted += ack.upserted
                    pruned += ack.pruned
                    bar.update(ack.upserted + ack.pruned)
            except grpc.RpcError as error:
                bar.close()
                print(f"error: the server refused a batch ({error.code().name}): {error.details()}; "
                      f"{upserted + pruned} documents were committed before it", file=sys.stderr)
                return 1
            bar.close()
            print(f"ingested {upserted} documents into {args.collection!r}, pruned {pruned} by quality, "
                  f"skipped {len(problems)} malformed lines")
    for problem in problems[:20]:
        print(f"  skipped {problem}", file=sys.stderr)
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more", file=sys.stderr)
    return 1 if problems and args.strict else 0


def cmd_search(args) -> int:
    with _client(args) as client:
        fields = {"retrievers": args.retrievers.split(",") if args.retrievers else [], "fusion": args.fusion or ""}
        response = client.search(args.collection, args.query, k=args.k, **fields)
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(response))
        return 0
    for rank, hit in enumerate(response.results, start=1):
        snippet = " ".join(f"{hit.title} {hit.text}".split())[:160]
        print(f"{rank:>3}. {hit.id}  {hit.score:.4f}  {snippet}")
    return 0


def cmd_collections(args) -> int:
    from google.protobuf import json_format

    with _client(args) as client:
        if args.action == "list":
            for info in client.list_collections().collections:
                print(f"{info.name}\t{info.stats.documents} documents\t{info.stats.bytes_on_disk} bytes")
            return 0
        if not args.name:
            raise SystemExit(f"'sieve collections {args.action}' needs a collection name")
        if args.action == "create":
            info = client.create_collection(args.name, _settings(args.settings))
        elif args.action == "describe":
            info = client.describe(args.name)
        elif args.action == "compact":
            info = client.compact(args.name)
        elif args.action == "repair":
            report = client.repair(args.name)
            print(f"repaired {args.name!r}: generation {report.collection.stats.generation}, "
                  f"{report.collection.stats.documents} documents served; {len(report.restored_segments)} segment(s) "
                  f"restored, {report.salvaged_documents} document(s) salvaged, {report.lost_documents} lost")
            for path in report.quarantined:
                print(f"moved aside (never deleted): {path}")
            if report.note:
                print(f"note: {report.note}")
            return 0
        else:
            client.drop(args.name)
            print(f"dropped {args.name!r}")
            return 0
    print(json_format.MessageToJson(info))
    return 0


def cmd_delete(args) -> int:
    with _client(args) as client:
        response = client.delete(args.collection, args.ids)
    print(f"deleted {response.deleted}; not found: {', '.join(response.not_found) or 'none'}")
    return 0


def cmd_pruned(args) -> int:
    with _client(args) as client:
        if args.reinstate:
            response = client.reinstate(args.collection, args.reinstate)
            print(f"reinstated {response.upserted}")
        else:
            for passage in client.list_pruned(args.collection, args.limit).passages:
                print(f"{passage.id}\t{passage.quality:.4f}")
    return 0


def cmd_train(args) -> int:
    trainers = {
        "quality": ("sieve.index.quality", "train_quality"),
        "term-weights": ("sieve.index.term_weights", "train_term_weights"),
        "reranker": ("sieve.rankers.training", "train_reranker"),
    }
    import importlib

    module, function = trainers[args.part]
    train = getattr(importlib.import_module(module), function)
    train(args.data, args.out)
    return 0


def cmd_evaluate(args) -> int:
    """Measure the fused first stage against first stage + reranker on judged queries; record the verdict."""
    import time

    from tqdm import tqdm

    from sieve.index.beir import evaluate, load_judged_queries
    from sieve.index.collection import Collection
    from sieve.rankers import PruningOptions, fuse_with_first_stage, load_reranker

    from .reranking import record_evaluation

    collection = Collection.open(Path(args.data) / args.collection, read_only=True)
    queries, qrels = load_judged_queries(args.queries, args.split)
    reranker = load_reranker(collection.settings.reranker)
    options = PruningOptions(prune=not args.no_pruning)
    names = collection.settings.search_retrievers
    first_stage, reranked = {}, {}
    for qid, text in tqdm(queries.items(), desc=f"evaluate {args.collection}", unit="query"):
        encoded = {name: collection.encode_queries(name, [text])[0] for name in names}
        hits = collection.search(encoded, max(args.candidates, 100)).hits
        first_stage[qid] = {h.id: h.score for h in hits}
        top = hits[:args.candidates]
        result = reranker.rerank(text, [h.document.content for h in top], 10, options)
        ranked = list(zip(result.order, result.scores))
        if getattr(reranker, "fusion_weight", None) is not None:  # as the server ranks them
            ranked = fuse_with_first_stage(result, [h.score for h in top], reranker.fusion_weight)
        reranked[qid] = {top[i].id: 1000.0 + s for i, s in ranked}
        reranked[qid].update({h.id: h.score for h in hits[args.candidates:]})  # below every reranked one
    before, after = evaluate(first_stage, qrels), evaluate(reranked, qrels)
    figures = {"queries": len(queries), "split": args.split, "candidates": args.candidates,
               "first_stage_ndcg@10": before["nDCG@10"], "reranked_ndcg@10": after["nDCG@10"],
               "pruning": not args.no_pruning, "measured_at": time.strftime("%Y-%m-%d")}
    record_evaluation(collection.directory, figures)
    verdict = "ON" if after["nDCG@10"] > before["nDCG@10"] else "OFF"
    print(f"first stage nDCG@10 {before['nDCG@10']:.4f}, reranked {after['nDCG@10']:.4f}: "
          f"reranking is {verdict} by default for {args.collection!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sieve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def client_command(name, help_text):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--server", default=DEFAULT_SERVER, help="host:port of a running server")
        sub.add_argument("--ca", help="PEM root certificate: connect with TLS")
        sub.add_argument("--cert", help="PEM client certificate (mutual TLS)")
        sub.add_argument("--key", help="PEM client key (mutual TLS)")
        return sub

    serve = commands.add_parser("serve", help="run the gRPC server (settings from SIEVE_* variables)")
    serve.add_argument("--data", help="data directory (SIEVE_DATA, default ./sieve-data)")
    serve.add_argument("--host", help="listen address (SIEVE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (SIEVE_PORT, default 50051)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (SIEVE_METRICS_PORT, default off)")
    serve.set_defaults(run=cmd_serve)

    ingest = client_command("ingest", "ingest a JSONL file or a BEIR folder")
    ingest.add_argument("path")
    ingest.add_argument("--collection", default="default")
    ingest.add_argument("--batch-size", type=int, default=64)
    ingest.add_argument("--settings", help="settings (JSON or a JSON file) if the collection is created")
    ingest.add_argument("--queue", help="redis://... : publish to the ingestion stream instead")
    ingest.add_argument("--strict", action="store_true", help="exit 1 if any line was skipped")
    ingest.set_defaults(run=cmd_ingest)

    search = client_command("search", "search a collection")
    search.add_argument("query")
    search.add_argument("--collection", default="default")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--retrievers", help="comma-separated: dense,bm25,impact,multivector")
    search.add_argument("--fusion", choices=["rrf", "weighted"])
    search.add_argument("--json", action="store_true")
    search.set_defaults(run=cmd_search)

    collections = client_command("collections", "list, create, describe, compact, repair or drop collections")
    collections.add_argument("action", choices=["list", "create", "describe", "compact", "repair", "drop"])
    collections.add_argument("name", nargs="?")
    collections.add_argument("--settings", help="settings for create (JSON or a JSON file)")
    collections.set_defaults(run=cmd_collections)

    delete = client_command("delete", "delete documents by id")
    delete.add_argument("ids", nargs="+")
    delete.add_argument("--collection", default="default")
    delete.set_defaults(run=cmd_delete)

    pruned = client_command("pruned", "list passages dropped by quality pruning, or reinstate them")
    pruned.add_argument("--collection", default="default")
    pruned.add_argument("--limit", type=int, default=0)
    pruned.add_argument("--reinstate", nargs="+", metavar="ID")
    pruned.set_defaults(run=cmd_pruned)

    train = commands.add_parser("train", help="train a shipped artifact from a BEIR folder's train split")
    train.add_argument("part", choices=["quality", "term-weights", "reranker"])
    train.add_argument("--data", required=True, help="BEIR folder with qrels/train.tsv")
    train.add_argument("--out", required=True, help="output folder for the artifact")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("evaluate", help="measure reranking on judged queries; sets the default")
    evaluate.add_argument("--data", default=os.environ.get("SIEVE_DATA", "./sieve-data"), help="data directory")
    evaluate.add_argument("--collection", required=True)
    evaluate.add_argument("--queries", required=True, help="BEIR folder with queries.jsonl and qrels/")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--candidates", type=int, default=50)
    evaluate.add_argument("--no-pruning", action="store_true")
    evaluate.set_defaults(run=cmd_evaluate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # grpc errors: say what the server said, no traceback
        import grpc

        if isinstance(error, grpc.RpcError):
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
