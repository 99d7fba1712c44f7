"""bench.slo: the SLO table from config, each check's pass / FAIL / n/a, and the verdict of a run."""

from __future__ import annotations

import pytest

from bench.histogram import LatencyHistogram
from bench.slo import Measured, check, objectives, verdict
from server.config import ConfigError, SloConfig, load_config


def hist(*values_ms: float) -> LatencyHistogram:
    h = LatencyHistogram()
    h.record_many_ms(values_ms)
    return h


def robot_phase(plan_ms: list[float], *, errors: int = 0, invalid: int = 0, unsafe: int = 0,
                fallback_ms: list[float] | None = None) -> Measured:
    latency = {"plan": hist(*plan_ms)}
    if fallback_ms:
        latency["fallback_after_miss"] = hist(*fallback_ms)
    return Measured(latency=latency, calls={"Plan": len(plan_ms)}, errors={"Plan": errors}, invalid_plans=invalid,
                    unsafe_plans=unsafe, plans=len(plan_ms) - errors)


def by_name(checks: list, name: str):  # type: ignore[no-untyped-def]
    return next(c for c in checks if c.name == name)


def test_table_comes_from_config_with_the_issue_defaults() -> None:
    cfg = load_config(env={})
    rows = {o.name: (o.metric, o.percentile, o.limit_ms) for o in objectives(cfg.slo)}
    assert rows == {"Plan p95": ("plan", 95.0, 130.0), "Plan p99": ("plan", 99.0, 150.0),
                    "fallback after a miss p99": ("fallback_after_miss", 99.0, 40.0),
                    "voice first chunk p99": ("first_chunk", 99.0, 800.0),
                    "Retrieve p99": ("retrieve", 99.0, 120.0)}
    tight = load_config(env={}, overrides=["slo.plan_p99_ms=100", "slo.plan_p95_ms=90"])
    assert [o.limit_ms for o in objectives(tight.slo)][:2] == [90.0, 100.0]


def test_healthy_robot_phase_passes() -> None:
    m = robot_phase([10.0] * 95 + [120.0] * 5)  # p95 = 10 ms, p99 = 120 ms
    v = verdict(SloConfig(), {"snaprag plan@50": m})
    assert v.passed, v.headline()
    assert by_name(v.checks, "Plan p95").measured == pytest.approx(10.0, rel=1e-3)
    assert by_name(v.checks, "Plan p99").status == "pass"
    # nothing in a Plan-only phase exercises these: n/a, neither pass nor fail
    assert by_name(v.checks, "voice first chunk p99").status == "n/a"
    assert by_name(v.checks, "Retrieve p99").passed is None
    assert v.headline().startswith("SLO verdict: PASS")


def test_tail_above_the_limit_fails_and_is_named() -> None:
    m = robot_phase([10.0] * 97 + [160.0] * 3)  # p95 fine, p99 = 160 ms > 150
    v = verdict(SloConfig(), [("snaprag plan@50", m)])
    assert not v.passed
    assert [c.name for c in v.failures] == ["Plan p99"]
    assert "Plan p99" in v.headline() and "snaprag plan@50" in v.headline() and "FAIL" in v.headline()


def test_limit_is_inclusive_up_to_the_histogram_precision() -> None:
    # HDR reports the top of a value's 0.1 % bucket (conservative): 149 ms is under 150, 151 is over.
    assert by_name(check(SloConfig(), "p", robot_phase([149.0] * 10)), "Plan p99").status == "pass"
    assert by_name(check(SloConfig(), "p", robot_phase([151.0] * 10)), "Plan p99").status == "FAIL"


def test_errors_invalid_and_unsafe_plans_fail() -> None:
    slo = SloConfig()
    assert by_name(check(slo, "p", robot_phase([5.0] * 1000, errors=1)), "Plan error rate").status == "pass"  # 0.1 %
    assert by_name(check(slo, "p", robot_phase([5.0] * 1000, errors=2)), "Plan error rate").status == "FAIL"
    assert by_name(check(slo, "p", robot_phase([5.0] * 10, invalid=1)), "invalid plans").status == "FAIL"
    assert by_name(check(slo, "p", robot_phase([5.0] * 10, unsafe=1)), "unsafe plans").status == "FAIL"


def test_fallback_after_miss_checked_only_when_a_miss_happened() -> None:
    slo = SloConfig()
    assert by_name(check(slo, "p", robot_phase([5.0] * 10)), "fallback after a miss p99").status == "n/a"
    slow = robot_phase([5.0] * 10, fallback_ms=[3.0] * 50 + [55.0] * 2)
    assert by_name(check(slo, "p", slow), "fallback after a miss p99").status == "FAIL"


def test_every_phase_counts_and_empty_run_has_no_verdict() -> None:
    good, bad = robot_phase([5.0] * 100), robot_phase([500.0] * 100)
    assert not verdict(SloConfig(), {"a": good, "b": bad}).passed
    empty = verdict(SloConfig(), {})
    assert not empty.passed and "NO DATA" in empty.headline()


@pytest.mark.parametrize(("override", "message"), [
    ("slo.plan_p95_ms=200", "plan_p95_ms (200.0) must not exceed slo.plan_p99_ms"),
    ("slo.retrieve_p99_ms=0", "slo.retrieve_p99_ms: must be a positive number"),
    ("slo.max_error_rate=2", "slo.max_error_rate: a share in [0, 1]"),
])
def test_bad_slo_values_name_the_key(override: str, message: str) -> None:
    cfg = load_config(env={}, overrides=[override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        objectives(cfg.slo)
