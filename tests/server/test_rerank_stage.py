"""The rerank stage inside the answer pipeline: reorders the head, sizes itself to the time left, and
on a miss keeps the fused order with the answer marked DEGRADED. The cross-encoder here is a stand-in
with the CrossEncoder interface (its scoring is tested in tests/rerank)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from server.proto import pb


class ReversingReranker:
    """Prefers the candidates the fusion ranked last; optionally slow."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []

    def score(self, query: str, passages: Sequence[str], batch_size: int = 16) -> npt.NDArray[np.float32]:
        self.calls.append(len(passages))
        time.sleep(self.delay_s)
        return np.linspace(-3.0, 3.0, len(passages), dtype=np.float32)  # distinct after the sigmoid


def _final(events: list[Any]) -> Any:
    return next(ev.final for ev in events if ev.HasField("final"))


async def test_rerank_reorders_the_head(make_server: Any, runtime: Any) -> None:
    rr = ReversingReranker()
    _, client = await make_server(reranker=rr, rerank_pair_ms=0.05)
    fused = await client.retrieve("how do i reset my smart plug", k=32)
    events = [ev async for ev in client.ask_stream("how do i reset my smart plug")]
    final = _final(events)
    stage = next(t for t in final.timings if t.stage == "rerank")
    assert stage.outcome == pb.OK and stage.detail.startswith("scored 32 of")
    cited = [c.passage_id for ev in events if ev.HasField("citations") for c in ev.citations.citations]
    assert cited[0] == fused.passages[31].passage.id, "the reranker's favourite leads the answer"
    assert final.mode == pb.FULL


async def test_slow_reranker_misses_and_fused_order_stands(make_server: Any) -> None:
    rr = ReversingReranker(delay_s=0.3)
    _, client = await make_server(reranker=rr, rerank_pair_ms=0.05)
    events = [ev async for ev in client.ask_stream("how do i reset my smart plug")]
    final = _final(events)
    stage = next(t for t in final.timings if t.stage == "rerank")
    assert stage.outcome == pb.MISSED_BUDGET and stage.budget_ms <= 80
    assert final.mode == pb.DEGRADED and final.missed_stage == "rerank" and "fused order" in final.reason
    assert [ev for ev in events if ev.HasField("chunk")], "the answer is still spoken"
    assert final.first_chunk_ms < 800


async def test_stage_skips_when_no_pair_fits(make_server: Any) -> None:
    rr = ReversingReranker()
    _, client = await make_server(reranker=rr, rerank_pair_ms=500.0)  # warm-up said: far too dear here
    rr.calls.clear()
    events = [ev async for ev in client.ask_stream("how do i reset my smart plug")]
    final = _final(events)
    stage = next(t for t in final.timings if t.stage == "rerank")
    assert stage.outcome == pb.SKIPPED and "no candidate fits" in stage.detail
    assert rr.calls == [] and final.mode == pb.FULL


async def test_stage_learns_its_cost(make_server: Any) -> None:
    rr = ReversingReranker(delay_s=0.032)  # ~1 ms a pair for 32 pairs
    running, client = await make_server(reranker=rr, rerank_pair_ms=0.01)
    for _ in range(5):
        [ev async for ev in client.ask_stream("how do i reset my smart plug")]
    learned = running.service.answers.rerank.cost.per_pair_ms
    assert learned > 0.3, "the per-pair estimate moved toward the measured ~1 ms"
