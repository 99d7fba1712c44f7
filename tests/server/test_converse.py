"""Converse: partial transcripts, early retrieval, several utterances, barge-in and client cancel."""

from __future__ import annotations

import asyncio
from typing import Any

from clients.assistant import session_start, transcript
from server.proto import pb
from tests.server.test_deadlines import SlowGenerator


async def _collect(call: Any) -> list[pb.AnswerEvent]:
    return [ev async for ev in call]


async def test_final_transcript_reuses_early_retrieval(client: Any) -> None:
    async def reqs() -> Any:
        yield session_start(session_id="kitchen-1")
        yield transcript("my thermostat", is_final=False, sequence=1, stability=0.4)
        yield transcript("my thermostat says no power", is_final=False, sequence=2, stability=0.9)
        await asyncio.sleep(0.05)  # end-of-speech pause; retrieval runs meanwhile
        yield transcript("my thermostat says no power", is_final=True, sequence=3, stability=1.0)

    events = await _collect(client.converse(reqs()))
    final = next(ev.final for ev in events if ev.HasField("final"))
    assert final.early_retrieval_used and final.mode == pb.FULL
    assert "thermostat" in final.answer_text.lower()
    assert all(ev.utterance == 0 for ev in events)


async def test_changed_final_retrieves_again(client: Any) -> None:
    async def reqs() -> Any:
        yield transcript("turn on the kitchen lights", is_final=False, sequence=1, stability=0.95)
        await asyncio.sleep(0.02)
        yield transcript("how do i set an alarm for six", is_final=True, sequence=2)

    events = await _collect(client.converse(reqs()))
    final = next(ev.final for ev in events if ev.HasField("final"))
    assert not final.early_retrieval_used and final.mode == pb.FULL


async def test_several_utterances_in_one_stream(client: Any) -> None:
    async def reqs() -> Any:
        yield transcript("how do i reset the smart plug", is_final=True, sequence=1)
        await asyncio.sleep(0.1)
        yield transcript("what does e303 mean for the robot", is_final=True, sequence=2)
        await asyncio.sleep(0.1)

    events = await _collect(client.converse(reqs()))
    finals = [ev for ev in events if ev.HasField("final")]
    assert [ev.utterance for ev in finals] == [0, 1]
    assert all(ev.final.mode == pb.FULL and not ev.final.interrupted for ev in finals)


async def test_barge_in_cancels_generation_at_once(make_server: Any) -> None:
    gen = SlowGenerator(first_delay_s=0.0, per_sentence_s=0.3, sentences=5)
    _, client = await make_server(generator=gen)
    gen.started = gen.closed = gen.produced = 0
    first_chunk = asyncio.Event()
    barge = asyncio.Event()

    async def reqs() -> Any:
        yield transcript("how do i reset my smart plug", is_final=True, sequence=1)
        await first_chunk.wait()
        yield transcript("stop", is_final=False, sequence=2, stability=0.3)  # the user talks over us
        await barge.wait()
        yield transcript("set a timer for five minutes", is_final=True, sequence=3)

    events: list[pb.AnswerEvent] = []
    async for ev in client.converse(reqs()):
        events.append(ev)
        if ev.HasField("chunk") and ev.utterance == 0:
            first_chunk.set()
        if ev.HasField("final") and ev.utterance == 0:
            assert ev.final.interrupted and "barge-in" in ev.final.reason
            # the generator's stream was closed before the interrupted final went out
            assert gen.closed == 1 and gen.produced == 1
            barge.set()
    u0 = [ev for ev in events if ev.utterance == 0]
    assert [ev.WhichOneof("event") for ev in u0].count("chunk") == 1, "no sentence after the barge-in"
    assert u0[-1].HasField("final")
    u1_final = [ev.final for ev in events if ev.utterance == 1 and ev.HasField("final")]
    assert u1_final and not u1_final[0].interrupted
    assert gen.started == 2


async def test_client_cancel_stops_generation(make_server: Any) -> None:
    gen = SlowGenerator(first_delay_s=0.0, per_sentence_s=0.3, sentences=5)
    _, client = await make_server(generator=gen)
    gen.started = gen.closed = gen.produced = 0

    async def reqs() -> Any:
        yield transcript("how do i reset my smart plug", is_final=True, sequence=1)
        await asyncio.sleep(10)

    call = client.converse(reqs())
    async for ev in call:
        if ev.HasField("chunk"):
            call.cancel()
            break
    for _ in range(50):  # the server learns of the cancel asynchronously
        if gen.closed:
            break
        await asyncio.sleep(0.02)
    assert gen.closed == 1 and gen.produced == 1
    await asyncio.sleep(0.4)
    assert gen.produced == 1, "no work continued after the cancel"


async def test_ask_cancel_stops_generation(make_server: Any) -> None:
    gen = SlowGenerator(first_delay_s=0.0, per_sentence_s=0.3, sentences=5)
    _, client = await make_server(generator=gen)
    gen.closed = gen.produced = 0
    call = client.ask_stream("how do i reset my smart plug")
    async for ev in call:
        if ev.HasField("chunk"):
            call.cancel()
            break
    for _ in range(50):
        if gen.closed:
            break
        await asyncio.sleep(0.02)
    assert gen.closed == 1 and gen.produced == 1


class RecordingGenerator:
    """The real generator, recording what each utterance's request carried."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.requests: list[Any] = []

    def sources(self, request: Any) -> Any:
        return self.inner.sources(request)

    def stream(self, request: Any) -> Any:
        self.requests.append(request)
        return self.inner.stream(request)


async def test_later_utterances_carry_the_conversation(make_server: Any, runtime: Any) -> None:
    import dataclasses

    from server.config import PromptConfig

    gen = RecordingGenerator(runtime.generator)
    cfg = dataclasses.replace(runtime.cfg, generation=dataclasses.replace(
        runtime.cfg.generation, prompt=PromptConfig(max_turns=1)))
    _, client = await make_server(cfg=cfg, generator=gen)
    gen.requests.clear()  # forget the warm-up request
    questions = ["how do i reset the smart plug", "what does the red light mean", "and the blue one"]

    async def reqs() -> Any:
        for i, q in enumerate(questions):
            yield transcript(q, is_final=True, sequence=i + 1)
            await asyncio.sleep(0.15)

    events = await _collect(client.converse(reqs()))
    answers = [ev.final.answer_text for ev in events if ev.HasField("final")]
    assert [r.question for r in gen.requests] == questions
    assert gen.requests[0].turns == () and gen.requests[0].summary == ""
    second, third = gen.requests[1], gen.requests[2]
    assert [(t.question, t.answer) for t in second.turns] == [(questions[0], answers[0])]
    assert [t.question for t in third.turns] == [questions[1]], "only max_turns recent turns verbatim"
    assert f"asked {questions[0]!r}" in third.summary, "older turns live on in the summary"
