"""A short bench run against an in-process server (a second of load per phase), and the baseline and echo
servers it compares with. Checks what the run produced, never how fast it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.baseline import start_baseline
from bench.echo import capture_canned, start_echo
from bench.harness import EXIT_OK, EXIT_SLO, bench, parse_args, run_phase
from bench.report import PhaseSpec
from bench.traffic import MISS_PROFILE, MISS_PROFILE_TOML, Traffic
from clients.assistant import AssistantClient
from server.config import DEFAULT_CONFIG_PATH, Config, load_config
from server.proto import pb
from server.robot_plan import ActionVocabulary

GENEROUS = ["--set", "slo.plan_p95_ms=100000", "--set", "slo.plan_p99_ms=100000", "--set",
            "slo.fallback_p99_ms=100000", "--set", "slo.first_chunk_p99_ms=100000", "--set",
            "slo.retrieve_p99_ms=100000", "--set", "slo.max_error_rate=1"]


@pytest.fixture(scope="module")
def bench_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """snaprag.toml plus the miss-probe profile the bench adds to the servers it starts."""
    path = tmp_path_factory.mktemp("cfg") / "snaprag.toml"
    path.write_text(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8") + MISS_PROFILE_TOML, encoding="utf-8")
    return load_config(path, env={}, overrides=["server.port=0"])


async def _bench(address: str, out: Path, *extra: str) -> tuple[Any, int]:
    args, cfg = parse_args(["--target", address, "--phase", "plan@40", "--phase", "mix@40", "--phase", "miss@20",
                            "--phase", "retrieve@c2", "--duration", "1", "--warmup", "0.3", "--no-baseline",
                            "--no-echo", "--no-sweep", "--out", str(out), *extra])
    return await bench(args, cfg)


async def test_bench_smoke_run_measures_every_slo_and_writes_its_outputs(make_server: Any, bench_config: Config,
                                                                       tmp_path: Path) -> None:
    from bench.plots import write_plots
    from bench.report import write_outputs

    running, _ = await make_server(cfg=bench_config)
    run, code = await _bench(running.address, tmp_path, *GENEROUS)
    assert code == EXIT_OK, run.verdict.headline()
    assert [f"{p.target} {p.spec.label}" for p in run.phases] == [
        "snaprag plan@40", "snaprag mix@40", "snaprag miss@20", "snaprag retrieve@c2"]
    measured = {c.name for c in run.verdict.measured}
    assert {"Plan p95", "Plan p99", "fallback after a miss p99", "voice first chunk p99", "Retrieve p99",
            "invalid plans", "unsafe plans", "Plan error rate", "Ask error rate", "Retrieve error rate"} <= measured

    plan, mix, miss, closed = (p.stats for p in run.phases)
    assert plan.calls["Plan"] >= 10 and plan.invalid_plans == 0 and plan.unsafe_plans == 0
    assert plan.warmup > 0, "the warm-up requests were sent but not measured"
    assert {"Plan", "Ask", "Retrieve"} <= set(mix.calls)
    assert mix.latency["first_chunk"].count == mix.calls["Ask"]  # a failed Ask counts at its time to failure
    # the miss profile: retrieval always misses, so every plan is the fallback's and each was timed after the miss
    assert miss.modes == {"Plan FALLBACK": miss.plans} and miss.plans > 0
    assert miss.latency["fallback_after_miss"].count == miss.plans
    assert miss.latency["fallback_after_miss"].percentile_ms(50) < miss.latency["plan"].percentile_ms(50)
    assert closed.calls["Retrieve"] > 0 and "Retrieve/retrieve" in closed.stages
    assert "Plan/retrieve" in plan.stages
    assert plan.overhead["Plan"].count == plan.calls["Plan"] - plan.errors.get("Plan", 0)  # answered calls only

    paths = write_outputs(run, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["verdict"]["passed"] is True and data["meta"]["cpus"] >= 1
    assert data["phases"][0]["latency_ms"]["plan"]["hdr"]  # the raw histogram travels with the figures
    assert "SLO verdict: PASS" in paths["markdown"].read_text()
    assert {p.name for p in write_plots(run, tmp_path)} == {"cdf.png", "stages.png"}  # no sweep in this run


async def test_bench_exit_code_is_non_zero_when_an_slo_fails(make_server: Any, bench_config: Config,
                                                            tmp_path: Path) -> None:
    running, _ = await make_server(cfg=bench_config)
    args, cfg = parse_args(["--target", running.address, "--phase", "plan@30", "--duration", "0.5", "--warmup", "0",
                            "--no-baseline", "--no-echo", "--no-sweep", "--out", str(tmp_path),
                            "--set", "slo.plan_p95_ms=0.001", "--set", "slo.plan_p99_ms=0.001"])
    run, code = await bench(args, cfg)
    assert code == EXIT_SLO
    assert {"Plan p95", "Plan p99"} <= {c.name for c in run.verdict.failures}


async def test_miss_phases_are_skipped_with_the_fix_when_the_server_lacks_the_profile(make_server: Any,
                                                                                        tmp_path: Path) -> None:
    running, _ = await make_server()  # the plain config: no bench_miss profile
    args, cfg = parse_args(["--target", running.address, "--phase", "miss@20", "--phase", "plan@20", "--duration",
                            "0.3", "--warmup", "0", "--no-baseline", "--no-echo", "--no-sweep", "--out",
                            str(tmp_path)])
    run, _ = await bench(args, cfg)
    assert [p.spec.label for p in run.phases] == ["plan@20"]
    assert any(f"[profiles.{MISS_PROFILE}]" in n for n in run.notes)


async def test_echo_returns_snaprag_responses_byte_for_byte(client: AssistantClient) -> None:
    canned = await capture_canned(client, plan_kwargs={"robot_id": "fl-004", "fault_code": "E202",
                                                       "carrying_load": True}, question="how do i reset my plug")
    server, address = await start_echo(canned)
    try:
        echo = AssistantClient(address, retries=0)
        plan = await echo.plan("anything")
        assert plan.SerializeToString() == canned["Plan"][0] and plan.steps
        events = [ev.SerializeToString() async for ev in echo.ask_stream("anything")]
        assert events == canned["Ask"]
        stats = await run_phase(Traffic(echo, canned=True), PhaseSpec("plan", rate=50), duration_s=0.3,
                                warmup_s=0, seed=0, max_requests=100, max_in_flight=8, desc="echo")
        assert stats.calls["Plan"] > 0 and not stats.errors
        assert not stats.stages and not stats.server_total, "canned timings are not the echo server's"
        assert stats.plans == stats.calls["Plan"] and stats.unsafe_plans == stats.invalid_plans == 0
        await echo.close()
    finally:
        await server.stop(0)


async def test_baseline_serves_the_same_api_naively() -> None:
    server, address, n = await start_baseline()
    try:
        assert n > 500
        c = AssistantClient(address, retries=0)
        plan = await c.plan("fl-004", fault_code="E202", carrying_load=True)
        vocab = ActionVocabulary.load()
        assert plan.steps and plan.source == pb.RETRIEVED
        assert all(s.action in vocab.names for s in plan.steps)
        got = await c.retrieve("how do i reset my smart plug", k=3)
        assert [sp.rank for sp in got.passages] == [1, 2, 3] and "plug" in got.passages[0].passage.id
        answer = await c.ask("how do i reset my smart plug")
        assert answer.chunks and answer.final.generator == "baseline"
        await c.close()
    finally:
        await server.stop(0)
