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
    from .startup import check_port_free, writer_lock

    try:
        config = ServerConfig.from_env(data=args.data, host=args.host, port=args.port, metrics_port=args.metrics_port)
    except ValueError as error:
        raise SystemExit(f"sieve serve: {error}")
    setup_logging(config.log_format)
    try:
        with writer_lock(config):  # held until the server has drained
            check_port_free(config.host, config.port, "SIEVE_PORT")
            check_port_free(config.host, config.metrics_port, "SIEVE_METRICS_PORT")
            asyncio.run(serve(config))
    except StartupError as error:
        raise SystemExit(f"sieve serve: {error}") from None
    return 0


def _create_if_missing(client, args) -> None:
    import grpc

    try:  # one name's existence, not every collection's statistics
        client.create_collection(args.collection, _settings(args.settings))
        print(f"created collection {args.collection!r}", file=sys.stderr)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise


def cmd_ingest_ray(args) -> int:
    """The corpus encoded on a Ray cluster, staged, then committed by the server in one generation."""
    from sieve.index.errors import SieveError

    from .ray_ingest import ingest_with_ray

    with _client(args) as client:
        _create_if_missing(client, args)
        try:
            report = ingest_with_ray(args.path, args.collection, client, staging=args.staging or os.environ.get("SIEVE_STAGING", ""),
                                     address=None if args.ray == "local" else args.ray, batch_size=args.batch_size,
                                     workers=args.workers, job_id=args.job_id or "", resume=args.resume)
        except SieveError as error:
            partly = "committed their part" in str(error)  # a router's shards commit independently
            print(f"error: {error}{'' if partly else '; nothing was committed'}", file=sys.stderr)
            return 1
    committed = report.committed
    print(f"ingested {committed.upserted if committed else 0} documents into {args.collection!r} in one commit "
          f"({len(report.segments)} segments), pruned {report.pruned} by quality, skipped {len(report.skipped)} "
          f"malformed lines; {report.lines} lines in {report.wall_seconds:.1f} s"
          + (f"; {report.resumed} segments kept from the interrupted run" if report.resumed else ""))
    for problem in report.skipped[:20]:
        print(f"  skipped {problem}", file=sys.stderr)
    return 1 if report.skipped and args.strict else 0


def cmd_ingest(args) -> int:
    from collections import deque

    import grpc
    from tqdm import tqdm

    from sieve.index.documents import batches, corpus_file, read_jsonl

    if args.ray is not None:
        return cmd_ingest_ray(args)
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
        if not args.queue:
            _create_if_missing(client, args)
        # The bar counts lines read, so that skipped lines move it too and it ends at 100%.
        bar = tqdm(total=total_lines, unit="line", desc=f"{'queue' if args.queue else 'ingest'} {path.name}")

        def show(lines_read: int, **counts) -> None:
            bar.set_postfix(**counts, skipped=len(problems), refresh=False)
            bar.update(lines_read - bar.n)

        if args.queue:
            from .queue import publish

            def published_batches():
                for batch, lines_read in batches(read_jsonl(path), args.batch_size, problems):
                    yield batch
                    show(lines_read)  # publish asks for the next batch once this one is on the stream

            published = publish(args.queue, args.collection, published_batches())
            show(total_lines)
            bar.close()
            print(f"queued {published} documents from {path} for collection {args.collection!r}, "
                  f"skipped {len(problems)} malformed lines")
        else:
            lines_sent: deque[int] = deque()  # lines read up to the end of each batch sent, in order

            def sent_batches():
                for batch, lines_read in batches(read_jsonl(path), args.batch_size, problems):
                    lines_sent.append(lines_read)
                    yield batch

            try:
                for ack in client.upsert_stream(args.collection, sent_batches()):
                    upserted += ack.upserted
                    pruned += ack.pruned
                    show(lines_sent.popleft(), ingested=upserted, pruned=pruned)
            except grpc.RpcError as error:
                bar.close()
                print(f"error: the server refused a batch ({error.code().name}): {error.details()}; "
                      f"{upserted + pruned} documents were committed before it", file=sys.stderr)
                return 1
            show(total_lines, ingested=upserted, pruned=pruned)  # lines after the last batch were all skipped
            bar.close()
            print(f"ingested {upserted} documents into {args.collection!r}, pruned {pruned} by quality, "
                  f"skipped {len(problems)} malformed lines")
    for problem in problems[:20]:
        print(f"  skipped {problem}", file=sys.stderr)
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more", file=sys.stderr)
    return 1 if problems and args.strict else 0


