"""The voice generation policy: primary tier (a model backend) -> fallback tier (extractive), as config.

seed 002: the fallback is policy, not an ad hoc try/except. `[generation.voice]` names the backend,
model, LoRA adapter and the tier below. Every way the primary tier can fail maps to that one tier and
is recorded in the call's `GenerationRecord`:

    backend unreachable / 5xx / rejected  -> fallback tier, reason "<backend> <kind>: <detail>"
    no token by the first-token deadline  -> fallback tier
    no whole sentence by the first-chunk deadline (minus the fallback tier's own margin) -> fallback tier
    a sentence the grounding check refuses -> dropped (or, with on_unsupported = "replace" and nothing
                                              spoken yet, the whole answer goes to the fallback tier)
    nothing grounded at all                -> fallback tier
    a sentence the prompt-leak guard refuses (it reproduces the system prompt or talks about its
    instructions) -> never spoken; with on_leak = "replace" (default) the model is treated as
                                              compromised: fallback tier, or the answer stops there
    failure or stall after sentences were spoken -> the answer stops there (a spoken sentence cannot be
                                              taken back), marked DEGRADED with the reason

Before either tier runs, the injection filter (injection.py) removes the passage and question sentences
that try to instruct the model; both tiers, the citations and the grounding check see the screened
passages, and the record lists every removal.

The model's text is cut at sentence boundaries (TTS speaks whole sentences), its [n] markers are kept
when they name a passage the Citations event announced, and a sentence without a marker cites the
passage the grounding check matched it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncGenerator
from concurrent.futures import Executor

from server.config import GenerationConfig, TaskPolicy
from server.generate.backend import BackendError, DecodeLimits, StreamStats, TextBackend, guarded
from server.generate.base import AnswerPiece, GenerationRequest, Source
from server.generate.extractive import ExtractiveGenerator
from server.generate.grounding import GroundingChecker, strip_markers
from server.generate.injection import InjectionFilter, PromptLeakGuard, Removal
from server.generate.prompt import ROBOT_SYSTEM, VOICE_SYSTEM, PromptBuilder
from server.generate.sentences import split_sentences

log = logging.getLogger(__name__)

# Time the extractive tier needs to produce its first sentence, held back from the first-chunk deadline
# when a model tier is running (it measures well under 5 ms; the rest is scheduling slack).
FALLBACK_MARGIN_S = 0.03
# Longest silence between two tokens once the model has started.
STALL_S = 1.5
# "it. [1] Then" -> "it [1]. Then": a marker after the period belongs to the sentence before it.
_MARKER_AFTER_STOP = re.compile(r"([.!?])((?:\s*\[\d{1,2}\])+)")


def complete_sentences(buffer: str, final: bool = False) -> tuple[list[str], str]:
    """Split streamed text into the sentences known to be complete and the rest (still arriving).
    A sentence is complete once the next one has started; at the end of the stream everything is."""
    text = _MARKER_AFTER_STOP.sub(lambda m: m.group(2) + m.group(1), buffer)
    parts = split_sentences(text)
    if final:
        return parts, ""
    if len(parts) <= 1:
        return [], buffer
    rest = text[text.rindex(parts[-1]):] if parts[-1] in text else parts[-1]
    return parts[:-1], rest


class PolicyGenerator:
    """Spoken answers for one task's policy. With `backend=None` it is the extractive generator."""

    def __init__(self, policy: TaskPolicy, cfg: GenerationConfig, *, extractive: ExtractiveGenerator,
                 backend: TextBackend | None = None, prompts: PromptBuilder | None = None,
                 grounding: GroundingChecker | None = None, cpu: Executor | None = None,
                 leak_guard: PromptLeakGuard | None = None) -> None:
        if policy.backend in ("local", "vllm") and (backend is None or prompts is None):
            raise ValueError(f"policy backend {policy.backend!r} needs a backend and a prompt builder")
        self.policy = policy
        self.cfg = cfg
        self.extractive = extractive
        self.backend = backend if policy.backend in ("local", "vllm") else None
        self.prompts = prompts
        self.grounding = grounding if cfg.grounding.enabled else None
        self.cpu = cpu
        self.name = self.backend.name if self.backend is not None else "extractive"
        g = cfg.grounding
        if leak_guard is None and (g.leak_guard or g.filter_injections):
            system = prompts.system if prompts is not None else VOICE_SYSTEM
            leak_guard = PromptLeakGuard(dict.fromkeys((system, VOICE_SYSTEM, ROBOT_SYSTEM)), n=g.leak_ngram,
                                         share=g.leak_share)
        self.leak_guard = leak_guard if g.leak_guard else None
        self.injection = InjectionFilter(leak_guard) if g.filter_injections else None

    def screen(self, request: GenerationRequest) -> tuple[GenerationRequest, list[Removal]]:
        """`request` with the injection filter's removals applied to its question and passages, and the
        removals. Deterministic, so `sources()` and `stream()` agree on the passage numbering."""
        if self.injection is None:
            return request, []
        question, q_removed = self.injection.clean(request.question, "question")
        passages, p_removed = self.injection.screen(request.passages)
        removed = q_removed + p_removed
        if not removed:
            return request, []
        return dataclasses.replace(request, question=question, passages=passages), removed

    def sources(self, request: GenerationRequest) -> list[Source]:
        return self.extractive.sources(self.screen(request)[0])

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[AnswerPiece, None]:
        rec = request.record
        request, removed = self.screen(request)
        if removed:
            rec.injections.extend(r.describe() for r in removed)
            log.warning("injection filter removed %d sentence(s): %s", len(removed), "; ".join(rec.injections)[:500])
        if self.backend is None or not request.question.strip():
            rec.backend = "extractive"
            async for piece in self.extractive.stream(request):
                yield piece
            return
        spoken = 0
        fallback_reason = ""
        try:
            guard = self.leak_guard
            if guard is not None and removed:
                # A model must not repeat what the filter took out either (it never saw it, unless the
                # filter missed a copy elsewhere): the removed text's own n-grams are refused too.
                guard = guard.quarantine([r.text for r in removed],
                                         [request.question, *(h.passage.text for h in request.passages)])
            async with contextlib.aclosing(self._model(request, guard)) as pieces:
                async for piece in pieces:
                    spoken += 1
                    yield piece
        except BackendError as e:
            detail = f"{self.backend.name} {e.kind}: {e}"
            if spoken == 0:
                fallback_reason = detail
            else:
                rec.stopped_reason = f"generation stopped after {spoken} sentence(s): {detail}"
        except _NeedFallback as e:
            fallback_reason = str(e)
        if spoken == 0 and not fallback_reason:
            fallback_reason = (f"{self.backend.name} produced no grounded sentence"
                               if rec.ungrounded or rec.leaks else f"{self.backend.name} produced no answer")
        if fallback_reason:
            rec.fallback_reason = fallback_reason
            rec.backend = "extractive"
            log.info("generation fell back: %s", fallback_reason)
            async for piece in self.extractive.stream(request):
                yield piece

    async def _model(self, request: GenerationRequest,
                     guard: PromptLeakGuard | None) -> AsyncGenerator[AnswerPiece, None]:
        assert self.backend is not None and self.prompts is not None
        rec, policy = request.record, self.policy
        rec.backend, rec.model, rec.adapter = self.backend.name, policy.model, policy.adapter
        sources = self.extractive.sources(request)  # `request` is screened already
        passages = list(request.passages[: len(sources)])
        prompt = self.prompts.build(request.question, passages, turns=request.turns, summary=request.summary)
        rec.prompt_trims = prompt.trimmed
        limits = DecodeLimits(max_tokens=policy.max_tokens, first_token_s=request.first_token_s, stall_s=STALL_S)
        stats = StreamStats()
        deltas = guarded(self.backend.stream(prompt, limits, model=policy.model, adapter=policy.adapter or None),
                         limits, stats)
        spoken, buffer = 0, ""
        try:
            done = False
            while not done:
                timeout = None
                if spoken == 0 and request.first_chunk_deadline is not None:
                    timeout = request.first_chunk_deadline - FALLBACK_MARGIN_S - time.monotonic()
                try:
                    async with asyncio.timeout(None if timeout is None else max(0.0, timeout)):
                        delta = await anext(deltas, None)
                except TimeoutError:
                    raise _NeedFallback(f"{self.backend.name} had no whole sentence by the first-chunk "
                                        f"deadline ({stats.tokens} token(s) in)") from None
                finally:
                    rec.tokens = stats.tokens
                    rec.ttft_ms = stats.first_token_ms or 0.0
                if delta is None:
                    done = True
                else:
                    buffer += delta.text
                ready, buffer = complete_sentences(buffer, final=done)
                for sentence in ready:
                    piece = await self._checked(sentence, request, len(sources), spoken, guard)
                    if piece is None:
                        continue
                    spoken += 1
                    yield piece
                    if spoken >= request.max_sentences:
                        return
        finally:
            with contextlib.suppress(Exception):
                await deltas.aclose()

    async def _checked(self, sentence: str, request: GenerationRequest, n_sources: int, spoken: int,
                       guard: PromptLeakGuard | None) -> AnswerPiece | None:
        """The sentence as it will be spoken, or None when the grounding check drops it."""
        text, markers = strip_markers(sentence)
        if not text or not any(c.isalnum() for c in text):
            return None
        markers = tuple(m for m in markers if 1 <= m <= n_sources)
        if guard is not None:
            # Before grounding, and whatever grounding says: an injected passage can make a leak look
            # supported, and the system prompt is never spoken.
            why = guard.check(text)
            if why:
                request.record.leaks.append(f"{text[:60]!r}: {why}")
                log.warning("prompt-leak guard stopped a sentence: %s", why)
                if self.cfg.grounding.on_leak == "replace":
                    if spoken == 0:
                        raise _NeedFallback(f"prompt-leak guard: a sentence {why}")
                    raise BackendError(f"a sentence {why}", kind="prompt_leak")
                return None
        if self.grounding is not None:
            passages = list(request.passages[:n_sources])
            loop = asyncio.get_running_loop()
            support = await loop.run_in_executor(self.cpu, self.grounding.check, text, passages)
            if not support.supported:
                request.record.ungrounded.append(f"{text!r}: {support.reason}")
                log.info("ungrounded sentence not spoken: %r (%s)", text, support.reason)
                if self.cfg.grounding.on_unsupported == "replace":
                    if spoken == 0:
                        raise _NeedFallback(f"ungrounded sentence ({support.reason})")
                    raise BackendError(f"ungrounded sentence ({support.reason})", kind="ungrounded")
                return None
            if not markers and support.best_passage >= 0:
                markers = (support.best_passage + 1,)
        return AnswerPiece(text, markers)


class _NeedFallback(Exception):
    """The primary tier cannot produce a first sentence in time (or a grounded one): use the fallback."""


__all__ = ["PolicyGenerator", "complete_sentences"]
