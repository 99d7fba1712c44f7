"""Each RPC against a real in-process server: the happy paths and what every response must carry."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.assistant import AssistantClient
from server.proto import pb
from server.robot_plan import ActionVocabulary, PlanStep, check_plan_safety
from server.runtime import Runtime


async def test_health_is_serving_after_warm_up(client: AssistantClient) -> None:
    stub = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "snaprag.v1.Assistant"):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_ask_streams_sentences_citations_timings_and_final(client: AssistantClient) -> None:
    events = [ev async for ev in client.ask_stream("how do i factory reset my smart plug")]
    kinds = [ev.WhichOneof("event") for ev in events]
    assert kinds[-1] == "final" and kinds.count("final") == 1
    assert kinds.index("citations") < kinds.index("chunk"), "citations go out before the first sentence"
    chunks = [ev.chunk for ev in events if ev.HasField("chunk")]
    assert 1 <= len(chunks) <= 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.text.rstrip().endswith((".", "!", "?")) for c in chunks), "chunks end at sentence boundaries"
    final = events[-1].final
    assert final.mode == pb.FULL and final.generator == "extractive" and not final.reason
    assert "reset" in final.answer_text.lower() and "plug" in final.answer_text.lower()
    cited = {c.passage_id for ev in events if ev.HasField("citations") for c in ev.citations.citations}
    assert any(pid.startswith("home-") and "plug" in pid for pid in cited)
    stages = {t.stage: t for t in final.timings}
    assert stages["retrieve"].outcome == pb.OK and 0 < stages["retrieve"].budget_ms <= 120
    assert stages["rerank"].outcome == pb.SKIPPED and "disabled" in stages["rerank"].detail
    assert stages["generate"].outcome == pb.OK
    assert final.first_chunk_ms > 0 and final.total_ms >= final.first_chunk_ms
    assert final.request_id


async def test_ask_honours_intent_filter(client: AssistantClient) -> None:
    answer = await client.ask("how do i set a timer", filters={"intent": ["timers_alarms"]})
    assert answer.mode == "FULL"
    assert answer.citations and all(c.passage_id.startswith("home-") for c in answer.citations)


async def test_request_id_is_taken_from_metadata(client: AssistantClient) -> None:
    call = client.stub.Ask(pb.AskRequest(query="how do i pair the doorbell"), timeout=5,
                           metadata=(("x-request-id", "abc123"),))
    finals = [ev.final async for ev in call if ev.HasField("final")]
    assert finals[0].request_id == "abc123"


async def test_plan_returns_retrieved_validated_procedure(client: AssistantClient) -> None:
    resp = await client.plan("amr-017", fault_code="E303", task="deliver tote to S3", location="aisle A12")
    assert resp.source == pb.RETRIEVED and resp.mode == pb.FULL
    assert resp.citations and resp.citations[0].passage_id.startswith("wh-")
    vocab = ActionVocabulary.load()
    steps = vocab.parse_steps([{"action": s.action, "params": {k: getattr(v, v.WhichOneof("kind"))
                                                                 for k, v in s.params.items()}} for s in resp.steps])
    assert not vocab.validate(steps)
    assert not check_plan_safety(steps, severity="major", carrying_load=False, people_involved=False)
    assert {t.stage for t in resp.timings} >= {"retrieve", "plan"}
    assert resp.total_ms < 150


async def test_plan_for_a_loaded_forklift_holds_the_load(client: AssistantClient) -> None:
    resp = await client.plan("fl-004", fault_code="E202", carrying_load=True, state="pallet leaning")
    actions = [s.action for s in resp.steps]
    assert actions[0] in ("stop", "emergency_stop") and actions[1] == "hold_load"
    assert "request_assistance" in actions


async def test_plan_people_override_retrieval(client: AssistantClient) -> None:
    resp = await client.plan("amr-017", fault_code="E101", state="a person is standing next to the robot")
    assert resp.source == pb.RULES and resp.rule_id.startswith("people.")
    assert resp.steps[0].action in ("stop", "emergency_stop")
    skipped = [t for t in resp.timings if t.stage == "retrieve"]
    assert skipped and skipped[0].outcome == pb.SKIPPED


async def test_plan_unknown_fault_gets_safe_plan_marked_degraded(client: AssistantClient) -> None:
    resp = await client.plan("pk-002", fault_code="E999")
    assert resp.source == pb.RULES and resp.mode == pb.DEGRADED and resp.rule_id.startswith("safe.")
    assert resp.steps[0].action == "stop" and "E999" in resp.reason


async def test_plan_params_are_typed(client: AssistantClient) -> None:
    resp = await client.plan("amr-003", state="aisle blocked by a pallet", location="A07")
    for step in resp.steps:
        for value in step.params.values():
            assert value.WhichOneof("kind") in ("text", "integer", "number")


async def test_retrieve_scored_ranked_filtered(client: AssistantClient) -> None:
    resp = await client.retrieve("battery overtemperature", k=7, filters={"domain": ["warehouse"]})
    assert len(resp.passages) == 7
    assert [p.rank for p in resp.passages] == list(range(1, 8))
    scores = [p.score for p in resp.passages]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert all(p.passage.domain == "warehouse" for p in resp.passages)
    assert resp.passages[0].passage.fault_code == "E402"
    assert resp.fusion == pb.CONVEX and resp.timings[0].stage == "retrieve"  # the configured default


async def test_retrieve_default_k_comes_from_profile(client: AssistantClient) -> None:
    resp = await client.retrieve("thermostat schedule")
    assert len(resp.passages) == 5


@pytest.mark.parametrize(("fusion", "name"), [(pb.RRF, "RRF"), (pb.CONVEX, "CONVEX"), (pb.SPARSE_ONLY, "SPARSE_ONLY"),
                                              (pb.DENSE_ONLY, "DENSE_ONLY")])
async def test_retrieve_honours_the_requested_fusion(client: AssistantClient, fusion: int, name: str) -> None:
    resp = await client.retrieve("my lights turn on by themselves at night", k=5, fusion=fusion)
    assert pb.FusionMode.Name(resp.fusion) == name and len(resp.passages) == 5


async def test_dense_fusion_is_refused_when_dense_is_off(make_server: Any, runtime: Runtime) -> None:
    from server.retrieval.hybrid import HybridRetriever

    sparse_only = HybridRetriever(runtime.kb, runtime.retriever.sparse, None,  # type: ignore[attr-defined]
                                  runtime.cfg.retrieval.fusion, apply_confidence=True)
    _, client = await make_server(retriever=sparse_only)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.retrieve("thermostat schedule", fusion=pb.RRF)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "SPARSE_ONLY" in e.value.details()
    assert (await client.retrieve("thermostat schedule")).fusion == pb.SPARSE_ONLY


async def test_plan_step_conversion_round_trip() -> None:
    # ints stay ints, floats stay floats, strings stay strings on the wire.
    from server.servicer import _param_pb

    assert _param_pb(3).WhichOneof("kind") == "integer"
    assert _param_pb(1.5).WhichOneof("kind") == "number"
    assert _param_pb("A12").WhichOneof("kind") == "text"
    assert PlanStep("wait", {"seconds": 2.0}).params["seconds"] == 2.0


def test_remembered_step_messages_keep_each_value_type() -> None:
    # 5 == 5.0 == True in Python; the remembered wire form of one must not be served for another.
    from server.servicer import _steps_pb

    kinds = [_steps_pb((PlanStep("wait", {"seconds": v}),))[0].params["seconds"].WhichOneof("kind")
             for v in (5, 5.0, True, 5, 5.0)]
    assert kinds == ["integer", "number", "text", "integer", "number"]
    first = _steps_pb((PlanStep("stop"), PlanStep("wait", {"seconds": 2})))
    assert _steps_pb((PlanStep("stop"), PlanStep("wait", {"seconds": 2}))) is first  # remembered
    assert [s.action for s in first] == ["stop", "wait"]
