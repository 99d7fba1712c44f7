"""`snaprag bench-overload` (`make bench-overload`): the server at 3x its measured capacity.

    snaprag bench-overload                       measure capacity, then 3x it, admission on vs off
    snaprag bench-overload --capacity 100        skip the capacity search (a rate from an earlier run)
    snaprag bench-overload --factor 4 --duration 30

1. Capacity: the standard mix (60 % Plan / 20 % Ask / 20 % Retrieve) at rising open-loop rates, short steps,
   against snaprag with admission control off (nothing shed, so this is what it can really serve);
   capacity = the highest rate at which every SLO of [slo] held.
2. Overload: the same mix at FACTOR x capacity, open loop (latency from each call's intended send time),
   against two servers started one after the other in the same run, on the same arrivals:
     snaprag          as configured (admission control on)
     no-admission     the same with admission.enabled = false: the control, what the shedding buys
Verdict (snaprag only): every admitted call's latency within its SLO (Plan p95/p99, voice first chunk, Retrieve
p99, over OK calls), refused calls answered fast (p99 of the RESOURCE_EXHAUSTED replies <= --refused-p99-ms),
and 0 errors of any other kind. Exit 0 when it holds, 1 when not, 3 when a server could not start.

The load generator runs on the same machine: on a small box it competes with the server for the cores, and
its own send lag (reported) says how much. Outputs: --out/overload.json and overload.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import CLIENT_LAG_LIMIT_MS, EXIT_OK, EXIT_SERVER, EXIT_SLO, EXIT_USAGE, Progress, run_phase
from bench.load import DEFAULT_MAX_IN_FLIGHT
from bench.report import PhaseSpec, machine_info
from bench.slo import Verdict, verdict
from bench.traffic import KINDS, PhaseStats, Traffic
from clients.assistant import AssistantClient
from server.config import DEFAULT_CONFIG_PATH, REPO_ROOT, Config, ConfigError, load_config

DEFAULT_RATES = "25,50,75,100,125,150,200,250,300"
DEFAULT_OUT = REPO_ROOT / "build/bench/overload"
RPCS = ("Plan", "Ask", "Retrieve")


@dataclass
class OverloadRun:
    target: str
    rate: float
    stats: PhaseStats
    verdict: Verdict

    def row(self, rpc: str) -> dict[str, Any]:
        s = self.stats
        sent = s.calls.get(rpc, 0)
        refused = s.codes.get(f"{rpc} RESOURCE_EXHAUSTED", 0)
        ok = s.codes.get(f"{rpc} OK", 0)
        metric = {"Plan": "plan", "Ask": "first_chunk", "Retrieve": "retrieve"}[rpc]
        adm = s.admitted.get(metric)
        ref = s.refused.get(rpc)
        return {"rpc": rpc, "sent": sent, "ok": ok, "refused": refused, "other_errors": sent - ok - refused,
                "admitted_p50_ms": adm.percentile_ms(50) if adm and adm.count else None,
                "admitted_p99_ms": adm.percentile_ms(99) if adm and adm.count else None,
                "refused_p50_ms": ref.percentile_ms(50) if ref and ref.count else None,
                "refused_p99_ms": ref.percentile_ms(99) if ref and ref.count else None,
                "modes": {k.split(" ", 1)[1]: v for k, v in s.modes.items() if k.startswith(f"{rpc} ")}}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snaprag bench-overload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=float, help="requests/s the server holds its SLOs at (skips the search)")
    ap.add_argument("--rates", default=DEFAULT_RATES,
                    help=f"capacity search rates, ascending (default {DEFAULT_RATES})")
    ap.add_argument("--step-duration", type=float, default=5.0, help="measured seconds per search step (default 5)")
    ap.add_argument("--factor", type=float, default=3.0, help="overload = FACTOR x capacity (default 3)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds of the overload (default 20)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds sent before measuring (default 2)")
    ap.add_argument("--refused-p99-ms", type=float, default=50.0,
                    help="a refusal must reach the caller within this, p99 (default 50 ms: a third of a robot's "
                         "150 ms deadline, leaving two thirds to retry another replica)")
    ap.add_argument("--no-control", action="store_true", help="skip the admission-off control server")
    ap.add_argument("--mix", default="plan=0.6,ask=0.2,retrieve=0.2", help="weights of the mix")
    ap.add_argument("--max-in-flight", type=int, default=4 * DEFAULT_MAX_IN_FLIGHT,
                    help="most calls this client keeps in flight (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default build/bench/overload)")
    ap.add_argument("--config", help="TOML config of the server and its [slo] table (default snaprag.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a config field of the server and the SLO table (repeatable)")
    return ap


def _start(name: str, args: argparse.Namespace, extra: Sequence[str], out: Path) -> Any:
    from bench import servers

    sets = [a for x in [*args.set, *extra] for a in ("--set", x)]
    config = ["--config", args.config] if args.config else []
    return servers.start(name, ["-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0", *config, *sets],
                         out / f"{name}.log")


async def _phase(address: str, rate: float, args: argparse.Namespace, duration_s: float, seed: int,
                 desc: str) -> PhaseStats:
    from bench.harness import _mix

    client = AssistantClient(address, timeout_s=10.0, retries=0)
    try:
        traffic = Traffic(client, seed=args.seed, mix=_mix(args.mix))
        return await run_phase(traffic, PhaseSpec("mix", rate=rate), duration_s=duration_s, warmup_s=args.warmup,
                               seed=seed, max_requests=int(rate * (duration_s + args.warmup)) + 10,
                               max_in_flight=args.max_in_flight, desc=desc, progress=Progress)
    finally:
        await client.close()


async def find_capacity(address: str, args: argparse.Namespace, cfg: Config, log: Any) -> tuple[float, list[dict]]:
    steps: list[dict[str, Any]] = []
    capacity = 0.0
    for i, rate in enumerate(float(r) for r in args.rates.split(",")):
        stats = await _phase(address, rate, args, args.step_duration, args.seed + i, f"capacity {rate:g}/s")
        v = verdict(cfg.slo, [(f"mix@{rate:g}", stats.measured())])
        lag = stats.send_lag.percentile_ms(99) if stats.send_lag.count else 0.0
        steps.append({"rate": rate, "passed": v.passed, "send_lag_p99_ms": lag,
                      "failures": [c.describe() for c in v.failures]})
        why = "holds" if v.passed else "fails: " + "; ".join(c.describe() for c in v.failures[:3])
        log(f"  capacity {rate:>5g}/s: {why}")
        if not v.passed:
            break
        capacity = rate
        if lag > CLIENT_LAG_LIMIT_MS:
            log(f"  (stopping: this client sent {lag:.0f} ms late at p99; higher rates would measure the client)")
            break
    return capacity, steps


async def run(args: argparse.Namespace, cfg: Config) -> tuple[int, dict[str, Any], str]:
    """(exit code, the JSON result, the markdown table)."""
    out: Path = args.out

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    meta = {**machine_info(), "command": " ".join(["snaprag bench-overload", *sys.argv[1:]])}
    result: dict[str, Any] = {"meta": meta, "factor": args.factor}
    runs: list[OverloadRun] = []
    # The control goes first: capacity is measured on it, with nothing shed, so "3x capacity" is 3x what the
    # server can really serve, not 3x what it chose to admit.
    targets = ([] if args.no_control else [("no-admission", ["admission.enabled=false"])]) + [("snaprag", [])]
    capacity = args.capacity
    for name, extra in targets:
        log(f"bench-overload: starting {name} ...")
        try:
            server = _start(name, args, extra, out)
        except Exception as e:  # reported; the exit code says the server did not start
            log(f"bench-overload: {name} did not start: {e}")
            return EXIT_SERVER, result, ""
        try:
            if capacity is None:
                log("bench-overload: finding capacity (the mix at rising rates until an SLO fails)")
                capacity, steps = await find_capacity(server.address, args, cfg, log)
                result["capacity_search"] = steps
                if capacity <= 0:
                    log("bench-overload: no rate held the SLOs; nothing to overload")
                    return EXIT_SLO, result, ""
            rate = args.factor * capacity
            log(f"bench-overload: {name}: mix at {rate:g}/s ({args.factor:g} x capacity {capacity:g}/s) for "
                f"{args.duration:g} s")
            stats = await _phase(server.address, rate, args, args.duration, args.seed + 1000, f"{name} {rate:g}/s")
            v = verdict(cfg.slo, [(f"{name} admitted @{rate:g}", stats.measured_admitted())])
            runs.append(OverloadRun(name, rate, stats, v))
        finally:
            server.stop()
    result["capacity_per_s"] = capacity
    main = next(r for r in runs if r.target == "snaprag")
    refused_ok = all((r["refused_p99_ms"] or 0.0) <= args.refused_p99_ms for r in map(main.row, RPCS))
    other = sum(main.row(rpc)["other_errors"] for rpc in RPCS)
    passed = main.verdict.passed and refused_ok and other == 0
    result["runs"] = [{"target": r.target, "rate_per_s": r.rate, "rows": [r.row(rpc) for rpc in RPCS],
                       "send_lag_p99_ms": r.stats.send_lag.percentile_ms(99) if r.stats.send_lag.count else None,
                       "verdict": r.verdict.headline(), "stats": r.stats.to_dict(encoded=False)} for r in runs]
    result["passed"] = passed
    result["loadavg_end"] = list(os.getloadavg())
    md = markdown(runs, capacity, args, passed, refused_ok, other)
    return (EXIT_OK if passed else EXIT_SLO), result, md


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def markdown(runs: list[OverloadRun], capacity: float, args: argparse.Namespace, passed: bool, refused_ok: bool,
             other: int) -> str:
    lines = [f"Capacity (mix, every SLO held): **{capacity:g} req/s**; overload: **{args.factor:g}x = "
             f"{args.factor * capacity:g} req/s** for {args.duration:g} s.", "",
             "| server | RPC | sent | OK | refused | other errors | admitted p50 / p99 ms | refused p50 / p99 ms "
             "| modes of OK |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for rpc in RPCS:
            row = r.row(rpc)
            modes = ", ".join(f"{k} {v}" for k, v in sorted(row["modes"].items()))
            lines.append(f"| {r.target} | {rpc}{' (first chunk)' if rpc == 'Ask' else ''} | {row['sent']} | "
                         f"{row['ok']} | {row['refused']} | {row['other_errors']} | {_ms(row['admitted_p50_ms'])} / "
                         f"{_ms(row['admitted_p99_ms'])} | {_ms(row['refused_p50_ms'])} / "
                         f"{_ms(row['refused_p99_ms'])} | {modes} |")
    lines.append("")
    for r in runs:
        lag = r.stats.send_lag.percentile_ms(99) if r.stats.send_lag.count else 0.0
        lines.append(f"- {r.target}: admitted calls: {r.verdict.headline()} (client send lag p99 {lag:.1f} ms)")
    lines.append(f"- refused calls p99 <= {args.refused_p99_ms:g} ms: {'yes' if refused_ok else 'NO'}; "
                 f"errors other than RESOURCE_EXHAUSTED: {other}")
    lines.append(f"- **overload verdict: {'PASS' if passed else 'FAIL'}**")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG_PATH, overrides=args.set)
    except ConfigError as e:
        print(f"bench-overload: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.factor <= 1 or args.duration <= 0 or (args.capacity is not None and args.capacity <= 0):
        print("bench-overload: --factor must be > 1, --duration and --capacity > 0", file=sys.stderr)
        return EXIT_USAGE
    assert "mix" in KINDS
    import uvloop

    args.out.mkdir(parents=True, exist_ok=True)
    code, result, md = uvloop.run(run(args, cfg))
    (args.out / "overload.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    if md:
        (args.out / "overload.md").write_text(md, encoding="utf-8")
        print(md)
    print(f"bench-overload: outputs in {args.out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