def cmd_search(args) -> int:
    from .client import search_options

    try:
        spec = json.loads(args.filter) if args.filter else None
        options = search_options(args.retrievers.split(",") if args.retrievers else [], args.fusion or "",
                                 args.rerank, spec)
    except ValueError as error:
        raise SystemExit(f"--filter is not a filter: {error}") from None
    with _client(args) as client:
        response = client.search(args.collection, args.query, k=args.k, **options)
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(response))
        return 0
    for rank, hit in enumerate(response.results, start=1):
        snippet = " ".join(f"{hit.title} {hit.text}".split())[:160]
        print(f"{rank:>3}. {hit.id}  {hit.score:.4f}  {snippet}")
    return 0


def collection_dict(info) -> dict:
    """A CollectionInfo as plain JSON values; int64 counts stay integers (MessageToDict makes them strings)."""
    from google.protobuf import json_format

    from .client import struct_dict

    stats = {field.name: getattr(info.stats, field.name) for field in info.stats.DESCRIPTOR.fields
             if field.name != "details"}
    return {"name": info.name,
            "health": json_format.MessageToDict(info.health, always_print_fields_with_no_presence=True,
                                                 preserving_proto_field_name=True),
            "stats": stats,
            "details": struct_dict(info.stats.details),
            "settings": struct_dict(info.settings)}


