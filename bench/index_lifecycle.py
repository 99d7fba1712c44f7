"""Index lifecycle under load: query latency while passages stream in, and a 100k snapshot build + swap.

    python -m bench.index_lifecycle latency [--dense | --no-dense] [--seconds 15] [--rounds 3] [--qps 40]
                                            [--upsert-rate 100] [--batch 10] [--append-results]
    python -m bench.index_lifecycle build [--passages 100000] [--upserts 200] [--append-results]

`latency` starts the real server (`snaprag serve`, a subprocess, IndexAdmin on) over the embedded KB and
sends Retrieve calls open-loop at --qps (latency counted from each call's intended send time, so a
stalled server cannot hide its queue) with real golden questions: --rounds pairs of windows of
--seconds, idle then with an Upsert stream of --upsert-rate passages/s (batches of --batch, open loop,
at most 32 in flight; new passages and ~20 % replacements), alternating so that load from other
tenants of a shared box falls on both alike; then one window during a Snapshot + Swap. Target (issue 7): query p99
during the stream <= 1.5 x idle. The achieved upsert rate is reported: with dense retrieval every
passage is encoded by MiniLM on the server's niced ingest thread, which on 2 shared cores cannot
reach 100 passages/s (writes queue; queries keep priority).

`build` writes a seed snapshot of --passages passages into a fresh index folder, starts the server on
it, upserts --upserts real passages (encoded by the server), then times Snapshot (the builder process:
load, replay, BM25, HNSW, fsync, rename) and Swap (load + verify the candidate, re-apply, gates: doc
count and golden Recall@10 over the KB's 425 golden questions, then promote). The corpus is the 803 KB
passages (real MiniLM vectors) plus synthetic ones: words drawn Zipf-like from the KB vocabulary, and
vectors from bench.dense.synthetic_corpus (clustered, low intrinsic dimension, like MiniLM's) instead
of 99k MiniLM runs (about 1.5 h on 2 shared cores). Build cost depends on counts and dimensions, not on
where the vectors came from; the recall gate runs on the real KB questions and passages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.config import REPO_ROOT

TOKEN = "bench-admin-token-0123456789abcdef"
WORD = re.compile(r"[a-z]+")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pct(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


# -- the server under test ----------------------------------------------------------------------------

class Server:
    """`snaprag serve` as a subprocess with IndexAdmin on, over `root`."""

    def __init__(self, root: Path, *, dense: bool, extra: Sequence[str] = ()) -> None:
        self.root = root
        sets = ["admin.enabled=true", 'admin.tokens=["admin:env:SNAPRAG_ADMIN_TOKEN"]', f'index.root="{root}"',
                f"retrieval.dense.enabled={'true' if dense else 'false'}", "server.log_level=\"warning\"", *extra]
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", "0"]
        for s in sets:
            cmd += ["--set", s]
        env = {**os.environ, "SNAPRAG_ADMIN_TOKEN": TOKEN, "GRPC_VERBOSITY": "ERROR"}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.search(r"serving on (\S+)", line)
            if m:
                self.address = m.group(1)
                break
        else:
            raise RuntimeError(f"the server exited ({self.proc.wait()}) before serving")
        self.start_s = time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _stubs(address: str) -> tuple[Any, Any, Any, Any, Any]:
    import grpc

    from server.proto import admin_pb, admin_pb_grpc, pb, pb_grpc

    ch = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)])
    return ch, pb_grpc.AssistantStub(ch), admin_pb_grpc.IndexAdminStub(ch), pb, admin_pb


MD = (("authorization", f"Bearer {TOKEN}"),)


def _questions() -> list[str]:
    from server.knowledge import load_golden

    return [q.question for kb in ("voice", "warehouse")
            for q in load_golden(REPO_ROOT / "data" / "kb" / kb, "dev")]


def _kb_texts() -> list[str]:
    from server.knowledge import load_knowledge_base

    kb = load_knowledge_base([REPO_ROOT / "data" / "kb" / "voice", REPO_ROOT / "data" / "kb" / "warehouse"])
    return [p.text for p in kb.passages]


def _new_passage(admin_pb: Any, i: int, texts: list[str], rng: np.random.Generator) -> Any:
    """A realistic new passage: sentences of two KB passages recombined, under a new id."""
    a, b = texts[int(rng.integers(len(texts)))], texts[int(rng.integers(len(texts)))]
    text = " ".join(a.split(". ")[:2] + b.split(". ")[-2:])[:1500]
    return admin_pb.AdminPassage(id=f"bench-{i:07d}", text=text, intent="troubleshooting", domain="smart_home",
                                 locale="en-US", source=f"Bench feed {i % 17}", confidence=0.8)


# -- latency ------------------------------------------------------------------------------------------

async def _query_load(query: Any, pb: Any, questions: list[str], qps: float, seconds: float) -> dict[str, Any]:
    import grpc

    lat: list[float] = []
    errors: list[str] = []
    start = time.perf_counter() + 0.05
    n = int(qps * seconds)
    tasks = []

    async def one(i: int) -> None:
        due = start + i / qps
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            await query.Retrieve(pb.RetrieveRequest(query=questions[i % len(questions)], k=10), timeout=2.0)
            lat.append((time.perf_counter() - due) * 1000)
        except grpc.aio.AioRpcError as e:
            errors.append(e.code().name)

    for i in range(n):
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return {**_pct(lat), "errors": len(errors), "error_codes": sorted(set(errors)), "lat": lat}


def _merge(windows: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for w in windows for x in w["lat"]]
    return {**_pct(lat), "errors": sum(w["errors"] for w in windows),
            "error_codes": sorted({c for w in windows for c in w["error_codes"]}),
            "per_window_p99": [round(w.get("p99", 0.0), 1) for w in windows]}


async def _upsert_stream(admin: Any, admin_pb: Any, rate: float, batch: int, texts: list[str],
                         stop: asyncio.Event, first_id: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    sem = asyncio.Semaphore(32)
    lat: list[float] = []
    acked = [0]
    dropped = [0]
    errors: list[str] = []
    next_id = [first_id]
    written: list[int] = []
    interval = batch / rate
    start = time.perf_counter()
    tasks = []

    async def send(msgs: list[Any]) -> None:
        async with sem:
            if stop.is_set():  # offered while 32 were in flight, and the phase is over: never sent
                dropped[0] += len(msgs)
                return
            t0 = time.perf_counter()

            async def it() -> Any:
                yield admin_pb.UpsertRequest(passages=msgs)

            try:
                await admin.Upsert(it(), metadata=MD, timeout=120)
                lat.append((time.perf_counter() - t0) * 1000)
                acked[0] += len(msgs)
            except Exception as e:  # reported, the stream goes on
                errors.append(str(e)[:120])

    k = 0
    while not stop.is_set():
        due = start + k * interval
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        msgs = []
        for _ in range(batch):
            if written and rng.random() < 0.2:  # a replacement of a passage streamed earlier
                i = written[int(rng.integers(len(written)))]
            else:
                i = next_id[0]
                next_id[0] += 1
                written.append(i)
            msgs.append(_new_passage(admin_pb, i, texts, rng))
        # one id once per batch
        msgs = list({m.id: m for m in msgs}.values())
        tasks.append(asyncio.create_task(send(msgs)))
        k += 1
    sent_s = time.perf_counter() - start
    await asyncio.gather(*tasks)
    total_s = time.perf_counter() - start
    return {"offered_per_s": rate, "acked_passages": acked[0], "not_sent_backlog": dropped[0],
            "acked_per_s_during_phase": acked[0] / sent_s if sent_s else 0.0, "drain_s": total_s - sent_s,
            "batch_ms": _pct(lat), "batch_lat": lat, "errors": len(errors),
            "first_error": errors[0] if errors else "", "next_id": next_id[0]}


async def _latency(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="snaprag-bench-index-"))
    _log(f"latency: starting the server (dense {'on' if args.dense else 'off'}) on {root}")
    server = Server(root, dense=args.dense, extra=args.set)
    out: dict[str, Any] = {"dense": args.dense, "qps": args.qps, "seconds": args.seconds, "rounds": args.rounds,
                           "set": args.set, "load_before": os.getloadavg()[0],
                           "server_start_s": server.start_s}
    try:
        ch, query, admin, pb, admin_pb = _stubs(server.address)
        questions, texts = _questions(), _kb_texts()
        await _query_load(query, pb, questions, args.qps, 5.0)  # warm-up, discarded
        # Idle and stream windows alternate (ABAB...), so load from other tenants of a shared box lands on
        # both conditions alike instead of on whichever phase it happened to coincide with.
        idle: list[dict[str, Any]] = []
        stream: list[dict[str, Any]] = []
        ups: list[dict[str, Any]] = []
        next_id = 0
        for r in range(args.rounds):
            _log(f"  round {r + 1}/{args.rounds}: {args.seconds:.0f} s idle, then {args.seconds:.0f} s with "
                 f"{args.upsert_rate:g} passages/s offered (batches of {args.batch})")
            idle.append(await _query_load(query, pb, questions, args.qps, args.seconds))
            stop = asyncio.Event()
            task = asyncio.create_task(_upsert_stream(admin, admin_pb, args.upsert_rate, args.batch, texts, stop,
                                                      next_id))
            stream.append(await _query_load(query, pb, questions, args.qps, args.seconds))
            stop.set()
            ups.append(await task)
            next_id = ups[-1]["next_id"]
        out["idle"] = _merge(idle)
        out["stream"] = _merge(stream)
        out["upserts"] = {"offered_per_s": args.upsert_rate,
                          "acked_passages": sum(u["acked_passages"] for u in ups),
                          "not_sent_backlog": sum(u["not_sent_backlog"] for u in ups),
                          "acked_per_s_during_phase": sum(u["acked_passages"] for u in ups) / (args.rounds *
                                                                                              args.seconds),
                          "drain_s": max(u["drain_s"] for u in ups),
                          "batch_ms": _pct([x for u in ups for x in u["batch_lat"]]),
                          "errors": sum(u["errors"] for u in ups)}
        stats = await admin.Stats(admin_pb.StatsRequest(), metadata=MD)
        out["after_stream"] = {"passages": stats.passages, "pending_passages": stats.pending_passages}
        _log("  phase swap: the same queries during Snapshot + Swap")

        async def snapshot_and_swap() -> dict[str, float]:
            t0 = time.perf_counter()
            async for _ in admin.Snapshot(admin_pb.SnapshotRequest(), metadata=MD, timeout=600):
                pass
            t1 = time.perf_counter()
            async for _ in admin.Swap(admin_pb.SwapRequest(), metadata=MD, timeout=600):
                pass
            return {"snapshot_s": t1 - t0, "swap_s": time.perf_counter() - t1}

        job = asyncio.create_task(snapshot_and_swap())
        out["swap_phase"] = await _query_load(query, pb, questions, args.qps, args.seconds)
        out["swap_phase"].pop("lat")
        out["swap_phase"].update(await job)
        out["p99_ratio_stream_vs_idle"] = out["stream"]["p99"] / out["idle"]["p99"]
        out["load_after"] = os.getloadavg()[0]
        await ch.close()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


# -- 100k build + swap --------------------------------------------------------------------------------

def _seed(root: Path, n: int) -> dict[str, Any]:
    from bench.dense import synthetic_corpus
    from server.config import load_config
    from server.index.store import Pointer, SnapshotStore, utc_now
    from server.knowledge import Passage, load_knowledge_base
    from server.retrieval.embed_cache import cached_embeddings
    from server.retrieval.snapshot import index_texts, write_snapshot
    from server.runtime import load_encoder, make_tokenizer

    cfg = load_config(env={})
    tok = make_tokenizer(cfg)
    kb = load_knowledge_base([REPO_ROOT / "data" / "kb" / "voice", REPO_ROOT / "data" / "kb" / "warehouse"])
    enc = load_encoder(cfg)
    assert enc is not None, "dense retrieval is off in snaprag.toml; the build bench needs the encoder"
    real = cached_embeddings(enc, index_texts(kb), batch_size=cfg.retrieval.dense.batch_size)
    m = n - len(kb)
    rng = np.random.default_rng(11)
    words = sorted({w for p in kb.passages for w in WORD.findall(p.text.lower())})
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    order = rng.permutation(len(words))
    cdf = np.cumsum(zipf / zipf.sum())
    lengths = rng.integers(50, 90, m)
    draws = np.asarray(words, dtype=object)[order][np.searchsorted(cdf, rng.random(int(lengths.sum())))
                                                   .clip(max=len(words) - 1)]
    vecs, _ = synthetic_corpus(m, 1, seed=5)
    pos = 0
    for i, ln in enumerate(lengths.tolist()):
        kb.by_id[f"syn-{i:06d}"] = len(kb.passages)
        kb.passages.append(Passage(id=f"syn-{i:06d}", text=" ".join(draws[pos:pos + ln]), intent="synthetic",
                                   domain="synthetic", locale="en-US", confidence=0.7, source=f"Synthetic {i % 97}"))
        pos += ln
    embeddings = np.concatenate([real, vecs]).astype(np.float32)
    store = SnapshotStore(root)
    store.ensure()
    t0 = time.perf_counter()
    write_snapshot(store.path("v000001"), kb, cfg, tok, encoder=enc, embeddings=embeddings, log=_log,
                   extra={"lifecycle": {"version": "v000001", "parent": "", "wal_through": 0, "records": 0}})
    seed_s = time.perf_counter() - t0
    store.write_current(Pointer("v000001", history=[{"version": "v000001", "previous": "", "at": utc_now()}]))
    return {"passages": len(kb), "real_passages": len(kb) - m, "seed_build_s": seed_s}


async def _build(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="snaprag-bench-100k-"))
    out: dict[str, Any] = {"passages": args.passages}
    try:
        _log(f"build: seeding {args.passages} passages in {root}")
        out["seed"] = _seed(root, args.passages)
        _log("  starting the server on it")
        server = Server(root, dense=True, extra=args.set)
        out["server_start_s"] = server.start_s
        try:
            ch, _, admin, _, admin_pb = _stubs(server.address)
            texts = _kb_texts()
            rng = np.random.default_rng(3)
            t0 = time.perf_counter()
            for lo in range(0, args.upserts, 50):
                msgs = [_new_passage(admin_pb, i, texts, rng) for i in range(lo, min(args.upserts, lo + 50))]

                async def it(msgs: list[Any] = msgs) -> Any:
                    yield admin_pb.UpsertRequest(passages=msgs)

                await admin.Upsert(it(), metadata=MD, timeout=600)
            out["upserts"] = {"passages": args.upserts, "s": time.perf_counter() - t0}
            _log(f"  upserted {args.upserts} in {out['upserts']['s']:.1f} s; Snapshot...")
            t0 = time.perf_counter()
            stages: dict[str, float] = {}
            last = t0
            async for ev in admin.Snapshot(admin_pb.SnapshotRequest(), metadata=MD, timeout=3600):
                now = time.perf_counter()
                if ev.WhichOneof("event") == "progress":
                    stages[ev.progress.stage] = stages.get(ev.progress.stage, 0.0)
                    _log(f"    {ev.progress.stage} at {now - t0:.1f} s")
                else:
                    out["snapshot_result"] = {"version": ev.snapshot.version, "passages": ev.snapshot.passages,
                                              "build_s": ev.snapshot.build_s}
                last = now
            out["snapshot_s"] = last - t0
            _log(f"  snapshot {out['snapshot_s']:.1f} s; Swap...")
            t0 = time.perf_counter()
            async for ev in admin.Swap(admin_pb.SwapRequest(), metadata=MD, timeout=3600):
                if ev.WhichOneof("event") == "swap":
                    out["swap_result"] = {"version": ev.swap.version, "passages": ev.swap.passages,
                                          "swap_s": ev.swap.swap_s,
                                          "gates": [(g.name, g.passed, g.detail) for g in ev.swap.gates]}
                else:
                    _log(f"    {ev.progress.stage} at {time.perf_counter() - t0:.1f} s")
            out["swap_s"] = time.perf_counter() - t0
            out["build_and_swap_s"] = out["snapshot_s"] + out["swap_s"]
            await ch.close()
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


# -- report -------------------------------------------------------------------------------------------

def _machine() -> str:
    return f"{os.cpu_count()} cores ({platform.machine()}), load average {os.getloadavg()[0]:.1f}"


def _latency_md(r: dict[str, Any], cmd: str) -> str:
    rows = []
    for name, key in (("idle", "idle"), (f"upsert stream, {r['upserts']['offered_per_s']:g} passages/s offered",
                                         "stream"), ("Snapshot + Swap running", "swap_phase")):
        p = r[key]
        windows = ", ".join(map(str, p.get("per_window_p99", []))) or "-"
        rows.append(f"| {name} | {p['n']} | {p['p50']:.1f} | {p['p95']:.1f} | {p['p99']:.1f} | {p['max']:.1f} | "
                    f"{p['errors']} | {windows} |")
    u = r["upserts"]
    return (f"\nCommand: `{cmd}` ({time.strftime('%Y-%m-%d')}); dense {'on' if r['dense'] else 'off'}; Retrieve at "
            f"{r['qps']:g}/s open loop; {r['rounds']} x ({r['seconds']:.0f} s idle, {r['seconds']:.0f} s streaming) "
            f"alternating, then {r['seconds']:.0f} s during Snapshot + Swap; {os.cpu_count()} cores, load average "
            f"{r['load_before']:.1f} before / {r['load_after']:.1f} after (a shared box)\n\n"
            "| phase | queries | p50 ms | p95 ms | p99 ms | max ms | errors | p99 per window |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + f"\n\np99 streaming / idle: **{r['p99_ratio_stream_vs_idle']:.2f}x** (target <= 1.5x). Upserts "
            f"acknowledged: {u['acked_passages']} passages, {u['acked_per_s_during_phase']:.1f}/s while streaming "
            f"({u['not_sent_backlog']} offered passages were still queued client-side at the ends of the windows), "
            f"Upsert call p50 {u['batch_ms'].get('p50', 0):.0f} ms / p99 {u['batch_ms'].get('p99', 0):.0f} ms "
            f"(queueing included), {u['errors']} errors. Snapshot {r['swap_phase']['snapshot_s']:.1f} s + Swap "
            f"{r['swap_phase']['swap_s']:.1f} s during the last phase.\n")


def _build_md(r: dict[str, Any], cmd: str) -> str:
    gates = "; ".join(f"{n} {'pass' if ok else 'FAIL'} ({d})" for n, ok, d in r["swap_result"]["gates"])
    return (f"\nCommand: `{cmd}` ({time.strftime('%Y-%m-%d')}); {_machine()}\n\n"
            f"{r['seed']['passages']} passages ({r['seed']['real_passages']} real KB passages with MiniLM vectors, the "
            "rest synthetic: see the module docstring), dense on, builder niced 10.\n\n"
            "| step | seconds |\n|---|---|\n"
            f"| seed snapshot (in the bench process: BM25 + HNSW + write) | {r['seed']['seed_build_s']:.1f} |\n"
            f"| server start to SERVING (load + verify + warm-up) | {r['server_start_s']:.1f} |\n"
            f"| upsert {r['upserts']['passages']} passages (encoded by the server) | {r['upserts']['s']:.1f} |\n"
            f"| **Snapshot** (builder process: load, replay, BM25, HNSW, fsync, rename) | {r['snapshot_s']:.1f} |\n"
            f"| **Swap** (load + verify candidate, re-apply, gates, promote) | {r['swap_s']:.1f} |\n"
            f"| **build + swap** | **{r['build_and_swap_s']:.1f}** |\n\nGates: {gates}\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.index_lifecycle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    lat = sub.add_parser("latency", help="query latency idle vs during an upsert stream and a swap")
    lat.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                     help="hybrid retrieval with the MiniLM encoder (default) or BM25 only")
    lat.add_argument("--seconds", type=float, default=15.0, help="per window (default 15)")
    lat.add_argument("--rounds", type=int, default=3, help="idle/stream window pairs, alternating (default 3)")
    lat.add_argument("--qps", type=float, default=40.0, help="Retrieve calls per second (default 40)")
    lat.add_argument("--upsert-rate", type=float, default=100.0, help="passages per second offered (default 100)")
    lat.add_argument("--batch", type=int, default=10, help="passages per Upsert call (default 10)")
    b = sub.add_parser("build", help="seed N passages, then time Snapshot and Swap through the server")
    b.add_argument("--passages", type=int, default=100_000)
    b.add_argument("--upserts", type=int, default=200, help="passages written before the snapshot (default 200)")
    for p in (lat, b):
        p.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
        p.add_argument("--json", type=Path, help="also write the raw figures here")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="server config override, as `snaprag serve --set` (repeatable)")
    args = ap.parse_args(argv)
    cmd = "python -m bench.index_lifecycle " + " ".join(sys.argv[1:] if argv is None else argv)
    result = asyncio.run(_latency(args) if args.what == "latency" else _build(args))
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.append_results:
        md = _latency_md(result, cmd) if args.what == "latency" else _build_md(result, cmd)
        with (REPO_ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as fh:
            fh.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
