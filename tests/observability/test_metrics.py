"""/metrics scraped over HTTP from an in-process server after real RPCs."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def get(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await asyncio.to_thread(scrape, port)


def value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def total(m: dict[Any, float], name: str, **labels: str) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))


async def test_ask_plan_retrieve_move_the_metrics(make_server: Any) -> None:
    running, client = await make_server()
    assert running.metrics is not None and running.metrics.port > 0
    before = await get(running.metrics.port)

    answer = await client.ask("how do i reset my smart plug")
    plan = await client.plan("fl-004", fault_code="E202", carrying_load=True)
    retrieved = await client.retrieve("battery overtemperature", k=7)
    assert answer.text and plan.steps and len(retrieved.passages) == 7

    after = await get(running.metrics.port)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("snaprag_requests_total", rpc="Ask", code="OK") == 1
    assert delta("snaprag_requests_total", rpc="Ask", mode=answer.mode.upper(), code="OK") == 1
    from server.proto import pb

    assert delta("snaprag_requests_total", rpc="Plan", mode=pb.ServingMode.Name(plan.mode), code="OK") == 1
    assert delta("snaprag_requests_total", rpc="Retrieve", mode="NONE", code="OK") == 1
    assert delta("snaprag_request_latency_seconds_count", rpc="Plan", code="OK") == 1
    # every stage of the three requests: retrieve ran (ok) three times at least
    assert delta("snaprag_stage_latency_seconds_count", stage="retrieve", outcome="ok") >= 3
    assert delta("snaprag_stage_latency_seconds_count", stage="generate") >= 1
    assert delta("snaprag_stage_latency_seconds_count", stage="rerank", outcome="skipped") >= 1
    assert delta("snaprag_retrieved_chunks_count", pipeline="retrieve") == 1
    assert delta("snaprag_retrieved_chunks_sum", pipeline="retrieve") == 7
    assert delta("snaprag_retrieved_chunks_count", pipeline="answer") == 1
    assert delta("snaprag_retrieved_chunks_count", pipeline="plan") <= 1  # 0 when a safety rule answers first
    assert delta("snaprag_grounding_sentences_total", result="spoken") >= 1
    assert ("snaprag_grounding_sentences_total", (("result", "dropped"),)) in after
    assert delta("snaprag_generated_tokens_total") >= 0
    for rpc in ("Ask", "Plan", "Retrieve"):
        assert value(after, "snaprag_in_flight", rpc=rpc) == 0
    assert value(after, "snaprag_index_version") == 1
    assert ("snaprag_rerank_candidates_count", ()) in after


async def test_errors_are_counted_by_status_code(make_server: Any) -> None:
    import grpc

    running, client = await make_server()
    before = await get(running.metrics.port)
    try:
        await client.retrieve("")
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await get(running.metrics.port)
    key = ("snaprag_requests_total", (("code", "INVALID_ARGUMENT"), ("mode", "NONE"), ("rpc", "Retrieve")))
    assert after.get(key, 0) - before.get(key, 0) == 1


async def test_shed_counter_is_exported() -> None:
    from server.observability.metrics import REGISTRY, SHED

    SHED.labels("Plan").inc()
    assert (REGISTRY.get_sample_value("snaprag_shed_total", {"rpc": "Plan"}) or 0) >= 1


async def test_many_servers_share_the_metrics_without_clashing(make_server: Any) -> None:
    a, _ = await make_server()
    b, _ = await make_server()
    assert a.metrics.port != b.metrics.port
    assert "snaprag_requests_total" in "".join(k[0] for k in await get(b.metrics.port))


async def test_metrics_off_starts_no_listener(make_server: Any, config: Any) -> None:
    import dataclasses

    cfg = dataclasses.replace(config, observability=dataclasses.replace(config.observability, metrics=False))
    running, client = await make_server(cfg)
    assert running.metrics is None
    assert (await client.retrieve("thermostat schedule")).passages
