"""The voice generation policy against scripted backends: every failure of the model tier lands on the
fallback tier in time, with the reason recorded; grounding drops what the passages do not support."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from server.config import Config, GenerationConfig, GroundingConfig, PromptConfig, TaskPolicy
from server.generate.backend import BackendServerError, BackendUnavailable, DecodeLimits, Prompt, TextDelta
from server.generate.base import GenerationRequest
from server.generate.grounding import GroundingChecker
from server.generate.policy import PolicyGenerator, complete_sentences
from server.generate.prompt import PromptBuilder
from server.runtime import Runtime

QUESTION = "how do i reset my smart plug"


class ScriptedBackend:
    """Streams `script` (text pieces) with `delay_s` between them; `fail` raises at a given point."""

    name = "vllm"

    def __init__(self, script: Sequence[str] = (), *, delay_s: float = 0.0, first_delay_s: float = 0.0,
                 fail_at: int | None = None, error: Exception | None = None) -> None:
        self.script = list(script)
        self.delay_s, self.first_delay_s = delay_s, first_delay_s
        self.fail_at, self.error = fail_at, error
        self.calls: list[tuple[Prompt, DecodeLimits, str, str | None]] = []
        self.closed = 0
        self.produced = 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def stream(self, prompt: Prompt, limits: DecodeLimits, *, model: str,
                     adapter: str | None = None) -> AsyncIterator[TextDelta]:
        self.calls.append((prompt, limits, model, adapter))
        try:
            await asyncio.sleep(self.first_delay_s)
            for i, text in enumerate(self.script):
                if self.fail_at == i:
                    raise self.error or BackendServerError("HTTP 500")
                if i:
                    await asyncio.sleep(self.delay_s)
                self.produced += 1
                yield TextDelta(text)
            if self.fail_at == len(self.script):
                raise self.error or BackendServerError("HTTP 500")
        finally:
            self.closed += 1


def words(text: str) -> list[str]:
    """Token-like pieces: each word with its leading space, the way a model streams."""
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]]


@pytest.fixture(scope="module")
def hits(runtime: Runtime) -> list[Any]:
    return runtime.retriever.search(QUESTION, 3)


def policy_generator(runtime: Runtime, backend: Any, *, grounding: GroundingConfig | None = None,
                     max_tokens: int = 64) -> PolicyGenerator:
    g = dataclasses.replace(runtime.cfg.generation, grounding=grounding or GroundingConfig(min_embedding=0.0),
                            voice=TaskPolicy(backend="vllm", model="base", adapter="voice", max_tokens=max_tokens))
    gen: Any = runtime.generator
    extractive = gen.extractive
    checker = GroundingChecker(g.grounding, runtime.tokenizer, None)
    return PolicyGenerator(g.voice, g, extractive=extractive, backend=backend,
                           prompts=PromptBuilder(g.prompt), grounding=checker, cpu=runtime.cpu)


def request(hits: Sequence[Any], *, first_token_s: float = 0.3, window_s: float = 0.75) -> GenerationRequest:
    return GenerationRequest(QUESTION, hits, 3, first_token_s=first_token_s,
                             first_chunk_deadline=time.monotonic() + window_s)


async def collect(gen: PolicyGenerator, req: GenerationRequest) -> list[Any]:
    return [p async for p in gen.stream(req)]


GROUNDED = ("To factory reset the plug, press and hold the button on its side for 10 seconds [1]. "
            "Release the button when the LED blinks amber [1].")


async def test_model_sentences_stream_with_markers_and_record(runtime: Runtime, hits: list[Any]) -> None:
    backend = ScriptedBackend(words(GROUNDED), delay_s=0.002)
    req = request(hits)
    pieces = await collect(policy_generator(runtime, backend), req)
    assert [p.text for p in pieces] == [
        "To factory reset the plug, press and hold the button on its side for 10 seconds.",
        "Release the button when the LED blinks amber."]
    assert all(p.markers == (1,) for p in pieces)
    rec = req.record
    assert rec.backend == "vllm" and rec.model == "base" and rec.adapter == "voice"
    assert rec.tokens == len(words(GROUNDED)) and rec.ttft_ms > 0 and not rec.fallback_reason
    prompt, limits, model, adapter = backend.calls[0]
    assert (model, adapter, limits.max_tokens, limits.first_token_s) == ("base", "voice", 64, 0.3)
    assert "[1] (" in prompt.messages[-1].content and QUESTION in prompt.messages[-1].content
    assert backend.closed == 1


@pytest.mark.parametrize("backend, kind", [
    (ScriptedBackend([], fail_at=0, error=BackendUnavailable("connection refused")), "unavailable"),
    (ScriptedBackend(["x"], fail_at=0), "server_error"),
    (ScriptedBackend(["late"], first_delay_s=5.0), "first_token_timeout"),
])
async def test_primary_failure_falls_back_to_extractive_in_time(runtime: Runtime, hits: list[Any],
                                                                backend: ScriptedBackend, kind: str) -> None:
    req = request(hits)
    t0 = time.monotonic()
    pieces = await collect(policy_generator(runtime, backend), req)
    assert time.monotonic() - t0 < 0.6
    assert pieces and "press and hold" in " ".join(p.text for p in pieces)
    assert req.record.backend == "extractive" and kind in req.record.fallback_reason
    assert "answered by the extractive tier" in req.record.degraded_reason
    assert backend.closed == 1


async def test_no_sentence_by_first_chunk_deadline_falls_back(runtime: Runtime, hits: list[Any]) -> None:
    # Tokens keep coming (no stall), but the first sentence would end too late for the voice budget.
    backend = ScriptedBackend(words(GROUNDED), delay_s=0.05)
    req = request(hits, window_s=0.3)
    t0 = time.monotonic()
    pieces = await collect(policy_generator(runtime, backend), req)
    assert time.monotonic() - t0 < 0.35
    assert req.record.backend == "extractive" and "first-chunk deadline" in req.record.fallback_reason
    assert pieces and backend.closed == 1 and backend.produced < len(words(GROUNDED))


async def test_ungrounded_sentence_is_dropped_and_reported(runtime: Runtime, hits: list[Any]) -> None:
    text = ("The plug costs 25 dollars at most stores [2]. "
            "To factory reset the plug, press and hold the button on its side for 10 seconds [1].")
    req = request(hits)
    pieces = await collect(policy_generator(runtime, ScriptedBackend(words(text))), req)
    assert [p.text for p in pieces] == [
        "To factory reset the plug, press and hold the button on its side for 10 seconds."]
    assert len(req.record.ungrounded) == 1 and "25" in req.record.ungrounded[0]
    assert "1 ungrounded sentence(s) not spoken" in req.record.degraded_reason


async def test_replace_mode_speaks_extractive_instead(runtime: Runtime, hits: list[Any]) -> None:
    text = "Call support and ask for a refund of 40 dollars [1]."
    req = request(hits)
    gen = policy_generator(runtime, ScriptedBackend(words(text)),
                           grounding=GroundingConfig(min_embedding=0.0, on_unsupported="replace"))
    pieces = await collect(gen, req)
    assert req.record.backend == "extractive" and "ungrounded" in req.record.fallback_reason
    assert "press and hold" in " ".join(p.text for p in pieces)


async def test_nothing_grounded_falls_back(runtime: Runtime, hits: list[Any]) -> None:
    req = request(hits)
    pieces = await collect(policy_generator(runtime, ScriptedBackend(words("Bananas are yellow and tasty."))), req)
    assert pieces and req.record.backend == "extractive"
    assert "no grounded sentence" in req.record.fallback_reason


async def test_failure_after_a_spoken_sentence_stops_degraded(runtime: Runtime, hits: list[Any]) -> None:
    script = words(GROUNDED)
    req = request(hits)
    pieces = await collect(policy_generator(runtime, ScriptedBackend(script, fail_at=len(script) - 2)), req)
    assert len(pieces) == 1 and req.record.backend == "vllm"
    assert "generation stopped after 1 sentence(s)" in req.record.stopped_reason


async def test_closing_the_answer_closes_the_model_stream(runtime: Runtime, hits: list[Any]) -> None:
    backend = ScriptedBackend(words(GROUNDED) * 3, delay_s=0.01)
    stream = policy_generator(runtime, backend).stream(request(hits))
    first = await anext(stream)
    assert first.text.startswith("To factory reset")
    await stream.aclose()  # barge-in / client cancel
    produced = backend.produced
    await asyncio.sleep(0.05)
    assert backend.closed == 1 and backend.produced == produced


async def test_extractive_policy_needs_no_backend(runtime: Runtime, hits: list[Any]) -> None:
    g = GenerationConfig()
    gen = PolicyGenerator(g.voice, g, extractive=runtime.generator.extractive)  # type: ignore[attr-defined]
    req = request(hits)
    pieces = await collect(gen, req)
    assert pieces and req.record.backend == "extractive" and not req.record.degraded_reason


def test_model_policy_without_backend_is_a_config_error(runtime: Runtime) -> None:
    g = GenerationConfig()
    with pytest.raises(ValueError, match="needs a backend"):
        PolicyGenerator(TaskPolicy(backend="vllm"), g, extractive=runtime.generator.extractive)  # type: ignore


@pytest.mark.parametrize("buffer, final, done, rest", [
    ("Hold it for 10 s [1]. Then rel", False, ["Hold it for 10 s [1]."], "Then rel"),
    ("Hold it for 10 s. [1] Then rel", False, ["Hold it for 10 s [1]."], "Then rel"),
    ("Hold it for 10 s", False, [], "Hold it for 10 s"),
    ("Hold it for 10 s", True, ["Hold it for 10 s"], ""),
    ("Use approx. 5 volts. Then", False, ["Use approx. 5 volts."], "Then"),
])
def test_complete_sentences(buffer: str, final: bool, done: list[str], rest: str) -> None:
    assert complete_sentences(buffer, final) == (done, rest)


def test_prompt_numbers_passages_and_trims_lowest_ranked_first(hits: list[Any]) -> None:
    builder = PromptBuilder(PromptConfig(context_tokens=10_000, passage_tokens=40))
    p = builder.build(QUESTION, hits)
    user = p.messages[-1].content
    assert user.index("[1] (") < user.index("[2] (") < user.index("Question: " + QUESTION)
    assert p.messages[0].role == "system" and "ONLY the numbered passages" in p.messages[0].content
    assert any("cut to 40 tokens" in t for t in p.trimmed)

    tight = PromptBuilder(PromptConfig(context_tokens=260, passage_tokens=400)).build(QUESTION, hits)
    assert tight.prompt_tokens <= 260
    assert any("dropped passage [3]" in t for t in tight.trimmed)
    assert "[1] (" in tight.messages[-1].content, "the top passage is cut, never dropped"


def test_prompt_turns_summary_and_missing_data(hits: list[Any]) -> None:
    from server.generate.base import ConversationTurn
    from server.generate.prompt import MissingData

    turns = [ConversationTurn(f"question {i}", f"answer {i}") for i in range(6)]
    p = PromptBuilder(PromptConfig(max_turns=2)).build(
        QUESTION, hits[:1], turns=turns, summary="the user owns a Lumo plug",
        missing=[MissingData("price data", "do not state a price")])
    roles = [m.role for m in p.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert p.messages[1].content == "question 4", "only the most recent turns are kept"
    assert "No price data is available: do not state a price." in p.messages[0].content
    assert "Earlier in this conversation: the user owns a Lumo plug" in p.messages[-1].content
    squeezed = PromptBuilder(PromptConfig(max_turns=6, context_tokens=180)).build(QUESTION, hits[:1], turns=turns)
    assert "dropped the oldest conversation turn" in squeezed.trimmed


def test_grounding_lexical_and_embedding(runtime: Runtime, hits: list[Any], config: Config) -> None:
    encoder = getattr(runtime.retriever, "dense", None)
    checker = GroundingChecker(config.generation.grounding, runtime.tokenizer,
                               encoder.encoder if encoder is not None else None)
    ok = checker.check("Hold the button on the side for about ten seconds to reset it [1].", hits)
    assert ok.supported and ok.lexical >= 0.5
    wrong_number = checker.check("Press and hold the button for 30 seconds [1].", hits)
    assert not wrong_number.supported and "30" in wrong_number.reason
    off_topic = checker.check("You should call customer support to get a replacement.", hits)
    assert not off_topic.supported
    assert checker.answer_rate("Press and hold the button on its side for 10 seconds. It costs 9 dollars.",
                               hits) == 0.5
