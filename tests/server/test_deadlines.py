"""Budgets with tiny deadlines and stages made slow or broken on purpose: the answer is the fallback,
inside the deadline, and names the stage that missed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from server.errors import DeadlineExpired
from server.generate.base import AnswerPiece, GenerationRequest, Source
from server.proto import pb
from server.retrieval.sparse import Filters, Hit
from server.servicer import _client_remaining


class SlowRetriever:
    """The real retriever behind a delay (runs in the CPU pool, like the real one)."""

    name = "slow"

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def search(self, query: str, k: int, filters: Filters | None = None) -> list[Hit]:
        time.sleep(self.delay_s)
        return self.inner.search(query, k, filters)


class BrokenRetriever:
    name = "broken"

    def search(self, query: str, k: int, filters: Filters | None = None) -> list[Hit]:
        raise RuntimeError("index shard offline")


class SlowGenerator:
    """Yields sentences slowly; records whether its stream was closed (cancellation cleaned up)."""

    name = "slow-gen"

    def __init__(self, first_delay_s: float, per_sentence_s: float = 0.0, sentences: int = 3) -> None:
        self.first_delay_s, self.per_sentence_s, self.sentences = first_delay_s, per_sentence_s, sentences
        self.started = 0
        self.closed = 0
        self.produced = 0

    def sources(self, request: GenerationRequest) -> list[Source]:
        return [Source(1, request.passages[0].passage.id, request.passages[0].passage.source, "")]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[AnswerPiece]:
        self.started += 1
        try:
            await asyncio.sleep(self.first_delay_s)
            for i in range(self.sentences):
                if i:
                    await asyncio.sleep(self.per_sentence_s)
                self.produced += 1
                yield AnswerPiece(f"Sentence number {i + 1}.", (1,))
        finally:
            self.closed += 1


def _final(events: list[pb.AnswerEvent]) -> pb.AnswerFinal:
    finals = [ev.final for ev in events if ev.HasField("final")]
    assert len(finals) == 1
    return finals[0]


async def test_slow_retrieval_gives_fallback_plan_inside_deadline(make_server: Any, runtime: Any) -> None:
    _, client = await make_server(retriever=SlowRetriever(runtime.retriever, 0.5))
    t0 = time.perf_counter()
    resp = await client.plan("fl-004", fault_code="E200", carrying_load=True, timeout_s=0.15)
    wall_ms = (time.perf_counter() - t0) * 1000
    assert resp.mode == pb.FALLBACK and resp.source == pb.RULES
    assert resp.missed_stage == "retrieve" and "retrieve" in resp.reason and "budget" in resp.reason
    assert resp.rule_id.startswith("fault.E200")
    assert [s.action for s in resp.steps][:2] == ["stop", "hold_load"]
    missed = next(t for t in resp.timings if t.stage == "retrieve")
    assert missed.outcome == pb.MISSED_BUDGET and missed.budget_ms <= 60
    assert resp.total_ms < 150 and wall_ms < 150 + 100  # server inside its deadline; client adds transport


async def test_client_deadline_tighter_than_profile(make_server: Any, runtime: Any) -> None:
    _, client = await make_server(retriever=SlowRetriever(runtime.retriever, 0.3))
    resp = await client.plan("amr-001", fault_code="E300", timeout_s=0.05)
    assert resp.mode == pb.FALLBACK and resp.total_ms < 50
    missed = next(t for t in resp.timings if t.stage == "retrieve")
    assert missed.budget_ms < 50  # min(stage budget, client deadline - reserve)


async def test_failing_retrieval_gives_fallback_answer(make_server: Any) -> None:
    _, client = await make_server(retriever=BrokenRetriever())
    events = [ev async for ev in client.ask_stream("my smart plug is blinking red")]
    final = _final(events)
    assert final.mode == pb.FALLBACK and final.generator == "fallback" and final.missed_stage == "retrieve"
    assert "RuntimeError: index shard offline" in final.reason
    timing = next(t for t in final.timings if t.stage == "retrieve")
    assert timing.outcome == pb.FAILED
    assert [ev for ev in events if ev.HasField("chunk")], "the fallback still speaks"
    plan = await client.plan("amr-001", fault_code="E303")
    assert plan.mode == pb.FALLBACK and plan.source == pb.RULES and plan.missed_stage == "retrieve"


async def test_slow_generation_misses_first_token_budget(make_server: Any) -> None:
    gen = SlowGenerator(first_delay_s=1.0)
    _, client = await make_server(generator=gen)
    gen.closed = gen.produced = 0  # forget the warm-up request
    t0 = time.perf_counter()
    events = [ev async for ev in client.ask_stream("how do i reset my smart plug")]
    wall = time.perf_counter() - t0
    final = _final(events)
    assert final.mode == pb.FALLBACK and final.missed_stage == "generate"
    gen_t = next(t for t in final.timings if t.stage == "generate")
    assert gen_t.outcome == pb.MISSED_BUDGET and gen_t.budget_ms <= 800
    assert final.first_chunk_ms < 800 and wall < 0.8
    assert gen.closed == 1 and gen.produced == 0, "the late generator was cancelled and cleaned up"


async def test_retrieval_miss_on_voice_answers_within_first_chunk_budget(make_server: Any, runtime: Any) -> None:
    _, client = await make_server(retriever=SlowRetriever(runtime.retriever, 0.4))
    events = [ev async for ev in client.ask_stream("set a timer for ten minutes")]
    final = _final(events)
    assert final.mode == pb.FALLBACK and final.missed_stage == "retrieve"
    assert final.first_chunk_ms < 800 and final.total_ms < 800


async def test_stalled_stream_ends_degraded(make_server: Any, config: Any) -> None:
    import dataclasses

    voice = dataclasses.replace(config.profiles["voice"], total_ms=400.0)
    cfg = dataclasses.replace(config, profiles={**config.profiles, "voice": voice})
    gen = SlowGenerator(first_delay_s=0.0, per_sentence_s=1.0)
    _, client = await make_server(cfg=cfg, generator=gen)
    gen.closed = 0  # forget the warm-up request
    events = [ev async for ev in client.ask_stream("how do i reset my smart plug")]
    final = _final(events)
    assert final.mode == pb.DEGRADED and final.missed_stage == "generate"
    assert "after 1 sentence" in final.reason
    assert len([ev for ev in events if ev.HasField("chunk")]) == 1
    assert gen.closed == 1


async def test_expired_deadline_is_refused_before_work() -> None:
    class Ctx:
        def time_remaining(self) -> float:
            return -0.01

    with pytest.raises(DeadlineExpired):
        _client_remaining(Ctx())  # type: ignore[arg-type]


async def test_cpu_work_runs_off_the_event_loop(make_server: Any, runtime: Any) -> None:
    seen: set[int] = set()

    class Recording:
        name = "recording"

        def search(self, query: str, k: int, filters: Filters | None = None) -> list[Hit]:
            seen.add(threading.get_ident())
            return runtime.retriever.search(query, k, filters)

    _, client = await make_server(retriever=Recording())
    await client.retrieve("thermostat schedule")
    assert seen and threading.get_ident() not in seen


async def test_server_recovers_after_fault_clears(make_server: Any, runtime: Any) -> None:
    slow = SlowRetriever(runtime.retriever, 0.2)
    _, client = await make_server(retriever=slow)
    assert (await client.plan("amr-001", fault_code="E302")).mode == pb.FALLBACK
    slow.delay_s = 0.0
    # Timed-out searches keep their pool thread until they finish (a thread cannot be killed); once
    # they have, service is back to FULL.
    await asyncio.sleep(0.3)
    assert (await client.plan("amr-001", fault_code="E302")).mode == pb.FULL


async def test_retrieve_rpc_names_the_stage_on_a_miss(make_server: Any, runtime: Any) -> None:
    _, client = await make_server(retriever=SlowRetriever(runtime.retriever, 0.4))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.retrieve("smart plug")
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and e.value.details().startswith("retrieve exceeded")
