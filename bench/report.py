"""What a bench run produced, and its outputs: JSON (raw figures + machine info) and a markdown report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.slo import Verdict, objectives
from bench.traffic import PhaseStats
from server.config import REPO_ROOT, SloConfig

TARGETS = ("snaprag", "baseline", "echo")


@dataclass(frozen=True)
class PhaseSpec:
    """`KIND@RATE` (open loop, Poisson arrivals at RATE requests/s) or `KIND@cN` (closed loop, N in flight)."""

    kind: str
    rate: float | None = None
    concurrency: int | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.rate:g}" if self.rate is not None else f"{self.kind}@c{self.concurrency}"

    @classmethod
    def parse(cls, text: str, kinds: tuple[str, ...]) -> PhaseSpec:
        kind, sep, load = text.partition("@")
        if not sep or kind not in kinds:
            raise ValueError(f"--phase {text!r}: expected KIND@RATE or KIND@cN with KIND one of {', '.join(kinds)} "
                             "(e.g. plan@50, mix@c8)")
        try:
            if load.startswith("c"):
                n = int(load[1:])
                if n < 1:
                    raise ValueError
                return cls(kind, concurrency=n)
            rate = float(load)
            if not rate > 0 or math.isinf(rate):
                raise ValueError
            return cls(kind, rate=rate)
        except ValueError:
            raise ValueError(f"--phase {text!r}: the load after @ must be a positive rate (50) or cN with N >= 1 "
                             "(c8)") from None


@dataclass
class PhaseRun:
    target: str
    spec: PhaseSpec
    stats: PhaseStats
    duration_s: float
    warmup_s: float


@dataclass
class SweepStep:
    rate: float
    stats: PhaseStats
    verdict: Verdict


@dataclass
class BenchRun:
    meta: dict[str, Any]
    slo: SloConfig
    phases: list[PhaseRun] = field(default_factory=list)
    sweep: list[SweepStep] = field(default_factory=list)
    verdict: Verdict = field(default_factory=lambda: Verdict([]))
    notes: list[str] = field(default_factory=list)

    def phase(self, target: str, label: str) -> PhaseRun | None:
        return next((p for p in self.phases if p.target == target and p.spec.label == label), None)

    def max_rate_at_slo(self) -> float | None:
        """Highest swept rate at which every SLO held, with every lower rate holding too."""
        best = None
        for step in sorted(self.sweep, key=lambda s: s.rate):
            if not step.verdict.passed:
                break
            best = step.rate
        return best


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import grpc
    import numpy

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "host": platform.node(),
            "cpus": os.cpu_count(), "cpu_model": cpu, "machine": platform.machine(),
            "python": platform.python_version(), "grpcio": grpc.__version__, "numpy": numpy.__version__,
            "commit": commit, "loadavg_start": list(os.getloadavg()), "command": " ".join(sys.argv)}


# ---------------------------------------------------------------------------------------------- figures
def _pct(run: BenchRun, target: str, label: str, metric: str, p: float) -> float | None:
    ph = run.phase(target, label)
    if ph is None:
        return None
    h = ph.stats.latency.get(metric)
    return h.percentile_ms(p) if h is not None and h.count else None


@dataclass(frozen=True)
class RatioRow:
    figure: str
    snaprag: float | None
    baseline: float | None
    echo: float | None

    def ratio(self, other: float | None) -> float | None:
        return None if self.snaprag is None or not other else self.snaprag / other


def ratio_rows(run: BenchRun, rate: str = "50") -> list[RatioRow]:
    """Latency figures of snaprag next to the baseline and the echo server, same run, same load."""
    rows = []
    for name, label, metric, p in (("Plan p50", f"plan@{rate}", "plan", 50.0),
                                   ("Plan p99", f"plan@{rate}", "plan", 99.0),
                                   ("Retrieve p50", f"retrieve@{rate}", "retrieve", 50.0),
                                   ("Retrieve p99", f"retrieve@{rate}", "retrieve", 99.0)):
        rows.append(RatioRow(f"{name} @ {rate}/s", *(_pct(run, t, label, metric, p) for t in TARGETS)))
    for p in (50.0, 99.0):  # our servicer with nothing to do (a safety rule answers) against bare gRPC
        rows.append(RatioRow(f"empty-pipeline Plan p{p:g} @ {rate}/s (vs echo Plan)",
                             _pct(run, "snaprag", f"empty@{rate}", "kind:empty", p), None,
                             _pct(run, "echo", f"plan@{rate}", "plan", p)))
    for p in (50.0, 95.0):
        rows.append(RatioRow(f"voice first chunk p{p:g} (mix @ {rate}/s)",
                             _pct(run, "snaprag", f"mix@{rate}", "first_chunk", p),
                             _pct(run, "baseline", f"mix@{rate}", "first_chunk", p), None))
    return rows


def _f(x: float | None, unit: str = "") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}{unit}"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


# ---------------------------------------------------------------------------------------------- markdown
def markdown(run: BenchRun) -> str:
    m = run.meta
    out = [f"# snaprag bench, {m.get('date_utc', '')} UTC", ""]
    out.append(f"Command: `{m.get('command', '')}`  ")
    out.append(f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model') or m.get('machine')}), Python {m.get('python')}, "
               f"grpcio {m.get('grpcio')}, commit {m.get('commit') or '?'}; load average "
               f"{_load(m.get('loadavg_start'))} at the start, {_load(m.get('loadavg_end'))} at the end.  ")
    out.append("Latency is client-side, end to end, from each request's intended send time (open-loop Poisson "
               "arrivals; no coordinated omission), warm-up excluded; percentiles from HDR histograms (0.1 %).")
    out.append("")
    out.append(f"## {run.verdict.headline()}")
    out.append("")
    out.append("| phase | check | limit | measured | samples | status |")
    out.append("|---|---|---|---|---|---|")
    for c in run.verdict.measured:
        if c.unit == "%":
            lim, got = f"{c.limit * 100:g} %", f"{(c.measured or 0.0) * 100:.2f} %"
        elif c.unit == "ms":
            lim, got = f"{c.limit:g} ms", f"{c.measured:.1f} ms"
        else:
            lim, got = f"{c.limit:g}", f"{c.measured:g}"
        out.append(f"| {c.scope} | {c.name} | {lim} | {got} | {c.samples} | {c.status} |")
    na = len(run.verdict.checks) - len(run.verdict.measured)
    if na:
        out.append("")
        out.append(f"({na} checks were n/a: nothing in that phase exercises them, e.g. no Ask in a plan phase.)")
    out.append("")

    out.append("## Latency by phase (ms)")
    out.append("")
    out.append("| target | phase | metric | n | achieved/s | p50 | p95 | p99 | p99.9 | max | errors | modes | "
               "invalid / unsafe plans |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for ph in run.phases:
        s = ph.stats
        for metric in ("plan", "fallback_after_miss", "retrieve", "ask", "first_chunk"):
            h = s.latency.get(metric)
            if h is None or not h.count:
                continue
            pc = h.percentiles_ms((50, 95, 99, 99.9))
            rpc = {"plan": "Plan", "fallback_after_miss": "Plan", "retrieve": "Retrieve"}.get(metric, "Ask")
            modes = ", ".join(f"{k.split(' ', 1)[1]} {v}" for k, v in sorted(s.modes.items()) if k.startswith(rpc))
            plans = f"{s.invalid_plans} / {s.unsafe_plans}" if rpc == "Plan" and metric == "plan" else ""
            out.append(f"| {ph.target} | {ph.spec.label} | {metric} | {h.count} | {s.achieved_rate:.1f} | "
                       f"{pc[50]:.1f} | {pc[95]:.1f} | {pc[99]:.1f} | {pc[99.9]:.1f} | {h.max_ms:.1f} | "
                       f"{s.errors.get(rpc, 0) if metric in ('plan', 'retrieve', 'ask') else ''} | {modes} | {plans} |")
    out.append("")

    out.append("## Server stages (server-reported elapsed ms; overhead = client latency − server total)")
    out.append("")
    out.append("| target | phase | stage | n | p50 | p99 | mean |")
    out.append("|---|---|---|---:|---:|---:|---:|")
    for ph in run.phases:
        s = ph.stats
        rows = [(k, h) for k, h in sorted(s.stages.items())] + \
               [(f"{k}/(server total)", h) for k, h in sorted(s.server_total.items())] + \
               [(f"{k}/(overhead)", h) for k, h in sorted(s.overhead.items())]
        for name, h in rows:
            if h.count:
                out.append(f"| {ph.target} | {ph.spec.label} | {name} | {h.count} | {h.percentile_ms(50):.2f} | "
                           f"{h.percentile_ms(99):.2f} | {h.mean_ms:.2f} |")
    out.append("")

    rows = ratio_rows(run)
    if any(r.baseline or r.echo for r in rows):
        out.append("## snaprag against the echo server and the naive baseline (same run, same load)")
        out.append("")
        out.append("| figure | snaprag ms | baseline ms | echo ms | snaprag / echo | snaprag / baseline |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            out.append(f"| {r.figure} | {_f(r.snaprag)} | {_f(r.baseline)} | {_f(r.echo)} | {_x(r.ratio(r.echo))} | "
                       f"{_x(r.ratio(r.baseline))} |")
        out.append("")

    if run.sweep:
        out.append("## Capacity sweep (mix, open loop)")
        out.append("")
        out.append("| offered/s | achieved/s | Plan p99 | first chunk p99 | Retrieve p99 | errors "
                   "| client send lag p99 | SLOs |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---|")
        for st in run.sweep:
            s = st.stats
            def p99(metric: str, s: PhaseStats = s) -> str:
                h = s.latency.get(metric)
                return _f(h.percentile_ms(99) if h is not None and h.count else None)
            failed = ", ".join(c.name for c in st.verdict.failures) or "all hold"
            out.append(f"| {st.rate:g} | {s.achieved_rate:.1f} | {p99('plan')} | {p99('first_chunk')} | "
                       f"{p99('retrieve')} | {sum(s.errors.values())} | {s.send_lag.percentile_ms(99):.1f} | "
                       f"{'pass' if st.verdict.passed else 'FAIL: ' + failed} |")
        best = run.max_rate_at_slo()
        out.append("")
        out.append(f"Max rate at SLO: **{best:g} req/s**" if best is not None else
                   "Max rate at SLO: none of the swept rates held every SLO")
        out.append("")
    if run.notes:
        out.append("## Notes")
        out.append("")
        out.extend(f"- {n}" for n in run.notes)
        out.append("")
    return "\n".join(out)


def _load(x: Any) -> str:
    return "/".join(f"{v:.2f}" for v in x) if x else "?"


# ---------------------------------------------------------------------------------------------- JSON
def to_json(run: BenchRun) -> dict[str, Any]:
    return {
        "meta": run.meta,
        "slo": dataclasses.asdict(run.slo),
        "slo_objectives": [dataclasses.asdict(o) for o in objectives(run.slo)],
        "verdict": {"passed": run.verdict.passed, "headline": run.verdict.headline(),
                    "checks": [{**dataclasses.asdict(c), "status": c.status} for c in run.verdict.checks]},
        "phases": [{"target": p.target, "phase": p.spec.label, "kind": p.spec.kind, "rate": p.spec.rate,
                    "concurrency": p.spec.concurrency, "duration_s": p.duration_s, "warmup_s": p.warmup_s,
                    **p.stats.to_dict()} for p in run.phases],
        "sweep": [{"rate": s.rate, "passed": s.verdict.passed, "failures": [c.name for c in s.verdict.failures],
                   **s.stats.to_dict(encoded=False)} for s in run.sweep],
        "max_rate_at_slo": run.max_rate_at_slo(),
        "ratios": [{**dataclasses.asdict(r), "snaprag_over_echo": r.ratio(r.echo),
                    "snaprag_over_baseline": r.ratio(r.baseline)} for r in ratio_rows(run)],
        "notes": run.notes,
    }


def write_outputs(run: BenchRun, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(_clean(to_json(run)), indent=1, allow_nan=False), encoding="utf-8")
    paths["markdown"].write_text(markdown(run), encoding="utf-8")
    return paths


def _clean(x: Any) -> Any:
    """NaN / inf -> null, so the JSON is strict (other tools choke on NaN)."""
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x