def _rows(values: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested values as (dotted key, text) rows, keys sorted; scalars as JSON writes them, bare strings bare."""
    rows = []
    for key, value in sorted(values.items()):
        if isinstance(value, dict) and value:
            rows += _rows(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value:
            rows.append((prefix + key, ", ".join(map(str, value))))
        else:
            rows.append((prefix + key, value if isinstance(value, str) and value else json.dumps(value)))
    return rows


def collection_table(info: dict) -> str:
    header = [("name", info["name"]), ("state", info["health"]["state"] or "ok"),
              *((key, str(value)) for key, value in info["stats"].items()),
              *(("problem", problem) for problem in info["health"]["problems"])]
    blocks = []
    for rows in (header, _rows({"details": info["details"]}), _rows({"settings": info["settings"]})):
        width = max((len(key) for key, _ in rows), default=0)
        blocks.append("\n".join(f"{key:<{width}}  {text}" for key, text in rows))
    return "\n\n".join(blocks)


def cmd_collections(args) -> int:
    with _client(args) as client:
        if args.action == "list":
            infos = [collection_dict(info) for info in client.list_collections().collections]
            if args.json:
                print(json.dumps(infos, indent=2))
                return 0
            width = max([len("name"), *(len(info["name"]) for info in infos)])
            print(f"{'name':<{width}}  {'state':<14}  {'documents':>10}  {'bytes on disk':>14}")
            for info in infos:
                print(f"{info['name']:<{width}}  {info['health']['state'] or 'ok':<14}  "
                      f"{info['stats']['documents']:>10}  {info['stats']['bytes_on_disk']:>14}")
            return 0
        if not args.name:
            raise SystemExit(f"'sieve collections {args.action}' needs a collection name")
        if args.action == "create":
            info = client.create_collection(args.name, _settings(args.settings))
        elif args.action == "describe":
            info = client.describe(args.name)
        elif args.action == "compact":
            info = client.compact(args.name)
        elif args.action == "snapshot":
            snapshot = client.snapshot(args.name, args.to or "")
            print(f"snapshot of {args.name!r} at generation {snapshot.generation}: {snapshot.path} "
                  f"({snapshot.bytes} bytes, in the data directory){f', copied to {snapshot.url}' if snapshot.url else ''}")
            return 0
        elif args.action == "restore":
            if not args.snapshot:
                raise SystemExit("'sieve collections restore NAME' needs --from <the snapshot path>")
            info = client.restore(args.snapshot, args.name)
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
    described = collection_dict(info)
    print(json.dumps(described, indent=2) if args.json else collection_table(described))
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
    if args.part == "exit-heads":
        return train_exit_heads(args)
    if not args.data or not args.out:
        raise SystemExit(f"sieve train {args.part}: --data (a BEIR folder) and --out are required")
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


def train_exit_heads(args) -> int:
    """Label-free early-exit heads for a collection's reranker, through the engine (read-only: the heads are a
    side record beside the index, like `evaluate`'s); a running server picks them up at its next rerank."""
    from .config import ServerConfig
    from .sync_engine import SyncEngine

    if not args.collection:
        raise SystemExit("sieve train exit-heads: --collection is required")
    with SyncEngine(ServerConfig(data=args.data or os.environ.get("SIEVE_DATA", "./sieve-data"), read_only=True)) as engine:
        config = engine.train_exit_heads(args.collection, args.reranker, args.pseudo_queries, args.depth,
                                         pre_ranker=args.pre_ranker)
    chosen, training = config["pruning"], config["training"]
    print(f"exit heads for {args.collection!r} ({config['reranker'] or 'shipped reranker'}): layers "
          f"{config['early_layers']}, default checkpoints {chosen['checkpoints']} (held-out top-10 agreement "
          f"{chosen.get('top10_overlap', 1.0)}, simulated speedup {chosen['speedup']}x); "
          f"{training['pseudo_queries']} pseudo-queries x {config['depth']} candidates, "
          f"{training['observe_seconds'] + training['fit_seconds']:.0f} s")
    if "pre_ranker" in config:
        cut = config["pre_ranker"]["chosen"]
        print(f"pre-ranker ({config['pre_ranker']['training']['seconds']:.0f} s): " + (
            f"margin {cut['margin']:.3f}, held-out top-10 agreement {cut['top10_overlap']}, simulated speedup "
            f"{cut['speedup']}x" if cut else "no cut keeps the agreement target and pays; not used"))
    return 0


def cmd_evaluate(args) -> int:
    """Measure the fused first stage against first stage + reranker on judged queries, through the engine
    (so exactly as the server ranks them); record the verdict."""
    import time

    from tqdm import tqdm

    from sieve.index.beir import evaluate, load_judged_queries

    from .config import ServerConfig
    from .engine import RerankOptions, SearchQuery
    from .sync_engine import SyncEngine

    queries, qrels = load_judged_queries(args.queries, args.split)
    first_stage, reranked = {}, {}
    without = RerankOptions(enabled=False)
    options = RerankOptions(prune=not args.no_pruning)
    with SyncEngine(ServerConfig(data=args.data, read_only=True)) as engine:
        engine.collection(args.collection)  # NOT_FOUND before any work
        for qid, text in tqdm(queries.items(), desc=f"evaluate {args.collection}", unit="query"):
            hits = engine.search(SearchQuery(args.collection, text, k=max(args.candidates, 100), rerank=without)).hits
            first_stage[qid] = {h.id: h.score for h in hits}
            top = hits[:args.candidates]
            ranked = engine.rerank(text, [h.document.content for h in top], 10, options, args.collection,
                                   first_stage=[h.score for h in top]).ranked
            reranked[qid] = {h.id: h.score for h in hits}  # below every reranked one
            reranked[qid].update({top[i].id: 1000.0 + s for i, s in ranked})
        before, after = evaluate(first_stage, qrels), evaluate(reranked, qrels)
        figures = {"queries": len(queries), "split": args.split, "candidates": args.candidates,
                   "first_stage_ndcg@10": before["nDCG@10"], "reranked_ndcg@10": after["nDCG@10"],
                   "pruning": not args.no_pruning, "measured_at": time.strftime("%Y-%m-%d")}
        engine.record_evaluation(args.collection, figures)
    verdict = "ON" if after["nDCG@10"] > before["nDCG@10"] else "OFF"
    print(f"first stage nDCG@10 {before['nDCG@10']:.4f}, reranked {after['nDCG@10']:.4f}: "
          f"reranking is {verdict} by default for {args.collection!r}")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help (not "None" or "False", which say nothing); examples kept as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


EXAMPLES = """examples:
  sieve serve                                             # 127.0.0.1:50051, data in ./sieve-data
  sieve ingest corpus.jsonl --collection notes            # creates the collection if missing
  sieve search "nocturnal birds" --collection notes -k 5
  sieve collections describe notes --json
"""


def _unreachable(error) -> bool:
    """UNAVAILABLE without the request id every answer of a Sieve server carries: nothing answered."""
    import grpc

    return error.code() == grpc.StatusCode.UNAVAILABLE and \
        not any(key == "x-request-id" for key, _ in error.trailing_metadata() or ())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sieve", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        return commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)

    def client_command(name, help_text, collection=True):
        sub = command(name, help_text)
        if collection:
            sub.add_argument("--collection", required=True, help="collection name")
        sub.add_argument("--server", default=DEFAULT_SERVER, help="host:port of a running server (SIEVE_SERVER)")
        sub.add_argument("--ca", help="PEM root certificate: connect with TLS")
        sub.add_argument("--cert", help="PEM client certificate (mutual TLS)")
        sub.add_argument("--key", help="PEM client key (mutual TLS)")
        return sub

    serve = command("serve", "run the gRPC server (further settings from SIEVE_* variables, see deploy/README.md)")
    serve.add_argument("--data", help="data directory (default: SIEVE_DATA, else ./sieve-data)")
    serve.add_argument("--host", help="listen address (default: SIEVE_HOST, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default: SIEVE_PORT, else 50051)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default: SIEVE_METRICS_PORT, else off)")
    serve.set_defaults(run=cmd_serve)

    ingest = client_command("ingest", "ingest a JSONL file or a BEIR folder")
    ingest.add_argument("path", help="JSONL file of {_id, title, text, metadata} lines, or a BEIR folder")
    ingest.add_argument("--batch-size", type=int, default=64, help="documents per batch (each committed atomically)")
    ingest.add_argument("--settings", help="settings (JSON or a JSON file) if the collection is created "
                                           "(default: the server's defaults)")
    ingest.add_argument("--queue", help="redis://... : publish to the ingestion stream instead")
    ingest.add_argument("--strict", action="store_true", help="exit 1 if any line was skipped")
    ingest.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="encode on a Ray cluster (its address, e.g. ray://head:10001 or auto; none: a local one) "
                             "and commit everything at once; PATH may be a folder, glob or fsspec URL of JSONL or "
                             "Parquet files (pip install 'sieve[ray]')")
    ingest.add_argument("--staging", help="--ray: folder or URL for the prebuilt segments, which the workers write "
                                           "and the server reads (under its SIEVE_IMPORT_ROOTS) (default: SIEVE_STAGING)")
    ingest.add_argument("--workers", type=int, default=0, help="--ray: encoder actors (0: one per GPU, else per CPU)")
    ingest.add_argument("--job-id", help="--ray: names the job; running it again replaces what an interrupted run "
                                         "staged (default: from the collection and PATH)")
    ingest.add_argument("--resume", action="store_true", help="--ray: keep what an interrupted run of this job staged "
                                                              "from unchanged batches; encode only the rest")
    ingest.set_defaults(run=cmd_ingest)

    search = client_command("search", "search a collection")
    search.add_argument("query", help="the query text")
    search.add_argument("-k", type=int, default=10, help="results to return")
    search.add_argument("--retrievers", help="comma-separated: dense,bm25,impact,multivector "
                                             "(default: the collection's)")
    search.add_argument("--fusion", choices=["rrf", "weighted"], help="how retrievers are fused "
                                                                      "(default: the collection's)")
    search.add_argument("--rerank", action=argparse.BooleanOptionalAction,
                        help="rerank with the cross-encoder (default: the collection's)")
    search.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"must": [{"field": "tenant", "match": '
                                         '"acme"}]}\' (fields the collection declares filterable)')
    search.add_argument("--json", action="store_true", help="print the whole response as JSON")
    search.set_defaults(run=cmd_search)

    collections = client_command("collections", "list, create, describe, compact, repair, snapshot, restore or "
                                 "drop collections", collection=False)
    collections.add_argument("action", choices=["list", "create", "describe", "compact", "repair", "snapshot",
                                                "restore", "drop"], help="what to do")
    collections.add_argument("name", nargs="?", help="collection name (all but list)")
    collections.add_argument("--settings", help="settings for create (JSON or a JSON file) "
                                                "(default: the server's defaults)")
    collections.add_argument("--json", action="store_true", help="print JSON instead of a table")
    collections.add_argument("--from", dest="snapshot", help="restore: the snapshot path `snapshot` printed, "
                             "or the URL it was copied to")
    collections.add_argument("--to", help="snapshot: also copy it to this fsspec URL (under the server's "
                             "SIEVE_SNAPSHOT_TARGETS)")
    collections.set_defaults(run=cmd_collections)

    delete = client_command("delete", "delete documents by id")
    delete.add_argument("ids", nargs="+", help="external document ids")
    delete.set_defaults(run=cmd_delete)

    pruned = client_command("pruned", "list passages dropped by quality pruning, or reinstate them")
    pruned.add_argument("--limit", type=int, default=0, help="passages to list, lowest quality first (0: all)")
    pruned.add_argument("--reinstate", nargs="+", metavar="ID", help="index these pruned passages after all")
    pruned.set_defaults(run=cmd_pruned)

    train = command("train", "train a shipped artifact from a BEIR folder's train split, or a collection's "
                             "exit heads without labels")
    train.add_argument("part", choices=["quality", "term-weights", "reranker", "exit-heads"], help="which artifact")
    train.add_argument("--data", help="BEIR folder with qrels/train.tsv; for exit-heads the data directory "
                                      "(default: SIEVE_DATA, else ./sieve-data)")
    train.add_argument("--out", help="output folder for the artifact (not for exit-heads: stored with the collection)")
    train.add_argument("--collection", help="exit-heads: the collection whose passages and first stage train them")
    train.add_argument("--reranker", help="exit-heads: the collection's reranker (checked; default: its setting)")
    train.add_argument("--pseudo-queries", type=int, default=200, help="exit-heads: pseudo-queries made from passages")
    train.add_argument("--depth", type=int, help="exit-heads: first-stage candidates per pseudo-query (default: the "
                       "collection's rerank_candidates)")
    train.add_argument("--pre-ranker", action="store_true",
                       help="exit-heads: also distil a SPLADE-tiny pre-ranker that cuts candidates before the reranker")
    train.set_defaults(run=cmd_train)

    evaluate = command("evaluate", "measure reranking on judged queries; sets the collection's default")
    evaluate.add_argument("--data", default=os.environ.get("SIEVE_DATA", "./sieve-data"),
                          help="data directory (SIEVE_DATA)")
    evaluate.add_argument("--collection", required=True, help="collection name")
    evaluate.add_argument("--queries", required=True, help="BEIR folder with queries.jsonl and qrels/")
    evaluate.add_argument("--split", default="test", help="qrels split")
    evaluate.add_argument("--candidates", type=int, default=50, help="first-stage candidates reranked")
    evaluate.add_argument("--no-pruning", action="store_true", help="run every layer on every candidate")
    evaluate.set_defaults(run=cmd_evaluate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # faiss logs its CPU-feature probing ("Could not load library with AVX2 support") at every start
    logging.getLogger("faiss.loader").setLevel(logging.ERROR)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # grpc errors: say what the server said, no traceback
        import grpc

        if isinstance(error, grpc.RpcError) and _unreachable(error):
            print(f"error: no Sieve server answered at {args.server} ({error.details()})\n"
                  f"hint: start one with `sieve serve` (or `./run serve` in a checkout), "
                  f"or name a running one with --server HOST:PORT or SIEVE_SERVER", file=sys.stderr)
            return 1
        if isinstance(error, grpc.RpcError):
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
