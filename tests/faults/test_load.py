"""The load signal admission control sheds on (server/load.py): the CPU pool's queue wait and the event
loop's lag, and the per-class delay limits that turn them into RESOURCE_EXHAUSTED, lowest class first."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import grpc
import pytest

from server.admission import Admission
from server.config import AdmissionConfig, Config
from server.errors import ResourceExhausted
from server.load import WORK_CLASS, CpuPool, LoadGauge, LoopLagProbe
from server.proto import pb
from tests.faults.conftest import rpc_error


def test_cpu_pool_runs_jobs_by_class() -> None:
    pool = CpuPool(max_workers=1, job_s=0.001)
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = pool.submit(gate.wait, 5)
        deadline = time.monotonic() + 2
        while pool.running < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        futures = []
        for cls, name in ((2, "retrieve-1"), (1, "voice-1"), (2, "retrieve-2"), (0, "robot-1"), (1, "voice-2")):
            token = WORK_CLASS.set(cls)
            try:
                futures.append(pool.submit(order.append, name))
            finally:
                WORK_CLASS.reset(token)
        assert pool.waiting_by_class == [1, 2, 2]
        # A robot job waits only behind robot work (and the running job); Retrieve behind everything.
        assert pool.expected_wait_s(0) < pool.expected_wait_s(1) < pool.expected_wait_s(2)
        gate.set()
        for f in (blocker, *futures):
            f.result(timeout=5)
        assert order == ["robot-1", "voice-1", "voice-2", "retrieve-1", "retrieve-2"]

        def boom() -> None:
            raise ValueError("inside a job")

        with pytest.raises(ValueError, match="inside a job"):
            pool.submit(boom).result(timeout=5)  # errors reach the caller; the worker lives on
        assert pool.submit(lambda: 7).result(timeout=5) == 7
    finally:
        gate.set()
        pool.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)


def test_cpu_pool_counts_its_queue_and_learns_job_time() -> None:
    pool = CpuPool(max_workers=2, job_s=0.001)
    gate = threading.Event()
    try:
        blocked = [pool.submit(gate.wait, 5) for _ in range(2)]
        queued = [pool.submit(time.sleep, 0) for _ in range(4)]
        deadline = time.monotonic() + 2
        while pool.running < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert (pool.running, pool.waiting) == (2, 4)
        # 4 queued + 2 running + the new one, minus 2 free workers... none free: 5 jobs ahead over 2 workers.
        assert pool.expected_wait_s() == pytest.approx(5 * 0.001 / 2)
        assert queued[-1].cancel()  # a job cancelled before it starts leaves the queue
        assert pool.waiting == 3
        gate.set()
        for f in blocked + queued[:-1]:
            f.result(timeout=5)
        assert (pool.running, pool.waiting) == (0, 0) and pool.expected_wait_s() == 0.0
        for _ in range(10):
            pool.submit(time.sleep, 0.01).result(timeout=5)
        assert 0.006 < pool.job_s < 0.05  # the EWMA learned what a job takes now (~10 ms)
        assert pool.submit(lambda x: x * 2, 21).result(timeout=5) == 42
    finally:
        gate.set()
        pool.shutdown(wait=True)


async def test_loop_lag_probe_sees_a_blocked_loop() -> None:
    probe = LoopLagProbe(interval_s=0.005)
    probe.start()
    try:
        await asyncio.sleep(0.05)
        idle = probe.lag_s
        for _ in range(8):
            time.sleep(0.03)  # noqa: ASYNC251 - blocking the loop on purpose: that is what the probe measures
            await asyncio.sleep(0)
            await asyncio.sleep(0.006)
        assert probe.lag_s > max(0.005, 2 * idle)
    finally:
        await probe.stop()
    await probe.stop()  # idempotent


class FixedDelay:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def expected_delay_s(self, cls: int = 2) -> float:
        return self.delay_s

    def describe(self) -> str:
        return "test gauge"


async def test_lower_classes_are_shed_first_as_the_queue_grows() -> None:
    gauge = FixedDelay(0.0)
    a = Admission(AdmissionConfig(robot_max_delay_ms=60, voice_max_delay_ms=30, retrieve_max_delay_ms=15),
                  gauge)  # type: ignore[arg-type]

    async def admitted(rpc: str) -> bool:
        try:
            (await a.admit(rpc, stage_budget_s=0.1)).release()
            return True
        except ResourceExhausted as e:
            assert "would wait ~" in str(e) and "retry after" in str(e) and e.retry_after_ms == 50
            return False

    table = {}
    for delay_ms in (5, 20, 45, 80):
        gauge.delay_s = delay_ms / 1000
        table[delay_ms] = [await admitted(rpc) for rpc in ("Plan", "Ask", "Retrieve")]
    assert table == {5: [True, True, True], 20: [True, True, False], 45: [True, False, False],
                     80: [False, False, False]}
    assert a.shed == {"Plan": 1, "Ask": 2, "Converse": 0, "Retrieve": 3}
    off = Admission(AdmissionConfig(robot_max_delay_ms=0, voice_max_delay_ms=0, retrieve_max_delay_ms=0),
                    FixedDelay(10.0))  # type: ignore[arg-type]
    (await off.admit("Retrieve", stage_budget_s=0.1)).release()  # 0 = no delay check


async def test_a_saturated_cpu_pool_sheds_retrieve_but_serves_plans(make_server: Any, config: Config,
                                                                    runtime: Any) -> None:
    cfg = dataclasses.replace(config, admission=dataclasses.replace(
        config.admission, robot_max_delay_ms=10_000, voice_max_delay_ms=30, retrieve_max_delay_ms=15))
    pool = CpuPool(max_workers=2, job_s=0.05)
    running, client = await make_server(cfg, cpu=pool)
    gate = threading.Event()
    try:
        hogs = [pool.submit(gate.wait, 10) for _ in range(6)]  # ~4 x 50 ms queued beyond the 2 workers
        assert isinstance(running.service.admission.load, LoadGauge)
        assert running.service.admission.load.expected_delay_s() > 0.03
        t0 = time.perf_counter()
        err = await rpc_error(client.retrieve("smart plug", timeout_s=3.0))
        refused_ms = (time.perf_counter() - t0) * 1000
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "CPU jobs queued" in err.details()
        assert refused_ms < 1000  # refused at once, not after the queue (generous: shared CI machines)
        plan = await client.plan("fl-004", fault_code="E202", carrying_load=True, timeout_s=3.0)
        assert plan.mode == pb.FALLBACK and plan.steps  # admitted, and answered by the rules in time
        gate.set()
        for h in hogs:
            h.result(timeout=10)
        assert (await client.retrieve_reply("smart plug")).passages  # queue gone: served again
    finally:
        gate.set()
        pool.shutdown(wait=True)
