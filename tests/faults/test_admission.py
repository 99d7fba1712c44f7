"""Admission control: limits per RPC and overall, slots reserved by priority (Plan > voice > Retrieve),
RESOURCE_EXHAUSTED with a retry-after hint, bounded queue time, and counts back to 0 after cancels."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from server.admission import Admission
from server.config import AdmissionConfig, Config, ConfigError
from server.errors import ResourceExhausted
from server.faults import FaultSwitch, runtime_parts
from server.proto import pb
from tests.faults.conftest import rpc_error

QUESTION = "how do i reset my smart plug"


def adm(**kw: Any) -> Admission:
    base = dict(max_in_flight=4, max_plan=4, max_ask=4, max_converse=4, max_retrieve=4, reserved_robot=1,
                reserved_voice=1, robot_queue_ms=0.0, voice_queue_ms=0.0, retrieve_queue_ms=0.0, retry_after_ms=40)
    return Admission(AdmissionConfig(**{**base, **kw}))


async def until(cond: Any, timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 (polling server-side counters)
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------- the controller itself
async def test_reserved_slots_keep_room_for_higher_classes() -> None:
    a = adm()
    retrieves = [await a.admit("Retrieve", stage_budget_s=0.1) for _ in range(2)]
    with pytest.raises(ResourceExhausted) as info:
        await a.admit("Retrieve", stage_budget_s=0.1)
    assert info.value.retry_after_ms == 40 and "retry-after-ms" in str(info.value)
    ask = await a.admit("Ask", stage_budget_s=0.1)  # voice may use the voice reserve
    with pytest.raises(ResourceExhausted):
        await a.admit("Converse", stage_budget_s=0.1)  # ...but not the robot's
    plan = await a.admit("Plan", stage_budget_s=0.1)  # the robot's reserved slot
    with pytest.raises(ResourceExhausted):
        await a.admit("Plan", stage_budget_s=0.1)  # max_in_flight reached
    assert a.snapshot() == {"total": 4, "Plan": 1, "Ask": 1, "Converse": 0, "Retrieve": 2}
    assert a.shed == {"Plan": 1, "Ask": 0, "Converse": 1, "Retrieve": 1}
    for t in (*retrieves, ask, plan):
        t.release()
        t.release()  # idempotent
    assert a.snapshot()["total"] == 0


async def test_per_rpc_limit() -> None:
    a = adm(max_in_flight=10, max_retrieve=1)
    with await a.admit("Retrieve", stage_budget_s=0.1):
        with pytest.raises(ResourceExhausted, match="1 Retrieve calls in flight"):
            await a.admit("Retrieve", stage_budget_s=0.1)
        (await a.admit("Ask", stage_budget_s=0.1)).release()
    assert a.in_flight == 0


async def test_queue_wait_is_bounded_and_freed_slot_goes_to_the_higher_class() -> None:
    a = adm(max_in_flight=2, reserved_robot=0, reserved_voice=0, robot_queue_ms=2000.0, retrieve_queue_ms=2000.0)
    held = [await a.admit("Ask", stage_budget_s=1.0) for _ in range(2)]
    retrieve = asyncio.create_task(a.admit("Retrieve", stage_budget_s=1.0))
    await asyncio.sleep(0.01)
    plan = asyncio.create_task(a.admit("Plan", stage_budget_s=1.0))
    await asyncio.sleep(0.01)
    held[0].release()  # Plan waited less but ranks higher: it gets the slot
    plan_ticket = await plan
    assert not retrieve.done()
    plan_ticket.release()  # ...and hands it on to the waiting Retrieve
    held[0] = await retrieve
    # The wait is capped by the first stage budget: refused, not served late.
    with pytest.raises(ResourceExhausted, match="after waiting"):
        await a.admit("Plan", stage_budget_s=0.02)
    for t in held:
        t.release()
    assert a.in_flight == 0 and not any(a.waiting.values())


async def test_cancelled_waiter_leaves_no_slot_behind() -> None:
    a = adm(max_in_flight=2, reserved_robot=0, reserved_voice=0, voice_queue_ms=5000.0)
    held = [await a.admit("Ask", stage_budget_s=1.0) for _ in range(2)]
    waiter = asyncio.create_task(a.admit("Ask", stage_budget_s=5.0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for t in held:
        t.release()
    assert a.in_flight == 0 and not any(a.waiting.values())


def test_admission_config_is_validated(config: Config) -> None:
    bad = copy.deepcopy(config)
    bad.admission.reserved_robot = bad.admission.max_in_flight
    with pytest.raises(ConfigError, match=r"admission\.reserved_robot"):
        bad.validate()
    bad = copy.deepcopy(config)
    bad.faults.retrieve = "stall"
    with pytest.raises(ConfigError, match=r"faults\.retrieve"):
        bad.validate()


# ---------------------------------------------------------------------- through gRPC
@pytest.fixture
def tight_cfg(config: Config) -> Config:
    cfg = copy.deepcopy(config)
    cfg.profiles["voice"].retrieve_ms = 3000.0  # Retrieve calls hold their slot while the retriever hangs
    cfg.admission = dataclasses.replace(cfg.admission, max_in_flight=4, reserved_robot=1, reserved_voice=1,
                                        max_converse=1, retrieve_queue_ms=0.0, retry_after_ms=75)
    return cfg


async def test_retrieve_flood_is_shed_while_plan_is_admitted(make_server: Any, runtime: Any,
                                                             tight_cfg: Config) -> None:
    switch = FaultSwitch(retrieve="hang", hang_max_s=10.0)
    running, client = await make_server(tight_cfg, **runtime_parts(runtime, switch))
    admission = running.service.admission
    stub = client.stub
    flood = [stub.Retrieve(pb.RetrieveRequest(query=QUESTION), timeout=5.0) for _ in range(2)]
    await until(lambda: admission.by_rpc["Retrieve"] == 2)
    err = await rpc_error(client.retrieve(QUESTION, timeout_s=3.0))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry-after-ms" in (err.details() or "") and "75" in (err.details() or "")
    assert ("retry-after-ms", "75") in tuple(err.trailing_metadata() or ())
    # Robots still get in (the retriever hangs, so the answer is the rule plan, inside the deadline).
    resp = await client.plan("fl-004", fault_code="E200", carrying_load=True, timeout_s=3.0)
    assert resp.source == pb.RULES and resp.mode == pb.FALLBACK
    assert admission.shed["Retrieve"] == 1 and admission.shed["Plan"] == 0
    for call in flood:
        call.cancel()
    switch.clear()
    await until(lambda: admission.in_flight == 0)
    assert admission.snapshot() == {"total": 0, "Plan": 0, "Ask": 0, "Converse": 0, "Retrieve": 0}
    assert len((await client.retrieve(QUESTION, timeout_s=3.0)).passages) > 0


async def test_converse_holds_a_voice_slot_for_the_stream(make_server: Any, tight_cfg: Config) -> None:
    running, client = await make_server(tight_cfg)
    admission = running.service.admission
    gate = asyncio.Event()

    async def requests() -> AsyncIterator[pb.ConverseRequest]:
        yield pb.ConverseRequest(start=pb.SessionStart())
        await gate.wait()

    first = client.converse(requests(), timeout_s=5.0)
    reader = asyncio.create_task(first.read())
    await until(lambda: admission.by_rpc["Converse"] == 1)
    second = client.converse(iter([pb.ConverseRequest(start=pb.SessionStart())]), timeout_s=3.0)
    err = await rpc_error(second)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()
    gate.set()
    await asyncio.gather(reader, return_exceptions=True)
    await until(lambda: admission.in_flight == 0)
    answer = await client.ask(QUESTION, timeout_s=3.0)
    assert answer.final is not None
