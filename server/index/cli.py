"""`snaprag index upsert|delete|snapshot|swap|rollback|stats`: the IndexAdmin client for operators.

Credentials: a bearer token from --token-file, else the SNAPRAG_ADMIN_TOKEN environment variable; with
--ca (and --cert/--key for mTLS) the channel uses TLS. `--target` is the server (or its admin.port).

`upsert FILE.jsonl` checks the whole file first (one passage a line, the knowledge-base schema of
data/README.md): a malformed line stops it before anything is sent, with the line number and the field.
The passages then go out in batches of --batch, one Upsert stream each; each batch is applied
all-or-nothing by the server, so after an interrupted run the batches before the failing one are in,
and re-running the file is safe (an upsert of an existing id replaces it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

TOKEN_ENV = "SNAPRAG_ADMIN_TOKEN"
ACTIONS = ("upsert", "delete", "snapshot", "swap", "rollback", "stats")
MESSAGE_PASSAGES = 32  # passages per stream message: well under the 1 MiB message limit at 4,000 chars each


def add_commands(ixs: Any, default_target: str) -> None:
    """Register the admin actions under `snaprag index`."""
    def client(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", default=default_target,
                       help=f"server address, or its admin.port when IndexAdmin has its own (default {default_target})")
        p.add_argument("--token-file", type=Path, help=f"file holding the bearer token (default: env {TOKEN_ENV})")
        p.add_argument("--ca", type=Path, help="PEM CA of the admin port's certificate: use TLS")
        p.add_argument("--cert", type=Path, help="PEM client certificate (mTLS; with --key)")
        p.add_argument("--key", type=Path, help="PEM private key of --cert")
        p.add_argument("--timeout", type=float, default=600.0, help="call deadline in seconds (default 600)")

    u = ixs.add_parser("upsert", help="add or replace passages from a JSONL file (checked first, sent in batches)")
    u.add_argument("file", type=Path, help="one passage a line: id, text, intent, domain, locale, confidence, source "
                                          "[, fault_code, steps] (data/README.md)")
    u.add_argument("--batch", type=int, default=500, help="passages per atomic batch (default 500)")
    u.add_argument("--max-chars", type=int, default=4000,
                   help="longest text accepted, as the server's [index] max_passage_chars (default 4000)")
    client(u)
    d = ixs.add_parser("delete", help="delete passages by id (all-or-nothing: an unknown id fails the call)")
    d.add_argument("ids", nargs="*", help="passage ids")
    d.add_argument("--from-file", type=Path, help="also read ids from this file, one a line")
    d.add_argument("--missing-ok", action="store_true", help="delete the ids that exist, list the others")
    client(d)
    s = ixs.add_parser("snapshot", help="freeze the live index into a new snapshot (built off the read path)")
    s.add_argument("--swap", action="store_true", help="then promote it (the gates decide)")
    s.add_argument("--allow-shrink", action="store_true", help="with --swap: skip the document-count gate")
    client(s)
    w = ixs.add_parser("swap", help="promote a snapshot if it passes every gate (default: the newest)")
    w.add_argument("version", nargs="?", default="", help="e.g. v000004 (`snaprag index stats` lists them)")
    w.add_argument("--allow-shrink", action="store_true",
                   help="skip the document-count gate (the candidate may hold < 99 %% of the live passages)")
    client(w)
    r = ixs.add_parser("rollback", help="swap back to the snapshot served before the current one (gated too)")
    r.add_argument("--to", default="", help="a kept version instead of the previous one")
    r.add_argument("--allow-shrink", action="store_true", help="skip the document-count gate")
    client(r)
    st = ixs.add_parser("stats", help="counts, versions, last swap, pending writes (a read token is enough)")
    st.add_argument("--json", action="store_true", help="print the raw response as JSON")
    client(st)


def run(args: argparse.Namespace) -> int:
    from server.errors import InvalidArgument

    try:
        token = _token(args)
        return asyncio.run(_run(args, token))
    except InvalidArgument as e:
        print(f"snaprag index {args.index_command}: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"snaprag index {args.index_command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        token = args.token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip()


def _channel(args: argparse.Namespace) -> Any:
    import grpc

    opts = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
    if args.ca:
        creds = grpc.ssl_channel_credentials(
            root_certificates=args.ca.read_bytes(), private_key=args.key.read_bytes() if args.key else None,
            certificate_chain=args.cert.read_bytes() if args.cert else None)
        return grpc.aio.secure_channel(args.target, creds, options=opts)
    return grpc.aio.insecure_channel(args.target, options=opts)


async def _run(args: argparse.Namespace, token: str) -> int:
    import grpc

    from server.proto import admin_pb, admin_pb_grpc

    passages: list[Any] = []
    if args.index_command == "upsert":
        passages = _read_file(args.file, args.max_chars)  # before connecting: a bad file sends nothing
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with _channel(args) as channel:
        stub = admin_pb_grpc.IndexAdminStub(channel)
        kw = {"metadata": metadata, "timeout": args.timeout}
        try:
            cmd = args.index_command
            if cmd == "upsert":
                return await _upsert(stub, passages, args.batch, kw, admin_pb)
            if cmd == "delete":
                ids = list(args.ids)
                if args.from_file:
                    ids += [line.strip() for line in args.from_file.read_text(encoding="utf-8").splitlines()
                            if line.strip()]
                if not ids:
                    raise ValueError("name at least one id (or --from-file)")
                resp = await stub.Delete(admin_pb.DeleteRequest(ids=ids, missing_ok=args.missing_ok), **kw)
                print(f"deleted {resp.deleted}; {resp.live_passages} passages live (generation {resp.generation})")
                if resp.not_found:
                    print(f"not in the index: {', '.join(resp.not_found)}")
                return 0
            if cmd == "snapshot":
                version = ""
                async for ev in _job(stub.Snapshot(admin_pb.SnapshotRequest(), **kw)):
                    r = ev.snapshot
                    version = r.version
                    print(f"built {r.version}: {r.passages} passages in {r.build_s:.1f} s ({r.path})")
                if args.swap:
                    return await _swap(stub, version, args.allow_shrink, kw, admin_pb)
                print(f"promote it with: snaprag index swap {version}")
                return 0
            if cmd == "swap":
                return await _swap(stub, args.version, args.allow_shrink, kw, admin_pb)
            if cmd == "rollback":
                target = args.to
                if not target:
                    stats = await stub.Stats(admin_pb.StatsRequest(), **kw)
                    if stats.last_swap_version != stats.live_version or not stats.last_swap_previous:
                        raise ValueError(f"no previous version recorded for {stats.live_version}; name one with --to "
                                         f"(kept: {', '.join(s.version for s in stats.snapshots)})")
                    target = stats.last_swap_previous
                return await _swap(stub, target, args.allow_shrink, kw, admin_pb)
            stats = await stub.Stats(admin_pb.StatsRequest(), **kw)
            _print_stats(stats, args.json)
            return 0
        except grpc.aio.AioRpcError as e:
            print(f"snaprag index {args.index_command}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1


def _read_file(path: Path, max_chars: int) -> list[Any]:
    from server.errors import InvalidArgument
    from server.index.batch import read_jsonl

    if not path.exists():
        raise ValueError(f"{path}: no such file")
    seen: dict[str, int] = {}
    out = []
    for lineno, p in read_jsonl(path, max_chars):
        if p.id in seen:
            raise InvalidArgument(f"{path}:{lineno} field 'id'", f"{p.id!r} is already on line {seen[p.id]}; "
                                  "keep one line per id")
        seen[p.id] = lineno
        out.append(p)
    if not out:
        raise ValueError(f"{path}: no passages")
    return out


async def _upsert(stub: Any, passages: list[Any], batch: int, kw: dict[str, Any], admin_pb: Any) -> int:
    from tqdm import tqdm

    from server.index.wal import passage_json

    if batch < 1:
        raise ValueError("--batch must be >= 1")
    inserted = replaced = 0
    with tqdm(total=len(passages), desc="upsert", unit="passage", file=sys.stderr) as bar:
        for lo in range(0, len(passages), batch):
            chunk = passages[lo:lo + batch]

            async def requests(chunk: list[Any] = chunk) -> AsyncIterator[Any]:
                for i in range(0, len(chunk), MESSAGE_PASSAGES):
                    yield admin_pb.UpsertRequest(passages=[_admin_passage(p, admin_pb, passage_json)
                                                           for p in chunk[i:i + MESSAGE_PASSAGES]])

            resp = await stub.Upsert(requests(), **kw)
            inserted += resp.inserted
            replaced += resp.replaced
            bar.update(len(chunk))
    print(f"upserted {len(passages)} passages ({inserted} new, {replaced} replaced); {resp.live_passages} live "
          f"(generation {resp.generation}). They are served now; `snaprag index snapshot --swap` makes them part "
          "of a snapshot.")
    return 0


def _admin_passage(p: Any, admin_pb: Any, passage_json: Any) -> Any:
    d = passage_json(p)
    return admin_pb.AdminPassage(id=p.id, text=p.text, intent=p.intent, domain=p.domain, locale=p.locale,
                                 source=p.source, confidence=p.confidence, fault_code=p.fault_code,
                                 steps_json=json.dumps(d["steps"]) if "steps" in d else "")


async def _job(call: Any) -> AsyncIterator[Any]:
    """Progress bars for a Snapshot/Swap stream; yields the result events."""
    from tqdm import tqdm

    bar = None
    stage = ""
    try:
        async for ev in call:
            kind = ev.WhichOneof("event")
            if kind != "progress":
                yield ev
                continue
            p = ev.progress
            if p.stage != stage:
                if bar is not None:
                    bar.close()
                    bar = None
                stage = p.stage
                if p.total > 1:  # a countable stage gets a bar; the others one line each
                    bar = tqdm(total=p.total, desc=p.stage, file=sys.stderr, leave=True)
                else:
                    print(f"  {p.stage}{': ' + p.detail if p.detail else ''}", file=sys.stderr, flush=True)
            if bar is not None and p.done:
                bar.n = p.done
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()


async def _swap(stub: Any, version: str, allow_shrink: bool, kw: dict[str, Any], admin_pb: Any) -> int:
    async for ev in _job(stub.Swap(admin_pb.SwapRequest(version=version, allow_shrink=allow_shrink), **kw)):
        r = ev.swap
        print(f"swapped {r.previous} -> {r.version}: {r.passages} passages live, {r.reapplied_writes} pending writes "
              f"re-applied, {r.swap_s:.1f} s")
        for g in r.gates:
            print(f"  gate {g.name}: {'pass' if g.passed else 'FAIL'}  {g.detail}")
    return 0


def _print_stats(s: Any, as_json: bool) -> None:
    if as_json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(s, preserving_proto_field_name=True, always_print_fields_with_no_presence=True),
                         indent=2))
        return
    print(f"live: {s.live_version}  generation {s.generation}  {s.passages} passages "
          f"({s.snapshot_passages} in the snapshot, +{s.delta_rows} rows written, {s.tombstones} hidden)")
    print(f"pending (not in a snapshot yet): {s.pending_batches} batches, {s.pending_passages} passages")
    if s.last_swap_version:
        print(f"last swap: {s.last_swap_previous or '-'} -> {s.last_swap_version} at {s.last_swap_at}")
    for g in s.last_swap_gates:
        print(f"  gate {g.name}: {'pass' if g.passed else 'FAIL'}  {g.detail}")
    if s.running_job:
        print(f"running: {s.running_job}")
    if s.last_failure:
        print(f"last failure: {s.last_failure}")
    print("snapshots (newest first):")
    for info in s.snapshots:
        print(f"  {info.version}{' (live)' if info.live else ''}  {info.passages} passages  {info.created}  "
              f"{info.bytes / 1e6:.1f} MB")
