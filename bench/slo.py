"""The SLO table ([slo] in snaprag.toml, server.config.SloConfig) and the pass/fail verdict of a run.

A check compares one measured figure with its limit: a latency percentile of one metric, an error rate
of one RPC, or a count of invalid plans. A check with nothing measured (no fallback happened, no Ask was
sent) is `n/a`: it neither passes nor fails, and the table says so. A verdict passes when at least one
check was measured and every measured check holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

from bench.histogram import LatencyHistogram
from server.config import ConfigError, SloConfig

# Metric names (keys of Measured.latency) and what they are.
METRICS = {
    "plan": "Plan, client end to end",
    "fallback_after_miss": "Plan after a stage miss: from the miss to the plan at the client",
    "first_chunk": "voice: question sent -> first answer chunk",
    "retrieve": "Retrieve, client end to end",
}


@dataclass(frozen=True)
class Objective:
    name: str
    metric: str
    percentile: float
    limit_ms: float


def objectives(slo: SloConfig) -> list[Objective]:
    """The latency rows of the table, after checking the values make sense (ConfigError names the key)."""
    for f in fields(slo):
        v = getattr(slo, f.name)
        if not isinstance(v, int | float) or math.isnan(v) or v < 0 or (f.name.endswith("_ms") and v == 0):
            raise ConfigError(f"slo.{f.name}: must be a positive number, got {v!r}")
    if slo.plan_p95_ms > slo.plan_p99_ms:
        raise ConfigError(f"slo.plan_p95_ms ({slo.plan_p95_ms}) must not exceed slo.plan_p99_ms ({slo.plan_p99_ms})")
    if slo.max_error_rate > 1:
        raise ConfigError(f"slo.max_error_rate: a share in [0, 1], got {slo.max_error_rate}")
    return [Objective("Plan p95", "plan", 95.0, slo.plan_p95_ms),
            Objective("Plan p99", "plan", 99.0, slo.plan_p99_ms),
            Objective("fallback after a miss p99", "fallback_after_miss", 99.0, slo.fallback_p99_ms),
            Objective("voice first chunk p99", "first_chunk", 99.0, slo.first_chunk_p99_ms),
            Objective("Retrieve p99", "retrieve", 99.0, slo.retrieve_p99_ms)]


@dataclass
class Measured:
    """What one phase measured, in the shape the checks read."""

    latency: dict[str, LatencyHistogram] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    """Calls per RPC ("Plan", "Ask", "Retrieve")."""
    errors: dict[str, int] = field(default_factory=dict)
    """Failed calls per RPC (any non-OK status)."""
    invalid_plans: int = 0
    unsafe_plans: int = 0
    plans: int = 0
    """Plans received (the invalid-plan check is n/a without any)."""


@dataclass(frozen=True)
class Check:
    scope: str
    """Where it was measured, e.g. "snaprag plan@50"."""
    name: str
    limit: float
    measured: float | None
    unit: str
    samples: int

    @property
    def status(self) -> str:
        if self.measured is None:
            return "n/a"
        return "pass" if self.measured <= self.limit else "FAIL"

    @property
    def passed(self) -> bool | None:
        return None if self.measured is None else self.measured <= self.limit

    def describe(self) -> str:
        if self.unit == "%":
            got = "–" if self.measured is None else f"{self.measured * 100:.2f} %"
            return f"{self.name} ≤ {self.limit * 100:g} %: {got}"
        got = "–" if self.measured is None else f"{self.measured:.1f} {self.unit}".rstrip()
        return f"{self.name} ≤ {self.limit:g} {self.unit}: {got}".replace("  ", " ")


def check(slo: SloConfig, scope: str, m: Measured) -> list[Check]:
    out: list[Check] = []
    for o in objectives(slo):
        h = m.latency.get(o.metric)
        n = h.count if h is not None else 0
        out.append(Check(scope, o.name, o.limit_ms, h.percentile_ms(o.percentile) if n else None, "ms", n))
    for rpc in sorted(m.calls):
        calls = m.calls[rpc]
        rate = m.errors.get(rpc, 0) / calls if calls else None
        out.append(Check(scope, f"{rpc} error rate", slo.max_error_rate, rate, "%", calls))
    for name, n, limit in (("invalid plans", m.invalid_plans, slo.max_invalid_plans),
                           ("unsafe plans", m.unsafe_plans, slo.max_unsafe_plans)):
        out.append(Check(scope, name, float(limit), float(n) if m.plans else None, "plans", m.plans))
    return out


@dataclass
class Verdict:
    checks: list[Check]

    @property
    def measured(self) -> list[Check]:
        return [c for c in self.checks if c.measured is not None]

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    @property
    def passed(self) -> bool:
        return bool(self.measured) and not self.failures

    def headline(self) -> str:
        if not self.measured:
            return "SLO verdict: NO DATA (nothing an SLO covers was measured)"
        if self.passed:
            return f"SLO verdict: PASS ({len(self.measured)} checks held)"
        worst = "; ".join(f"{c.scope}: {c.describe()}" for c in self.failures[:4])
        more = f" (+{len(self.failures) - 4} more)" if len(self.failures) > 4 else ""
        return f"SLO verdict: FAIL ({len(self.failures)} of {len(self.measured)} checks): {worst}{more}"


def verdict(slo: SloConfig, phases: Mapping[str, Measured] | Iterable[tuple[str, Measured]]) -> Verdict:
    items = phases.items() if isinstance(phases, Mapping) else phases
    checks: list[Check] = []
    for scope, m in items:
        checks.extend(check(slo, scope, m))
    return Verdict(checks)
