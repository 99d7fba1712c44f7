"""The voice front-end and robot-controller simulators against an in-process server."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients.assistant import AssistantClient, PlanReply
from clients.robot_sim import RobotCall, SituationSource, plan_problems, run_robot, safety_problems
from clients.voice_sim import (
    END_OF_SPEECH_MS,
    WORD_GAP_MS,
    Utterance,
    asr_partials,
    load_utterances,
    run_session,
)
from server.config import Config
from server.proto import SERVICE_NAME, pb
from server.robot_plan import ActionVocabulary
from tests.server.test_deadlines import SlowGenerator


# ---------------------------------------------------------------------------------------------- robot
async def test_robot_controller_validates_every_plan(client: Any) -> None:
    vocab = ActionVocabulary.load()
    seen: list[tuple[RobotCall, PlanReply | None]] = []
    # A generous client deadline: the server still answers inside its 150 ms robot budget (with the
    # fallback if it must), but a machine busy with other work cannot turn that into a client-side timeout.
    report = await run_robot(client, SituationSource(seed=1), vocab, rate=40, count=30, duration_s=5,
                             deadline_ms=5000,
                             on_result=lambda call, reply, code, ms, problems: seen.append((call, reply)))
    assert report.calls == report.ok == 30 and not report.errors and report.deadline_exceeded == 0
    assert report.invalid == 0 and report.unsafe == 0
    assert sum(report.sources.values()) == 30 and set(report.sources) <= {"RETRIEVED", "RULES"}
    codes = set(SituationSource().severity)  # every code of data/kb/warehouse/fault_codes.json
    for call, reply in seen:
        assert call.fault_code in codes and call.robot_id.split("-")[0] in ("amr", "fl", "pk")
        assert reply is not None and not vocab.validate(reply.steps)
    assert len(report.latencies_ms) == 30 and report.percentiles()["p50"] > 0


async def test_robot_controller_counts_deadline_exceeded() -> None:
    # snaprag itself always answers inside the deadline (with the fallback if need be), so a server that
    # hangs stands in for an overloaded or partitioned one
    async def hang(request: pb.PlanRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        await asyncio.sleep(5)
        return pb.PlanResponse()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Plan": grpc.unary_unary_rpc_method_handler(hang, request_deserializer=pb.PlanRequest.FromString,
                                                    response_serializer=pb.PlanResponse.SerializeToString)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AssistantClient(f"127.0.0.1:{port}", retries=0) as c:
            report = await run_robot(c, SituationSource(seed=2), ActionVocabulary.load(), rate=50, count=5,
                                     duration_s=5, deadline_ms=50)
    finally:
        await server.stop(0)
    assert report.calls == 5 and report.deadline_exceeded == 5 and report.ok == 0 and not report.errors
    assert min(report.latencies_ms) >= 50  # each waited out the controller's deadline


async def test_robot_controller_counts_fallbacks(make_server: Any, config: Config) -> None:
    profiles = {**config.profiles, "robot": dataclasses.replace(config.profiles["robot"], retrieve_ms=0.5)}
    _, c = await make_server(cfg=dataclasses.replace(config, profiles=profiles))  # retrieval cannot make 0.5 ms
    seen: list[tuple[RobotCall, PlanReply | None]] = []
    report = await run_robot(c, SituationSource(seed=3, faults=["E202", "E303"]), ActionVocabulary.load(), rate=40,
                             count=12, duration_s=5, deadline_ms=5000,
                             on_result=lambda call, reply, *_: seen.append((call, reply)))
    # a person in the state is answered by a safety rule before retrieval runs; every other call misses
    missed = [reply for call, reply in seen if "person" not in call.state]
    assert missed and all(r is not None and r.mode == "FALLBACK" and r.missed_stage == "retrieve" for r in missed)
    assert report.fallbacks == report.modes["FALLBACK"] == len(missed)
    assert report.sources == {"RULES": 12} and report.invalid == report.unsafe == 0


def test_robot_controller_rejects_bad_plans() -> None:
    vocab = ActionVocabulary.load()
    bad = PlanReply.from_pb(pb.PlanResponse(steps=[pb.PlanStep(action="fly_away")]))
    assert any("unknown action" in p or "fly_away" in p for p in plan_problems(vocab, bad))
    far = {"distance_m": pb.ParamValue(text="far")}
    wrong_type = pb.PlanResponse(steps=[pb.PlanStep(action="reverse", params=far)])
    assert plan_problems(vocab, PlanReply.from_pb(wrong_type))
    assert plan_problems(vocab, PlanReply.from_pb(pb.PlanResponse()))  # empty plan
    # valid words, unsafe order: a loaded forklift driving off before it holds its load
    moving = pb.PlanResponse(steps=[pb.PlanStep(action="stop"), pb.PlanStep(action="return_to_dock")])
    reply = PlanReply.from_pb(moving)
    assert not plan_problems(vocab, reply)
    assert safety_problems(reply, RobotCall("fl-004", fault_code="E102", carrying_load=True), "major")
    assert not safety_problems(reply, RobotCall("fl-004", fault_code="E103"), "minor")
    with pytest.raises(ValueError, match="unknown fault code"):
        SituationSource(faults=["E999"])


# ---------------------------------------------------------------------------------------------- voice
def test_asr_partials_grow_get_revised_and_end_with_the_final() -> None:
    text = "how do i reset my smart plug after a power cut in the kitchen"
    parts = asr_partials(text, random.Random(4))
    words = text.split()
    assert parts[-1].is_final and parts[-1].text == text and parts[-1].stability == 1.0
    partials = parts[:-1]
    assert len(partials) == len(words) and not any(p.is_final for p in partials)
    for i, p in enumerate(partials, 1):
        assert len(p.text.split()) == i and p.text.split()[:-1] == words[:i - 1]  # only the newest word may differ
        assert WORD_GAP_MS[0] / 1000 <= p.delay_s <= WORD_GAP_MS[1] / 1000
    revised = [p for p in partials if p.text.split()[-1] != words[len(p.text.split()) - 1]]
    assert revised, "some partials are misheard (the seed makes this reproducible)"
    assert all(p.stability < 0.6 for p in revised)
    assert END_OF_SPEECH_MS[0] / 1000 <= parts[-1].delay_s <= END_OF_SPEECH_MS[1] / 1000
    fast = asr_partials(text, random.Random(4), speed=10)
    assert fast[0].delay_s == pytest.approx(parts[0].delay_s / 10)


def test_utterances_from_files_and_the_kb(tmp_path: Path) -> None:
    kb = load_utterances(None, limit=5)
    assert len(kb) == 5 and all(u.text and u.barge_in_ms is None for u in kb)
    txt = tmp_path / "u.txt"
    txt.write_text("# comment\nhow do i reset my plug\n\nset a timer\n")
    assert [u.text for u in load_utterances(txt, limit=0, barge_in_ms=250)] == ["how do i reset my plug", "set a timer"]
    assert {u.barge_in_ms for u in load_utterances(txt, limit=0, barge_in_ms=250)} == {250}
    jl = tmp_path / "u.jsonl"
    jl.write_text('{"text": "turn on the lights", "barge_in_ms": 100}\n{"text": "stop"}\n')
    assert load_utterances(jl, limit=0) == [Utterance("turn on the lights", 100), Utterance("stop")]
    (tmp_path / "bad.jsonl").write_text('{"words": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_utterances(tmp_path / "bad.jsonl", limit=0)


async def test_voice_front_end_speaks_answers_and_measures_first_chunk(client: Any) -> None:
    lines: list[str] = []
    utterances = [Utterance("how do i reset my smart plug"), Utterance("my camera keeps showing up as offline")]
    report = await run_session(client, utterances, seed=0, speed=5, show=lines.append)
    assert not report.errors and len(report.turns) == 2
    for turn in report.turns:
        # (FALLBACK is a spoken answer too: a machine busy with other work can make retrieval miss)
        assert turn.mode in ("FULL", "FALLBACK") and turn.chunks and not turn.interrupted
        assert turn.first_chunk_ms is not None and turn.server_first_chunk_ms is not None
        # client-side time covers the server's own time from the final to the first chunk, plus the wire
        assert turn.first_chunk_ms >= turn.server_first_chunk_ms
        assert turn.early_retrieval, "stable partials started retrieval before the final"
    assert sum(line.startswith("  assistant [") for line in lines) == sum(len(t.chunks) for t in report.turns)
    assert report.percentiles()["p50"] > 0


async def test_barge_in_cancels_the_answer_in_flight(make_server: Any) -> None:
    gen = SlowGenerator(first_delay_s=0.0, per_sentence_s=0.3, sentences=5)
    _, c = await make_server(generator=gen)
    gen.started = gen.closed = gen.produced = 0
    lines: list[str] = []
    report = await run_session(c, [Utterance("how do i reset my smart plug", barge_in_ms=0),
                                   Utterance("set a timer for five minutes")], speed=20, show=lines.append)
    first, second = report.turns
    assert first.interrupted and first.mode == "DEGRADED" and len(first.chunks) < 5
    assert second.mode == "FULL" and not second.interrupted and len(second.chunks) == 5
    assert any("answer interrupted" in line for line in lines)
    assert gen.started == 2 and gen.closed == 2


async def test_barge_in_on_the_last_utterance_cancels_the_call(make_server: Any) -> None:
    gen = SlowGenerator(first_delay_s=0.0, per_sentence_s=0.3, sentences=5)
    _, c = await make_server(generator=gen)
    gen.started = gen.closed = gen.produced = 0
    report = await run_session(c, [Utterance("how do i reset my smart plug", barge_in_ms=0)], speed=20)
    (turn,) = report.turns
    assert turn.cancelled and turn.chunks and not report.errors
    for _ in range(50):  # the server learns of the cancel asynchronously
        if gen.closed:
            break
        await asyncio.sleep(0.02)
    assert gen.closed == 1 and gen.produced < 5, "the server stopped generating when the client cancelled"
