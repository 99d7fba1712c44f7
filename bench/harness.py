"""`snaprag bench` (`make bench`): open-loop load, per-stage percentiles, plots and a pass/fail SLO verdict.

    snaprag bench                          the standard scenario against a server it starts (make bench)
    snaprag bench --quick                  the same, short (a smoke run: ~1 minute)
    snaprag bench --target HOST:PORT       measure a running server (loopback, or an address you give)
    snaprag bench --phase plan@100 --phase mix@c16 --no-sweep      your own phases

Standard scenario, every phase against snaprag, and in the same run against the naive baseline server
(bench/baseline.py: rank-bm25, no budgets, no fallback) and a bare grpc.aio echo server returning
snaprag's own responses (bench/echo.py: the physical limit) where the comparison means something:

    plan@20  plan@50        robot Plans, 150 ms deadline                    snaprag, baseline (+ echo @50)
    retrieve@50             Retrieve k=5                                    snaprag, baseline, echo
    empty@50                Plan answered by a safety rule (empty pipeline)  snaprag
    mix@50                  60 % Plan / 20 % Ask / 20 % Retrieve             snaprag, baseline
    miss@20                 Plan whose retrieval always misses (fallback)   snaprag
    sweep                   mix at rising rates until an SLO fails: the max rate at SLO

A phase `KIND@RATE` is open loop: Poisson arrivals at RATE requests/s, latency from each request's intended
send time, so a stall is not hidden (no coordinated omission). `KIND@cN` is closed loop at N in flight.
Each phase sends `--warmup` seconds first (not measured), then `--duration` seconds; every loop is bounded
in count and time.

The verdict checks every snaprag phase against the [slo] table of the config (server/config.py SloConfig):
robot Plan p95 <= 130 ms and p99 <= 150 ms, fallback <= 40 ms after a miss, voice first chunk <= 800 ms,
Retrieve <= 120 ms, error rate, invalid and unsafe plans. Exit code 0 when every measured check holds, 1
when any fails, 2 for a usage or config error, 3 when a server could not be started or reached.

Outputs in --out (default build/bench/latest): results.json (raw figures, HDR histograms, machine info),
results.md (the tables), cdf.png, stages.png, sweep.png, and the started servers' logs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from bench.load import DEFAULT_MAX_IN_FLIGHT, Shot, closed_loop, open_loop, poisson_offsets
from bench.report import BenchRun, PhaseRun, PhaseSpec, SweepStep, machine_info, write_outputs
from bench.slo import objectives, verdict
from bench.traffic import ASK_DEADLINE_S, KINDS, MISS_PROFILE, MISS_PROFILE_TOML, PhaseStats, Traffic
from clients.assistant import AssistantClient
from clients.options import add_connection_args, client_from_args
from server.config import DEFAULT_CONFIG_PATH, REPO_ROOT, Config, ConfigError, load_config

STANDARD: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("plan@20", ("snaprag", "baseline")),
    ("plan@50", ("snaprag", "baseline", "echo")),
    ("retrieve@50", ("snaprag", "baseline", "echo")),
    ("empty@50", ("snaprag",)),
    ("mix@50", ("snaprag", "baseline")),
    ("miss@20", ("snaprag",)),
)
# Which kinds the comparison servers can serve meaningfully.
BASELINE_KINDS = frozenset({"plan", "ask", "retrieve", "mix"})
ECHO_KINDS = frozenset({"plan", "ask", "retrieve"})
DEFAULT_SWEEP = "25,50,100,150,200,300,400"
DEFAULT_OUT = REPO_ROOT / "build/bench/latest"
# In-flight calls get this long after the last send (the longest per-call deadline is Ask's).
DRAIN_S = ASK_DEADLINE_S + 1.0
# The client itself is saturated when it sends this late (p99): higher rates measure the client, not us.
CLIENT_LAG_LIMIT_MS = 25.0

EXIT_OK, EXIT_SLO, EXIT_USAGE, EXIT_SERVER = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snaprag bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", action="append", default=[], metavar="KIND@LOAD",
                    help=f"run this phase instead of the standard ones (repeatable). KIND: {', '.join(KINDS)}; "
                         "LOAD: a rate in requests/s (open loop) or cN (closed loop, N in flight)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds per phase sent but not measured (default 2)")
    ap.add_argument("--max-requests", type=int, default=20_000,
                    help="most requests one phase may send, whatever its rate and duration (default 20000)")
    ap.add_argument("--sweep-rates", default=DEFAULT_SWEEP,
                    help=f"mix rates of the capacity sweep, requests/s, ascending (default {DEFAULT_SWEEP})")
    ap.add_argument("--sweep-duration", type=float, default=5.0, help="measured seconds per sweep step (default 5)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the capacity sweep")
    ap.add_argument("--no-baseline", action="store_true", help="do not start or measure the naive baseline")
    ap.add_argument("--no-echo", action="store_true", help="do not start or measure the echo server")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 3 s phases, 1 s warm-up, a 3-step sweep of 2 s steps")
    ap.add_argument("--mix", default="plan=0.6,ask=0.2,retrieve=0.2", help="weights of the mix kind")
    ap.add_argument("--plan-deadline-ms", type=float, default=150.0, help="deadline of each Plan call (default 150)")
    ap.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT,
                    help=f"most calls in flight per phase (default {DEFAULT_MAX_IN_FLIGHT}); past it sending waits, "
                         "and the wait counts in the latency")
    ap.add_argument("--seed", type=int, default=0, help="arrival times and requests per seed (default 0)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default build/bench/latest)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--config", help="TOML config: its [slo] table, and the config of the server the bench starts "
                                     "(default snaprag.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override a config field, e.g. --set slo.plan_p99_ms=100 (repeatable)")
    add_connection_args(ap, default_target=None,
                        target_help="measure the server at this address instead of starting one "
                                    "(loopback, or an address you give; nothing else is contacted)")
    return ap


def _mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise ValueError(f"--mix {text!r}: expected NAME=WEIGHT,... e.g. plan=0.6,ask=0.2,retrieve=0.2") from None
        if not sep:
            raise ValueError(f"--mix {text!r}: expected NAME=WEIGHT,...")
    return out


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sweep-rates {text!r}: expected comma-separated numbers, e.g. 25,50,100") from None
    if not rates or any(r <= 0 or math.isinf(r) for r in rates) or rates != sorted(rates):
        raise ValueError(f"--sweep-rates {text!r}: positive rates in ascending order")
    return rates


class Progress:
    """One tqdm bar per phase on stderr, with errors and in-flight calls."""

    def __init__(self, desc: str, total: int | None) -> None:
        from tqdm import tqdm

        # disable=None: a bar on a terminal only; logs and CI get the one summary line per phase
        self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=False, mininterval=0.5,
                        dynamic_ncols=True, disable=None)
        self.errors = 0

    def done(self, shot: Shot) -> None:
        obs = shot.result
        if obs is None or getattr(obs, "code", "OK") != "OK":
            self.errors += 1
            self.bar.set_postfix(errors=self.errors, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def run_phase(traffic: Traffic, spec: PhaseSpec, *, duration_s: float, warmup_s: float, seed: int,
                    max_requests: int, max_in_flight: int, desc: str,
                    progress: Callable[[str, int | None], Progress] | None = None) -> PhaseStats:
    """One phase: warm-up then measurement, bounded by `max_requests` and warm-up + duration seconds."""
    total_s = warmup_s + duration_s
    stats = PhaseStats()
    if spec.rate is not None:
        offsets = poisson_offsets(spec.rate, total_s, max_count=max_requests, rng=np.random.default_rng(seed))
        bar = progress(desc, len(offsets)) if progress else None
        op = traffic.operation(spec.kind, max_count=max(len(offsets), 1))
        shots = await open_loop(op, offsets, time_limit_s=total_s, drain_s=DRAIN_S, max_in_flight=max_in_flight,
                                on_done=bar.done if bar else None)
        start = shots[0].intended - float(offsets[0]) if shots else 0.0
    else:
        assert spec.concurrency is not None
        bar = progress(desc, None) if progress else None
        op = traffic.operation(spec.kind, max_count=max_requests)
        start = time.perf_counter()
        shots = await closed_loop(op, concurrency=spec.concurrency, max_count=max_requests, time_limit_s=total_s,
                                  drain_s=DRAIN_S, on_done=bar.done if bar else None)
    if bar:
        bar.close()
    for shot in shots:
        stats.add(shot, measured=shot.intended - start >= warmup_s)
    return stats


def _summary_line(target: str, label: str, s: PhaseStats) -> str:
    parts = []
    for metric in ("plan", "retrieve", "first_chunk", "fallback_after_miss"):
        h = s.latency.get(metric)
        if h is not None and h.count:
            parts.append(f"{metric} p50 {h.percentile_ms(50):.1f} p99 {h.percentile_ms(99):.1f} ms")
    errs = sum(s.errors.values())
    return (f"  {target:<8} {label:<12} {sum(s.calls.values()):>6} calls {s.achieved_rate:7.1f}/s  "
            + "; ".join(parts) + (f"  errors {errs}" if errs else "")
            + (f"  invalid {s.invalid_plans} unsafe {s.unsafe_plans}" if s.invalid_plans or s.unsafe_plans else ""))


def _server_config(args: argparse.Namespace, out: Path) -> Path:
    """The config file of the snaprag server the bench starts: the user's (or snaprag.toml) plus the
    miss-probe profile."""
    base = Path(args.config) if args.config else DEFAULT_CONFIG_PATH
    text = base.read_text(encoding="utf-8")
    path = out / "snaprag-bench.toml"
    if f"[profiles.{MISS_PROFILE}]" not in text:
        text += "\n" + MISS_PROFILE_TOML
    path.write_text(text, encoding="utf-8")
    return path


async def _probe(client: AssistantClient, name: str, address: str) -> str | None:
    """None when the server answers a Plan; else a message naming the fix."""
    try:
        await client.plan("amr-001", fault_code="E302", timeout_s=10.0)
        return None
    except grpc.aio.AioRpcError as e:
        fix = ("start one with `make run`, or leave out --target so the bench starts its own"
               if name == "snaprag" else "see its log in the output folder")
        return f"{name} at {address} does not answer ({e.code().name}: {e.details()}); {fix}"


async def _has_miss_profile(client: AssistantClient) -> bool:
    try:
        await client.plan("amr-001", fault_code="E302", profile=MISS_PROFILE, timeout_s=5.0)
    except grpc.aio.AioRpcError as e:
        # only "unknown profile" says it is missing; any other failure will show in the phase itself
        return not (e.code() == grpc.StatusCode.INVALID_ARGUMENT and "profile" in (e.details() or ""))
    return True


async def bench(args: argparse.Namespace, cfg: Config) -> tuple[BenchRun, int]:
    from bench import servers
    from bench.echo import capture_canned, save_canned

    out: Path = args.out  # created by main
    run = BenchRun(meta={**machine_info(), "command": args.command_line}, slo=cfg.slo)
    if args.phase:
        plan = [(PhaseSpec.parse(p, KINDS), ("snaprag", "baseline", "echo")) for p in args.phase]
    else:
        plan = [(PhaseSpec.parse(label, KINDS), targets) for label, targets in STANDARD]
    plan = [(spec, tuple(t for t in targets if (t == "snaprag" or (t == "baseline" and not args.no_baseline
                                                                   and spec.kind in BASELINE_KINDS)
                                                or (t == "echo" and not args.no_echo and spec.kind in ECHO_KINDS))))
            for spec, targets in plan]
    wanted = {t for _, targets in plan for t in targets}
    mix = _mix(args.mix)
    started: list[servers.StartedServer] = []
    clients: dict[str, AssistantClient] = {}
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    overrides = [a for x in args.set for a in ("--set", x)]
    try:
        if args.target:
            address = args.target
            clients["snaprag"] = client_from_args(args, timeout_s=10.0)
            log(f"bench: measuring snaprag at {address}")
        else:
            log("bench: starting snaprag (loopback, free port) ...")
            s = servers.start("snaprag", ["-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                                          "--config", str(_server_config(args, out)), *overrides],
                              out / "snaprag.log")
            started.append(s)
            address = s.address
            clients["snaprag"] = AssistantClient(address, timeout_s=10.0, retries=0)
        problem = await _probe(clients["snaprag"], "snaprag", address)
        if problem:
            log(f"bench: {problem}")
            return run, EXIT_SERVER
        if "baseline" in wanted:
            log("bench: starting the naive baseline server ...")
            s = servers.start("baseline", ["-m", "bench.baseline", "--port", "0"], out / "baseline.log")
            started.append(s)
            clients["baseline"] = AssistantClient(s.address, timeout_s=10.0, retries=0)
        if "echo" in wanted:
            traffic0 = Traffic(clients["snaprag"], seed=args.seed)
            first = traffic0.situations[0]
            canned = await capture_canned(clients["snaprag"], plan_kwargs={"robot_id": first.robot_id,
                                                                           **first.kwargs()},
                                          question=traffic0.retrieve_questions[0])
            save_canned(canned, out / "echo_responses.json")
            log("bench: starting the echo server (snaprag's responses, canned) ...")
            s = servers.start("echo", ["-m", "bench.echo", "--port", "0", "--responses",
                                       str(out / "echo_responses.json")], out / "echo.log")
            started.append(s)
            clients["echo"] = AssistantClient(s.address, timeout_s=10.0, retries=0)
        for name in ("baseline", "echo"):
            if name in clients:
                problem = await _probe(clients[name], name, "loopback")
                if problem:
                    log(f"bench: {problem}")
                    return run, EXIT_SERVER
        if any(spec.kind == "miss" for spec, _ in plan) and not await _has_miss_profile(clients["snaprag"]):
            run.notes.append(f"miss phases skipped: the server at {address} has no [profiles.{MISS_PROFILE}]; add it "
                             f"to its config to measure the fallback path:{MISS_PROFILE_TOML}")
            plan = [(spec, targets) for spec, targets in plan if spec.kind != "miss"]

        traffic = {name: Traffic(c, seed=args.seed, plan_deadline_ms=args.plan_deadline_ms, mix=mix,
                                 canned=name == "echo") for name, c in clients.items()}
        common = {"warmup_s": args.warmup, "max_requests": args.max_requests, "max_in_flight": args.max_in_flight,
                  "progress": Progress}
        log(f"bench: {sum(len(t) for _, t in plan)} phases of {args.warmup:g} s warm-up + {args.duration:g} s")
        for i, (spec, targets) in enumerate(plan):
            for target in targets:
                stats = await run_phase(traffic[target], spec, duration_s=args.duration, seed=args.seed + i,
                                        desc=f"{target} {spec.label}", **common)  # type: ignore[arg-type]
                run.phases.append(PhaseRun(target, spec, stats, args.duration, args.warmup))
                log(_summary_line(target, spec.label, stats))

        if not args.no_sweep:
            rates = _rates(args.sweep_rates)
            log(f"bench: capacity sweep, mix at {', '.join(f'{r:g}' for r in rates)} req/s until an SLO fails")
            sweep_warmup = min(args.warmup, 1.0)
            for j, rate in enumerate(rates):
                spec = PhaseSpec("mix", rate=rate)
                stats = await run_phase(traffic["snaprag"], spec, duration_s=args.sweep_duration,
                                        seed=args.seed + 100 + j, desc=f"sweep {rate:g}/s",
                                        **{**common, "warmup_s": sweep_warmup})  # type: ignore[arg-type]
                v = verdict(cfg.slo, [(f"sweep mix@{rate:g}", stats.measured())])
                run.sweep.append(SweepStep(rate, stats, v))
                log(_summary_line("sweep", spec.label, stats) + ("" if v.passed else "  <- SLO fails"))
                lag = stats.send_lag.percentile_ms(99) if stats.send_lag.count else 0.0
                if lag > CLIENT_LAG_LIMIT_MS:
                    run.notes.append(f"the sweep stopped at {rate:g}/s: this client sent {lag:.0f} ms late at p99, so "
                                     "higher rates would measure the load generator, not the server")
                    break
                if not v.passed:
                    break
    finally:
        for c in clients.values():
            await c.close()
        for s in started:
            s.stop()
    run.meta["loadavg_end"] = list(os.getloadavg())
    run.verdict = verdict(cfg.slo, [(f"{p.target} {p.spec.label}", p.stats.measured()) for p in run.phases
                                    if p.target == "snaprag"])
    load = run.meta["loadavg_start"][0]
    if load > 0.5 * (os.cpu_count() or 1):
        run.notes.append(f"the machine was busy when the run started (load average {load:.2f} on "
                         f"{os.cpu_count()} CPUs): other work shared the cores, so tails are inflated")
    return run, EXIT_OK if run.verdict.passed else EXIT_SLO


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Config]:
    """Flags and the config, every value checked up front (ValueError / ConfigError name the flag or key)."""
    args = _parser().parse_args(list(argv))
    args.command_line = " ".join(["snaprag bench", *argv])
    if args.quick:
        args.duration, args.warmup, args.sweep_duration = min(args.duration, 3.0), min(args.warmup, 1.0), 2.0
        if args.sweep_rates == DEFAULT_SWEEP:
            args.sweep_rates = "25,50,100"
    if args.duration <= 0 or args.warmup < 0 or args.sweep_duration <= 0 or args.max_requests < 1:
        raise ValueError("--duration, --sweep-duration and --max-requests must be positive, --warmup >= 0")
    cfg = load_config(args.config, overrides=args.set)
    objectives(cfg.slo)
    for p in args.phase:
        PhaseSpec.parse(p, KINDS)
    _mix(args.mix)
    _rates(args.sweep_rates)
    return args, cfg


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except (ConfigError, ValueError) as e:
        print(f"snaprag bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    import uvloop

    from bench.servers import ServerStartError

    args.out.mkdir(parents=True, exist_ok=True)

    try:
        run, code = uvloop.run(bench(args, cfg))
    except ServerStartError as e:
        print(f"snaprag bench: {e}", file=sys.stderr)
        return EXIT_SERVER
    except ValueError as e:  # a bad TLS / token flag
        print(f"snaprag bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    if code == EXIT_SERVER:
        return code
    paths = write_outputs(run, args.out)
    if not args.no_plots:
        from bench.plots import write_plots

        write_plots(run, args.out)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"\n{run.verdict.headline()}")
    plots = "" if args.no_plots else ", cdf.png, stages.png, sweep.png"
    print(f"results: {args.out}/ (results.json, results.md{plots}, server logs)")
    return code


if __name__ == "__main__":
    sys.exit(main())
