"""`snaprag`: run the server, and talk to one.

    snaprag serve                      serve the embedded knowledge bases (what `make run` does)
    snaprag ask "question"             stream a spoken answer
    snaprag converse "question"        the same question as ASR partials over the Converse stream
    snaprag plan --robot fl-004 --fault E202 --loaded
    snaprag retrieve "question" -k 5
    snaprag health                     the grpc.health.v1 status
    snaprag config                     the effective configuration, every knob and its value
    snaprag index build --corpus FILE.jsonl --out DIR     write an index snapshot
    snaprag index verify DIR                              check a snapshot's manifest and checksums
    snaprag index upsert FILE.jsonl | delete ID...        live writes through IndexAdmin ([admin] enabled)
    snaprag index snapshot [--swap] | swap [VERSION] | rollback | stats     gated blue/green snapshots
    snaprag eval --corpus C --queries Q --qrels R         retrieval quality on a BEIR-layout collection
    snaprag eval --kb voice --split dev                   ...or on a knowledge base's golden questions
    snaprag train-reranker --out build/models/reranker-kb train, export and gate the cross-encoder
    snaprag train-lora --base build/models/smollm2-135m-instruct --out build/models/lora-voice
                                       train a LoRA adapter on grounded KB answers (card: DEV grounded rates)
    snaprag voice                      voice front end: KB questions as ASR partials, answers spoken as they come
    snaprag robot --rate 20            robot controller: Plans at a fixed rate, each validated
    snaprag bench                      load + SLO verdict against a server it starts (what `make bench` runs)
    snaprag bench-overload             3x measured capacity, admission on vs off (make bench-overload)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_TARGET = "127.0.0.1:50051"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snaprag", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gRPC server on the embedded knowledge bases")
    s.add_argument("--config", help="TOML config file (default: snaprag.toml at the repo root)")
    s.add_argument("--host", help="bind address (server.host)")
    s.add_argument("--port", type=int, help="port, 0 = any free one (server.port)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set profiles.robot.total_ms=120 (repeatable)")

    c = sub.add_parser("config", help="print the effective configuration as JSON")
    c.add_argument("--config")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")

    def client(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
        p.add_argument("--timeout", type=float, default=5.0, help="call deadline in seconds (default 5)")
        p.add_argument("--json", action="store_true", help="print the raw response as JSON")

    a = sub.add_parser("ask", help="ask a question; prints the answer sentence by sentence")
    a.add_argument("query")
    a.add_argument("--profile", default="")
    a.add_argument("--intent", action="append", default=[], help="pre-filter on intent (repeatable)")
    a.add_argument("--domain", action="append", default=[], help="pre-filter on domain (repeatable)")
    client(a)

    v = sub.add_parser("converse", help="send a question as ASR partials (word by word), then the final")
    v.add_argument("query")
    v.add_argument("--word-ms", type=float, default=150.0, help="delay between partials (default 150 ms)")
    client(v)

    p = sub.add_parser("plan", help="ask for a robot recovery / task plan")
    p.add_argument("--robot", required=True, help="robot id, e.g. amr-017, fl-004, pk-002")
    p.add_argument("--fault", default="", help="fault code, e.g. E202")
    p.add_argument("--task", default="")
    p.add_argument("--state", default="")
    p.add_argument("--location", default="")
    p.add_argument("--loaded", action="store_true", help="the robot is carrying a load")
    p.add_argument("--battery", type=float, help="battery state of charge, percent")
    p.add_argument("--profile", default="")
    client(p)

    r = sub.add_parser("retrieve", help="hybrid retrieval only")
    r.add_argument("query")
    r.add_argument("-k", type=int, default=0, help="passages to return (1..100; default: the profile's)")
    r.add_argument("--intent", action="append", default=[])
    r.add_argument("--domain", action="append", default=[])
    r.add_argument("--locale", action="append", default=[])
    client(r)

    h = sub.add_parser("health", help="grpc.health.v1 status of the server")
    client(h)

    ix = sub.add_parser("index", help="build or verify snapshots; live upserts, deletes, gated swaps (IndexAdmin)",
                        description="Offline: build, verify. Against a server with [admin] enabled: upsert, delete, "
                                    "snapshot, swap, rollback, stats (README, 'Index lifecycle').")
    ixs = ix.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = ixs.add_parser("build", help="index a corpus into a snapshot directory (BM25 + dense + HNSW)")
    b.add_argument("--corpus", required=True, type=Path,
                   help="JSONL passages: our schema (data/README.md) or a BEIR corpus.jsonl (_id, title, text)")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="snapshot directory to create")
    where.add_argument("--root", type=Path, help="a live index folder ([index] root): build its next version there "
                                                 "(promote it with `snaprag index swap`; the first one is served "
                                                 "directly)")
    b.add_argument("--no-dense", action="store_true", help="BM25 only (no encoder needed)")
    b.add_argument("--force", action="store_true", help="replace an existing snapshot at --out")
    b.add_argument("--config")
    b.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    vf = ixs.add_parser("verify", help="check a snapshot's manifest and every file's sha256")
    vf.add_argument("path", type=Path)
    from server.index.cli import add_commands as add_index_admin_commands

    add_index_admin_commands(ixs, DEFAULT_TARGET)

    ev = sub.add_parser("eval", help="retrieval quality: nDCG@10, MRR@10, Recall@100, Hit@5 per method")
    ev.add_argument("--corpus", type=Path, help="BEIR corpus.jsonl")
    ev.add_argument("--queries", type=Path, help="BEIR queries.jsonl")
    ev.add_argument("--qrels", type=Path, help="BEIR qrels TSV (with a header line)")
    ev.add_argument("--kb", choices=("voice", "warehouse", "all"), help="evaluate on our knowledge bases instead")
    ev.add_argument("--split", choices=("train", "dev"), default="dev", help="golden split with --kb (default dev)")
    ev.add_argument("--methods", default="bm25,dense,hybrid-rrf,hybrid-convex",
                    help="comma-separated: bm25, dense, hybrid-rrf, hybrid-convex, hybrid-rerank (the configured "
                         "fusion + the cross-encoder in rerank.model_dir; default: all but hybrid-rerank)")
    ev.add_argument("--limit", type=int, default=0, help="evaluate only the first N queries")
    ev.add_argument("--json", action="store_true", help="print the figures as JSON keyed by method")
    ev.add_argument("--config")
    ev.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")

    # Its options live in server/rerank/train.py (which imports torch); everything after the command,
    # --help included, is handed over unparsed (see `main`).
    sub.add_parser("train-reranker", add_help=False,
                   help="train the cross-encoder re-ranker, export ONNX FP32 + INT8, gate it on KB dev")
    # Same hand-over for train-lora (server/generate/train_lora.py imports torch and peft).
    sub.add_parser("train-lora", add_help=False,
                   help="train a LoRA adapter on grounded KB answers; card with DEV grounded-answer rates")
    # The simulators and the bench own their flags too (clients/voice_sim.py, clients/robot_sim.py,
    # bench/harness.py); `snaprag voice --help` shows them.
    sub.add_parser("voice", add_help=False,
                   help="voice front-end simulator: utterances as ASR partials over Converse, first-chunk times")
    sub.add_parser("robot", add_help=False,
                   help="robot-controller simulator: Plans at a fixed rate with a 150 ms deadline, validated")
    sub.add_parser("bench", add_help=False,
                   help="open-loop load, per-stage percentiles, plots and a pass/fail SLO verdict (exit 1 on a miss)")
    sub.add_parser("bench-overload", add_help=False,
                   help="3x the measured capacity, admission control on vs off: admitted within SLO, rest refused fast")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train-reranker":
        from server.rerank.train import main as train_main

        return train_main(rest)
    if args.command == "train-lora":
        from server.generate.train_lora import main as train_lora_main

        return train_lora_main(rest)
    if args.command in ("voice", "robot", "bench", "bench-overload"):
        if args.command == "voice":
            from clients.voice_sim import main as tool_main
        elif args.command == "robot":
            from clients.robot_sim import main as tool_main
        elif args.command == "bench-overload":
            from bench.overload import main as tool_main
        else:
            from bench.harness import main as tool_main
        return tool_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "index" and args.index_command not in ("build", "verify"):
        from server.index.cli import run as run_index_admin

        return run_index_admin(args)
    if args.command in ("index", "eval"):
        from server.offline import run_eval, run_index

        try:
            return run_index(args) if args.command == "index" else run_eval(args)
        except (ValueError, OSError) as e:  # SnapshotError, KnowledgeBaseError, EncoderError, ConfigError...
            print(f"snaprag {args.command}: {e}", file=sys.stderr)
            return 1
    if args.command in ("serve", "config"):
        from server.config import ConfigError, describe, load_config

        overrides = list(args.set)
        if args.command == "serve":
            if args.host:
                overrides.append(f"server.host={json.dumps(args.host)}")
            if args.port is not None:
                overrides.append(f"server.port={args.port}")
        try:
            cfg = load_config(args.config, overrides=overrides)
        except ConfigError as e:
            print(f"snaprag: config error: {e}", file=sys.stderr)
            return 2
        if args.command == "config":
            print(json.dumps(describe(cfg), indent=2))
            return 0
        from server.app import run_forever

        try:
            run_forever(cfg)
        except KeyboardInterrupt:
            pass
        except (OSError, ValueError) as e:
            print(f"snaprag: cannot start: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        return asyncio.run(_client_command(args))
    except KeyboardInterrupt:
        return 130


async def _client_command(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from clients.assistant import AssistantClient, session_start, transcript
    from server.proto import pb

    def dump(msg: Any) -> None:
        print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))

    async with AssistantClient(args.target, timeout_s=args.timeout, retries=0) as c:
        try:
            if args.command == "health":
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                resp = await health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(),
                                                                          timeout=args.timeout)
                print(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
                return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1
            if args.command == "plan":
                t0 = time.perf_counter()
                plan = await c.plan(args.robot, task=args.task, fault_code=args.fault, state=args.state,
                                    location=args.location, carrying_load=args.loaded, battery_pct=args.battery,
                                    profile=args.profile)
                wall = (time.perf_counter() - t0) * 1000
                if args.json:
                    dump(plan)
                else:
                    _print_plan(plan, wall, pb)
                return 0
            if args.command == "retrieve":
                filters = {k: v for k, v in (("intent", args.intent), ("domain", args.domain),
                                             ("locale", args.locale)) if v}
                resp = await c.retrieve(args.query, k=args.k, filters=filters)
                if args.json:
                    dump(resp)
                else:
                    for sp in resp.passages:
                        print(f"{sp.rank:>3}. {sp.score:7.3f}  {sp.passage.id:<36} {sp.passage.text[:90]}")
                    _print_timings(resp.timings, resp.total_ms)
                return 0
            if args.command == "ask":
                filters = {k: v for k, v in (("intent", args.intent), ("domain", args.domain)) if v}
                t0 = time.perf_counter()
                async for ev in c.ask_stream(args.query, profile=args.profile, filters=filters):
                    _print_event(ev, t0, pb, args.json, dump)
                return 0
            if args.command == "converse":
                final_at = [time.perf_counter()]  # reset when the final transcript goes out

                async def requests() -> Any:
                    yield session_start()
                    words = args.query.split()
                    for i in range(1, len(words)):
                        yield transcript(" ".join(words[:i]), is_final=False, sequence=i, stability=0.9)
                        await asyncio.sleep(args.word_ms / 1000)
                    final_at[0] = time.perf_counter()
                    yield transcript(args.query, is_final=True, sequence=len(words) + 1, stability=1.0)

                async for ev in c.converse(requests()):
                    _print_event(ev, final_at[0], pb, args.json, dump)
                return 0
        except grpc.aio.AioRpcError as e:
            print(f"snaprag: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 2


def _print_event(ev: Any, t0: float, pb: Any, as_json: bool, dump: Any) -> None:
    if as_json:
        dump(ev)
        return
    kind = ev.WhichOneof("event")
    ms = (time.perf_counter() - t0) * 1000
    if kind == "chunk":
        marks = "".join(f" [{m}]" for m in ev.chunk.citation_markers)
        print(f"[{ms:6.1f} ms] {ev.chunk.text}{marks}", flush=True)
    elif kind == "citations":
        for cit in ev.citations.citations:
            print(f"             [{cit.marker}] {cit.source} ({cit.passage_id})")
    elif kind == "final":
        f = ev.final
        print(f"mode={pb.ServingMode.Name(f.mode)} generator={f.generator} first_chunk={f.first_chunk_ms:.1f} ms "
              f"total={f.total_ms:.1f} ms{' early-retrieval' if f.early_retrieval_used else ''}"
              f"{' reason=' + repr(f.reason) if f.reason else ''}")
        _print_timings(f.timings, None)


def _print_timings(timings: Any, total_ms: float | None) -> None:
    from server.proto import pb

    parts = [f"{t.stage}={t.elapsed_ms:.2f}ms/{t.budget_ms:.0f}ms {pb.StageOutcome.Name(t.outcome)}"
             + (f" ({t.detail})" if t.detail else "") for t in timings]
    print("stages: " + "; ".join(parts) + (f"; total={total_ms:.2f} ms" if total_ms is not None else ""))


def _print_plan(plan: Any, wall_ms: float, pb: Any) -> None:
    print(f"plan for robot: source={pb.PlanSource.Name(plan.source)} mode={pb.ServingMode.Name(plan.mode)}"
          f"{' rule=' + plan.rule_id if plan.rule_id else ''}")
    print(f"reason: {plan.reason}")
    for i, step in enumerate(plan.steps, 1):
        params = ", ".join(f"{k}={getattr(v, v.WhichOneof('kind'))!r}" for k, v in sorted(step.params.items()))
        print(f"  {i}. {step.action}({params})")
    for c in plan.citations:
        print(f"  [{c.marker}] {c.source} ({c.passage_id})")
    _print_timings(plan.timings, plan.total_ms)
    print(f"client round trip: {wall_ms:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
