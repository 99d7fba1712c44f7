"""The voice answer pipeline (Ask, and each utterance of Converse).

    retrieve (mandatory) -> rerank (optional) -> generate (mandatory, streamed by sentence)
                 \\ miss or failure of a mandatory stage -> fallback planner's spoken answer

Two deadlines: the *first chunk* deadline (profile.first_chunk_ms, or the client's deadline if
sooner) bounds every stage before the first sentence; the *answer* deadline (profile.total_ms, or the
client's) bounds the rest of the stream, with a stall limit between sentences.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from server.config import ProfileConfig
from server.generate.base import AnswerPiece, ConversationTurn, GenerationRecord, GenerationRequest
from server.generate.sentences import split_sentences
from server.observability.metrics import observe_answer, observe_retrieved
from server.pipeline.budget import Budget
from server.pipeline.events import AnswerEvent, ChunkEvent, CitationsEvent, FinalEvent, Mode, TimingEvent
from server.pipeline.rerank import RerankStage
from server.pipeline.stage import Outcome, StageMissed, StageTiming, Trace, run_stage
from server.retrieval.checks import checked_search
from server.retrieval.sparse import Filters, Hit
from server.runtime import Runtime

log = logging.getLogger(__name__)

# Between two sentences of a streamed answer: longer than this and the answer ends DEGRADED.
STALL_S = 2.0


@dataclass(slots=True)
class AnswerRequest:
    query: str
    profile: ProfileConfig
    filters: Filters = field(default_factory=dict)
    client_remaining_s: float | None = None
    # Retrieval started on a stable partial transcript, reusable for this query (Converse).
    early: Awaitable[list[Hit]] | None = None
    # Converse: the session's recent turns and summary of older ones, for model tiers' prompts.
    turns: tuple[ConversationTurn, ...] = ()
    summary: str = ""
    started: float = field(default_factory=time.monotonic)


class AnswerPipeline:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.rerank = RerankStage(rt.cfg.rerank, rt.reranker, rt.cpu, measured_pair_ms=rt.rerank_pair_ms)

    def search(self, query: str, k: int, filters: Filters) -> Awaitable[list[Hit]]:
        """Retrieval off the event loop, in the CPU pool (a deeper list when rerank needs a head)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self.rt.cpu, checked_search, self.rt.retriever, self.rt.kb, query,
                                    self.rerank.fetch_k(k), filters)

    async def run(self, req: AnswerRequest) -> AsyncIterator[AnswerEvent]:
        p = req.profile
        first = Budget.start(p.first_chunk_ms / 1000, client_remaining_s=req.client_remaining_s,
                             reserve_s=p.fallback_reserve_ms / 1000)
        answer_deadline = first.started + min(p.total_ms / 1000, req.client_remaining_s or float("inf"))
        trace = Trace()
        sent = 0
        ev: AnswerEvent

        def new_timings() -> list[TimingEvent]:
            nonlocal sent
            out = [TimingEvent(t) for t in trace.timings[sent:]]
            sent = len(trace.timings)
            return out

        # -- retrieve (mandatory)
        early, early_used = req.early, req.early is not None

        async def retrieve() -> list[Hit]:
            return await (early if early is not None else self.search(req.query, p.default_k, req.filters))

        try:
            hits = await run_stage("retrieve", retrieve, budget=first, stage_budget_s=p.retrieve_ms / 1000,
                                   trace=trace, mandatory=True)
        except StageMissed as miss:
            async for ev in self._fallback(req, trace, first, miss.timing, Mode.FALLBACK, early_used, new_timings()):
                yield ev
            return
        for ev in new_timings():
            yield ev
        assert hits is not None
        observe_retrieved("answer", len(hits))
        if not hits:
            why = StageTiming("retrieve", 0.0, 0.0, Outcome.OK, "retrieval found no passage for the question")
            async for ev in self._fallback(req, trace, first, why, Mode.DEGRADED, early_used, []):
                yield ev
            return

        # -- rerank (optional): as much of the head as fits; a miss keeps the fused order
        hits = await self.rerank.run(req.query, hits, p.default_k, budget=first, stage_budget_s=p.rerank_ms / 1000,
                                     trace=trace)
        for ev in new_timings():
            yield ev

        # -- generate (mandatory): the first sentence must arrive inside the first-chunk budget. A model
        # tier gets the profile's first-token limit and hands over to its fallback tier (extractive)
        # early enough for that tier to answer inside the same budget; only if the whole generator
        # fails does the fallback planner speak.
        gen = self.rt.generator
        gen_window = first.for_stage(float("inf"))
        gen_req = GenerationRequest(req.query, hits, self.rt.cfg.generation.max_sentences,
                                    first_token_s=min(p.first_token_ms / 1000, gen_window),
                                    first_chunk_deadline=time.monotonic() + gen_window,
                                    turns=req.turns, summary=req.summary)
        record = gen_req.record
        yield CitationsEvent(gen.sources(gen_req))
        stream = gen.stream(gen_req)
        pieces: list[AnswerPiece] = []
        first_chunk_ms = 0.0
        mode, reason, missed = Mode.FULL, "", ""
        try:
            try:
                piece = await run_stage("generate", lambda: _checked_next(stream), budget=first,
                                        stage_budget_s=gen_window, trace=trace, mandatory=True)
            except StageMissed as miss:
                async for ev in self._fallback(req, trace, first, miss.timing, Mode.FALLBACK, early_used,
                                               new_timings(), record):
                    yield ev
                return
            for ev in new_timings():
                yield ev
            if piece is None:
                why = StageTiming("generate", 0.0, 0.0, Outcome.OK,
                                  "no retrieved sentence supports an answer to the question")
                async for ev in self._fallback(req, trace, first, why, Mode.DEGRADED, early_used, [], record):
                    yield ev
                return
            while piece is not None:
                pieces.append(piece)
                if len(pieces) == 1:
                    first_chunk_ms = first.elapsed_ms()
                yield ChunkEvent(piece.text, len(pieces) - 1, piece.markers)
                left = answer_deadline - time.monotonic()
                try:
                    async with asyncio.timeout(max(0.0, min(STALL_S, left))):
                        piece = check_piece(await anext(stream, None))
                except TimeoutError:
                    mode, missed = Mode.DEGRADED, "generate"
                    reason = (f"generation stopped after {len(pieces)} sentence(s): "
                              f"{'answer deadline reached' if left <= STALL_S else 'stalled'}")
                    piece = None
                except Exception as e:  # a spoken sentence cannot be taken back: stop here, DEGRADED
                    mode, missed = Mode.DEGRADED, "generate"
                    reason = f"generation failed after {len(pieces)} sentence(s): {type(e).__name__}: {e}"[:300]
                    piece = None
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
        optional_miss = trace.degraded_by
        if mode is Mode.FULL and optional_miss is not None:
            mode, missed = Mode.DEGRADED, optional_miss.stage
            reason = f"{optional_miss.stage} {optional_miss.detail}; kept the fused order"
        if mode is Mode.FULL and record.degraded_reason:
            mode, missed, reason = Mode.DEGRADED, "generate", record.degraded_reason
        log_generation(record)
        observe_answer(record, len(pieces))
        yield FinalEvent(mode=mode, reason=reason, missed_stage=missed, timings=list(trace.timings),
                         answer_text=_with_markers(pieces), generator=record.backend or gen.name,
                         total_ms=first.elapsed_ms(), first_chunk_ms=first_chunk_ms, early_retrieval_used=early_used,
                         generation=record)

    async def _fallback(self, req: AnswerRequest, trace: Trace, budget: Budget, cause: StageTiming, mode: Mode,
                        early_used: bool, pending: list[TimingEvent],
                        record: GenerationRecord | None = None) -> AsyncIterator[AnswerEvent]:
        """The fallback planner's spoken answer, after the timings not yet sent (`pending`). `record` is the
        generator's, when it ran before the fallback took over: what it found (injections removed, leaks
        refused) still reaches the caller."""
        for ev in pending:
            yield ev
        t0 = time.perf_counter()
        answer = self.rt.planner.answer(req.query, _intent_filter(req.filters))
        fb = trace.record(StageTiming("fallback", (time.perf_counter() - t0) * 1000, 0.0, Outcome.OK,
                                      f"rule {answer.rule_id}"))
        yield TimingEvent(fb)
        sentences = split_sentences(answer.text) or [answer.text]
        first_chunk_ms = budget.elapsed_ms()
        for i, s in enumerate(sentences):
            yield ChunkEvent(s, i)
        missed = cause.stage if mode is Mode.FALLBACK else ""
        reason = f"{cause.stage} {cause.detail}; answered by the fallback planner" if mode is Mode.FALLBACK \
            else f"{cause.detail}; answered by the fallback planner"
        yield FinalEvent(mode=mode, reason=reason, missed_stage=missed, timings=list(trace.timings),
                         answer_text=" ".join(sentences), generator="fallback", total_ms=budget.elapsed_ms(),
                         first_chunk_ms=first_chunk_ms, early_retrieval_used=early_used,
                         generation=None if record is None else dataclasses.replace(record, backend="fallback"))


