"""The server as a user starts it (`make run` runs `snaprag serve`), called with the project's CLI."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.assistant import AssistantClient, transcript

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _snaprag() -> list[str]:
    exe = Path(sys.executable).parent / "snaprag"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    # Delay-based shedding is off here: on a CPU-starved CI box it rightly refuses some of the drain test's
    # 50 Plans/s with RESOURCE_EXHAUSTED, which is not what that test is about (tests/faults/test_load.py is).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR",
           "SNAPRAG__OBSERVABILITY__METRICS_PORT": "0", "SNAPRAG__ADMISSION__ROBOT_MAX_DELAY_MS": "0",
           "SNAPRAG__ADMISSION__VOICE_MAX_DELAY_MS": "0", "SNAPRAG__ADMISSION__RETRIEVE_MAX_DELAY_MS": "0"}
    proc = subprocess.Popen([*_snaprag(), "serve", "--host", "127.0.0.1", "--port", "0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = ""
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"snaprag serving on (\S+)", line)
        if m:
            address = m.group(1)
            break
    if not address:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
    yield proc, address
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_snaprag(), *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GRPC_VERBOSITY": "ERROR"})


def test_health_ask_plan_retrieve_through_the_cli(served: tuple[subprocess.Popen[str], str]) -> None:
    _, address = served
    health = _cli("health", "--target", address)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"

    ask = _cli("ask", "--target", address, "how do i reset my smart plug")
    assert ask.returncode == 0, ask.stderr
    assert "Smart Plug" in ask.stdout and "retrieve=" in ask.stdout
    # FULL, unless a starved CI box made retrieval miss its budget: then the CLI must show the fallback and why.
    assert "mode=FULL" in ask.stdout or ("MISSED_BUDGET" in ask.stdout and "fallback=" in ask.stdout), ask.stdout

    plan = _cli("plan", "--target", address, "--robot", "fl-004", "--fault", "E202", "--loaded")
    assert plan.returncode == 0, plan.stderr
    assert re.search(r"1\. (emergency_)?stop\(\)", plan.stdout) and "2. hold_load()" in plan.stdout

    bad = _cli("retrieve", "--target", address, "plug", "-k", "500")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: k: must be in 1..100" in bad.stderr


def test_sigterm_drains_under_load_and_exits_cleanly(served: tuple[subprocess.Popen[str], str]) -> None:
    """SIGTERM while Plan traffic flows and a Converse stream is mid-utterance: health goes NOT_SERVING,
    new calls are refused with UNAVAILABLE (retryable elsewhere), the open stream still gets its answer,
    and the process exits 0 well inside the grace period."""
    proc, address = served
    calls, signalled_at, events, health_seen = asyncio.run(_drain_scenario(proc, address))
    assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert "draining" in err and "stopped after draining" in err

    # A call answered before the signal was served normally. A call sent before the signal may still reach
    # the server after it (the request is in the client's or the kernel's queue on a loaded box), so calls in
    # flight at the signal and calls sent after it may each be answered or refused as retryable (UNAVAILABLE).
    # One exception, gRPC's and not ours (grpc/grpc#41785): a call that reaches the gRPC server in the instant
    # it closes, before any handler took it, is dropped as CANCELLED. The server keeps its port open, refusing
    # with UNAVAILABLE, for server.shutdown_refuse_s (0.5 s) first, so that race can only hit calls sent later.
    def allowed(sent: float, code: Any) -> bool:
        return code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE) or (
            code == grpc.StatusCode.CANCELLED and sent >= signalled_at + 0.4)

    done_before = [code for sent, done, code in calls if done < signalled_at]
    late = [code for sent, done, code in calls if sent >= signalled_at + 1.0]
    assert done_before and set(done_before) == {grpc.StatusCode.OK}
    odd = [(round(sent - signalled_at, 3), round(done - signalled_at, 3), code) for sent, done, code in calls
           if not allowed(sent, code)]
    assert not odd, f"calls ended otherwise than OK or UNAVAILABLE (times from the signal): {odd}"
    assert late and grpc.StatusCode.OK not in late and grpc.StatusCode.UNAVAILABLE in late  # new work refused
    final = next(ev.final for ev in events if ev.HasField("final"))
    assert "plug" in final.answer_text.lower()  # the in-flight stream finished its answer
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health_seen


async def _drain_scenario(proc: subprocess.Popen[str], address: str
                          ) -> tuple[list[tuple[float, float, Any]], float, list[Any], list[Any]]:
    """Returns every Plan call as (sent, answered, code) on the monotonic clock, the moment SIGTERM was sent,
    the Converse stream's events and the health statuses a Watch saw."""
    client = AssistantClient(address, timeout_s=5.0, retries=0)
    final_may_go = asyncio.Event()

    async def utterance() -> AsyncIterator[Any]:
        yield transcript("how do i reset my", is_final=False, sequence=1, stability=0.3)
        await final_may_go.wait()
        yield transcript("how do i reset my smart plug", is_final=True, sequence=2)

    conv = asyncio.create_task(_collect(client.converse(utterance(), timeout_s=20)))
    health_seen: list[Any] = []

    async def watch_health() -> None:
        async with grpc.aio.insecure_channel(address) as ch:
            async for reply in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest()):
                health_seen.append(reply.status)
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return  # a Watch left open would hold the drain for the whole grace period

    watcher = asyncio.create_task(watch_health())
    signalled_at = float("inf")
    calls: list[tuple[float, float, Any]] = []

    async def plan_load() -> None:  # ~50 Plan calls a second for 3 s, open loop
        async def one() -> None:
            sent = time.monotonic()
            try:
                await client.plan("fl-004", fault_code="E202", carrying_load=True)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
            calls.append((sent, time.monotonic(), code))

        tasks = []
        for _ in range(150):
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)

    load = asyncio.create_task(plan_load())
    await asyncio.sleep(0.8)
    signalled_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    final_may_go.set()
    events = await asyncio.wait_for(conv, 20)
    await asyncio.wait_for(load, 30)
    await asyncio.wait_for(watcher, 10)
    await client.close()
    return calls, signalled_at, events, health_seen


async def _collect(call: Any) -> list[Any]:
    return [ev async for ev in call]