class InvalidPiece(ValueError):
    """The generator yielded something that is not a speakable sentence (empty, not text)."""


def check_piece(piece: AnswerPiece | None) -> AnswerPiece | None:
    if piece is None:
        return None
    if not isinstance(piece, AnswerPiece) or not isinstance(piece.text, str) or not piece.text.strip():
        raise InvalidPiece(f"generator yielded an empty or non-text piece: {piece!r}"[:200])
    return piece


async def _checked_next(stream: AsyncIterator[AnswerPiece]) -> AnswerPiece | None:
    return check_piece(await anext(stream, None))


def log_generation(record: GenerationRecord) -> None:
    """One line per generation call: which tier answered, how fast, and why it fell back (seed 002)."""
    if record.backend:
        log.info("generation backend=%s model=%s adapter=%s ttft_ms=%.1f tokens=%d fallback=%r ungrounded=%d "
                 "leaks=%d injections_removed=%d trims=%d", record.backend, record.model or "-",
                 record.adapter or "-", record.ttft_ms, record.tokens, record.fallback_reason,
                 len(record.ungrounded), len(record.leaks), len(record.injections), len(record.prompt_trims))


def _intent_filter(filters: Filters) -> str | None:
    intents = filters.get("intent") or ()
    return intents[0] if len(intents) == 1 else None


def _with_markers(pieces: list[AnswerPiece]) -> str:
    return " ".join(p.text + "".join(f" [{m}]" for m in p.markers) for p in pieces)
