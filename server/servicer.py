"""The Assistant gRPC service: validation at the edge, pipelines inside, protobuf mapping on the way out.

Every method goes through `grpc_errors` (the one error mapper) and starts by validating the request,
so a bad request is refused with INVALID_ARGUMENT naming the field before any work starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from server import validation
from server.admission import Admission
from server.errors import (
    REQUEST_ID,
    DeadlineExpired,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    grpc_errors,
)
from server.fallback import RobotSituation
from server.load import CpuPool, LoadGauge, LoopLagProbe
from server.observability.metrics import observe_retrieved
from server.pipeline.answer import AnswerPipeline, AnswerRequest
from server.pipeline.budget import Budget
from server.pipeline.conversation import Conversation
from server.pipeline.events import AnswerEvent, ChunkEvent, CitationsEvent, FinalEvent, PlanResult, TimingEvent
from server.pipeline.plan import PlanPipeline
from server.pipeline.stage import Outcome, StageMissed, Trace, run_stage
from server.proto import SERVICE_NAME, pb
from server.retrieval.checks import checked_search
from server.retrieval.sparse import Filters, Hit
from server.runtime import Runtime
from server.wire import MalformedRequest, safe_deserializer

log = logging.getLogger(__name__)

MODE_PB = {"full": pb.FULL, "degraded": pb.DEGRADED, "fallback": pb.FALLBACK}
OUTCOME_PB = {Outcome.OK: pb.OK, Outcome.SKIPPED: pb.SKIPPED, Outcome.MISSED_BUDGET: pb.MISSED_BUDGET,
              Outcome.FAILED: pb.FAILED}
SOURCE_PB = {"retrieved": pb.RETRIEVED, "model": pb.MODEL, "rules": pb.RULES}
FUSION_FROM_PB = {pb.RRF: "rrf", pb.CONVEX: "convex", pb.SPARSE_ONLY: "sparse", pb.DENSE_ONLY: "dense"}
FUSION_TO_PB = {"rrf": "RRF", "convex": "CONVEX", "sparse": "SPARSE_ONLY", "dense": "DENSE_ONLY"}


def retriever_modes(retriever: Any) -> tuple[str, ...]:
    """Fusion modes the retriever supports, its default first."""
    modes = getattr(retriever, "modes", None)
    if modes is None:
        return ("sparse",)
    available: tuple[str, ...] = modes()
    default = getattr(retriever, "default_mode", available[0])
    return (default, *[m for m in available if m != default])


def _checked(request: Any) -> Any:
    if isinstance(request, MalformedRequest):
        raise request.error()
    return request


def _client_remaining(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left on the caller's deadline; refuses a call whose deadline already passed."""
    remaining = context.time_remaining()
    if remaining is None or math.isinf(remaining):
        return None
    if remaining <= 0.001:
        raise DeadlineExpired("the call's deadline expired before the server could start; send a later deadline")
    return remaining


class AssistantService:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.answers = AnswerPipeline(rt)
        self.plans = PlanPipeline(rt)
        # What admission reads besides slots: the event loop's lag and the CPU pool's queue (server/load.py).
        self.loop_lag = LoopLagProbe()
        self.admission = Admission(rt.cfg.admission,
                                   LoadGauge(rt.cpu if isinstance(rt.cpu, CpuPool) else None, self.loop_lag))
        self.ready = False
        self.draining = False
        """Set on SIGTERM: new calls are refused with UNAVAILABLE while the ones in flight finish."""

    # ------------------------------------------------------------------ registration
    def handlers(self) -> grpc.GenericRpcHandler:
        ser = lambda cls: cls.SerializeToString  # noqa: E731
        methods = {
            "Converse": grpc.stream_stream_rpc_method_handler(
                self.Converse, request_deserializer=safe_deserializer(pb.ConverseRequest),
                response_serializer=ser(pb.AnswerEvent)),
            "Ask": grpc.unary_stream_rpc_method_handler(
                self.Ask, request_deserializer=safe_deserializer(pb.AskRequest),
                response_serializer=ser(pb.AnswerEvent)),
            "Plan": grpc.unary_unary_rpc_method_handler(
                self.Plan, request_deserializer=safe_deserializer(pb.PlanRequest),
                response_serializer=ser(pb.PlanResponse)),
            "Retrieve": grpc.unary_unary_rpc_method_handler(
                self.Retrieve, request_deserializer=safe_deserializer(pb.RetrieveRequest),
                response_serializer=ser(pb.RetrieveResponse)),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    def _begin(self, context: grpc.aio.ServicerContext) -> str:
        request_id = REQUEST_ID.get()
        if self.draining:
            raise Unavailable("the server is shutting down (draining); retry on another replica")
        if not self.ready:
            raise Unavailable("the server is still loading its models and index; retry in a few seconds")
        return request_id

    # ------------------------------------------------------------------ Ask
    @grpc_errors
    async def Ask(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AnswerEvent]:
        request_id = self._begin(context)
        req: pb.AskRequest = _checked(request)
        cfg = self.rt.cfg
        query = validation.query_text(req.query, "query", cfg.limits.max_query_chars)
        _, prof = validation.profile(cfg, req.profile, "voice")
        filters = validation.filters(req.filters, self.rt.kb)
        validation.bounded_text(req.session_id, "session_id", cfg.limits.max_id_chars)
        validation.locale(req.locale, self.rt.kb)
        remaining = _client_remaining(context)
        with await self.admission.admit("Ask", stage_budget_s=prof.retrieve_ms / 1000, client_remaining_s=remaining):
            remaining = _client_remaining(context)
            areq = AnswerRequest(query=query, profile=prof, filters=filters, client_remaining_s=remaining)
            async for ev in self.answers.run(areq):
                yield answer_event_pb(ev, 0, request_id)

    # ------------------------------------------------------------------ Plan
    @grpc_errors
    async def Plan(self, request: Any, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        request_id = self._begin(context)
        req: pb.PlanRequest = _checked(request)
        lim = self.rt.cfg.limits
        robot_id = req.robot_id.strip()
        if not robot_id:
            raise InvalidArgument("robot_id", "is empty; send the robot's fleet id, e.g. 'amr-017'")
        validation.bounded_text(robot_id, "robot_id", lim.max_id_chars)
        for name in ("task", "state", "location"):
            validation.bounded_text(getattr(req, name), name, lim.max_text_chars)
        validation.bounded_text(req.fault_code, "fault_code", 16)
        battery: float | None = None
        if req.HasField("battery_pct"):
            battery = req.battery_pct
            if not (0.0 <= battery <= 100.0):
                raise InvalidArgument("battery_pct", f"must be in 0..100 percent, got {battery}")
        _, prof = validation.profile(self.rt.cfg, req.profile, "robot")
        remaining = _client_remaining(context)
        situation = RobotSituation(robot_id=robot_id, task=req.task.strip(), fault_code=req.fault_code.strip(),
                                   state=req.state.strip(), location=req.location.strip(),
                                   carrying_load=req.carrying_load, battery_pct=battery)
        with await self.admission.admit("Plan", stage_budget_s=prof.retrieve_ms / 1000, client_remaining_s=remaining):
            result = await self.plans.run(situation, prof, _client_remaining(context))
        return plan_pb(result, request_id)

    # ------------------------------------------------------------------ Retrieve
    @grpc_errors
    async def Retrieve(self, request: Any, context: grpc.aio.ServicerContext) -> pb.RetrieveResponse:
        request_id = self._begin(context)
        req: pb.RetrieveRequest = _checked(request)
        cfg = self.rt.cfg
        query = validation.query_text(req.query, "query", cfg.limits.max_query_chars)
        _, prof = validation.profile(cfg, req.profile, "voice")
        k = validation.top_k(req.k, prof.default_k, cfg.retrieval.max_k)
        filters = validation.filters(req.filters, self.rt.kb)
        available = retriever_modes(self.rt.retriever)
        mode = FUSION_FROM_PB.get(req.fusion)
        if mode is not None and mode not in available:
            raise FailedPrecondition(
                f"fusion: {pb.FusionMode.Name(req.fusion)} needs the dense retriever, which this server runs without "
                f"(retrieval.dense.enabled = false); use {' or '.join(FUSION_TO_PB[m] for m in available)} "
                "or leave fusion unset")
        used = mode or available[0]
        remaining = _client_remaining(context)
        ticket = await self.admission.admit("Retrieve", stage_budget_s=prof.retrieve_ms / 1000,
                                            client_remaining_s=remaining)
        with ticket:
            return await self._retrieve(query, k, filters, mode, used, prof, context, request_id)

    async def _retrieve(self, query: str, k: int, filters: Filters, mode: str | None, used: str, prof: Any,
                        context: grpc.aio.ServicerContext, request_id: str) -> pb.RetrieveResponse:
        remaining = _client_remaining(context)
        budget = Budget.start(prof.retrieve_ms / 1000, client_remaining_s=remaining)
        trace = Trace()
        loop = asyncio.get_running_loop()
        kb = self.rt.kb
        try:
            hits = await run_stage("retrieve", lambda: loop.run_in_executor(
                                       self.rt.cpu, checked_search, self.rt.retriever, kb, query, k, filters, mode),
                                   budget=budget, stage_budget_s=prof.retrieve_ms / 1000, trace=trace, mandatory=True)
        except StageMissed as miss:
            t = miss.timing
            if t.outcome is Outcome.MISSED_BUDGET:
                raise DeadlineExpired(f"retrieve {t.detail}") from None
            raise Unavailable(f"retrieve failed: {t.detail}") from None
        assert hits is not None
        observe_retrieved("retrieve", len(hits))
        return pb.RetrieveResponse(
            passages=[pb.ScoredPassage(passage=passage_pb(h), score=h.score, rank=i + 1) for i, h in enumerate(hits)],
            timings=[timing_pb(t) for t in trace.timings], total_ms=budget.elapsed_ms(), request_id=request_id,
            fusion=getattr(pb, FUSION_TO_PB[used]))

    # ------------------------------------------------------------------ Converse
    @grpc_errors
    async def Converse(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AnswerEvent]:
        request_id = self._begin(context)
        voice = self.rt.cfg.profiles["voice"]
        ticket = await self.admission.admit("Converse", stage_budget_s=voice.retrieve_ms / 1000,
                                            client_remaining_s=_client_remaining(context))
        with ticket:  # the stream holds its voice slot until it ends
            session = ConverseSession(self, request_id, context)
            async for ev in session.run(request_iterator):
                yield ev


class ConverseSession:
    """One Converse stream: reads transcripts, retrieves early, answers finals, handles barge-in.

    A reader task consumes the request stream; answers run as tasks that push events into one
    outgoing queue. A partial transcript arriving while an answer streams is barge-in: the answer
    task is cancelled at once (its generator closes in `finally`) and a final event marks it
    interrupted. Client cancel or any exit cancels every task this session started.
    """

    _END = object()

    def __init__(self, svc: AssistantService, request_id: str, context: grpc.aio.ServicerContext) -> None:
        self.svc = svc
        self.cfg = svc.rt.cfg
        self.request_id = request_id
        self.context = context
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.profile = self.cfg.profiles["voice"]
        self.filters: Filters = {}
        self.utterance = 0
        self.last_sequence = -1
        self.answer: asyncio.Task[None] | None = None
        self.early: asyncio.Task[list[Hit]] | None = None
        self.early_query = ""
        self.pending_partial = False  # partials seen for the current utterance, no final yet
        self.partials = 0  # how many (voice.max_partials bounds them)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.conversation = Conversation(self.cfg.generation.prompt.max_turns)

    async def run(self, request_iterator: Any) -> AsyncIterator[pb.AnswerEvent]:
        reader = asyncio.create_task(self._read(request_iterator))
        self.tasks.add(reader)
        try:
            while True:
                item = await self.out.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _read(self, request_iterator: Any) -> None:
        try:
            first = True
            async for raw in self._messages(request_iterator):
                msg: pb.ConverseRequest = _checked(raw)
                kind = msg.WhichOneof("event")
                if kind == "start":
                    if not first:
                        raise InvalidArgument("start", "must be the first message of the stream")
                    self._start(msg.start)
                elif kind == "transcript":
                    await self._transcript(msg.transcript)
                else:
                    raise InvalidArgument("event", "is empty; send `start` or `transcript`")
                first = False
            if self.pending_partial or (self.utterance == 0 and self.answer is None):
                raise InvalidArgument("transcript", "the stream ended without a final transcript (is_final = true); "
                                      "send the final transcript before closing, or cancel the call")
            if self.answer is not None:
                await asyncio.shield(self.answer)
            self.out.put_nowait(self._END)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the response loop, which maps it to a status
            self.out.put_nowait(e)

    async def _messages(self, request_iterator: Any) -> AsyncIterator[Any]:
        """The client's messages. After voice.idle_timeout_s with none while no answer is streaming (the
        client is not listening to anything), the stream ends with DEADLINE_EXCEEDED: an abandoned stream
        must not hold its voice slot forever."""
        it = request_iterator.__aiter__()
        idle_s = self.cfg.voice.idle_timeout_s
        pending: asyncio.Future[Any] | None = None
        try:
            while True:
                pending = asyncio.ensure_future(it.__anext__())
                while not (await asyncio.wait({pending}, timeout=idle_s))[0]:
                    if self.answer is None or self.answer.done():
                        raise DeadlineExpired(f"no message on this Converse stream for {idle_s:g} s "
                                              "(voice.idle_timeout_s); open a stream per interaction")
                try:
                    msg = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield msg
        finally:
            if pending is not None:
                # The read may end by itself as we cancel it (gRPC's reader can finish with StopAsyncIteration
                # instead of CancelledError): mark its outcome seen either way, so the loop does not log
                # "Task exception was never retrieved" at exit.
                pending.add_done_callback(_outcome_seen)
                pending.cancel()

    def _start(self, start: pb.SessionStart) -> None:
        _, self.profile = validation.profile(self.cfg, start.profile, "voice")
        self.filters = validation.filters(start.filters, self.svc.rt.kb, field="start.filters")
        validation.bounded_text(start.session_id, "start.session_id", self.cfg.limits.max_id_chars)

    async def _transcript(self, t: pb.TranscriptPartial) -> None:
        if t.sequence <= self.last_sequence:
            raise InvalidArgument("transcript.sequence", f"must increase within a stream; got {t.sequence} after "
                                  f"{self.last_sequence}")
        self.last_sequence = t.sequence
        if not 0.0 <= t.stability <= 1.0:
            raise InvalidArgument("transcript.stability", f"must be in [0, 1], got {t.stability}")
        if self.answer is not None and not self.answer.done():
            await self._barge_in()
        if not t.is_final:
            text = validation.bounded_text(t.text, "transcript.text", self.cfg.limits.max_query_chars)
            self.partials += 1
            if self.partials > self.cfg.voice.max_partials:
                raise InvalidArgument("transcript", f"more than {self.cfg.voice.max_partials} partial transcripts "
                                      "for one utterance (voice.max_partials); send is_final = true to end it")
            self.pending_partial = True
            self._maybe_retrieve_early(text, t.stability)
            return
        if self.utterance >= self.cfg.voice.max_utterances:
            raise InvalidArgument("transcript", f"more than {self.cfg.voice.max_utterances} utterances in one stream; "
                                  "open a new stream")
        query = validation.query_text(t.text, "transcript.text", self.cfg.limits.max_query_chars)
        early = self._reusable_early(query)
        remaining = _client_remaining(self.context)
        areq = AnswerRequest(query=query, profile=self.profile, filters=self.filters,
                             client_remaining_s=remaining, early=early, turns=self.conversation.turns(),
                             summary=self.conversation.summary)
        utterance = self.utterance
        self.utterance += 1
        self.pending_partial = False
        self.partials = 0
        self.early, self.early_query = None, ""
        self.answer = self._spawn(self._answer(areq, utterance))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _answer(self, areq: AnswerRequest, utterance: int) -> None:
        final_sent = False
        try:
            async for ev in self.svc.answers.run(areq):
                if isinstance(ev, FinalEvent):
                    final_sent = True
                    self.conversation.add(areq.query, ev.answer_text)
                self.out.put_nowait(answer_event_pb(ev, utterance, self.request_id))
        except asyncio.CancelledError:
            if not final_sent:  # barge-in: tell the client this answer was cut short
                self.conversation.add(areq.query, "")
                self.out.put_nowait(pb.AnswerEvent(utterance=utterance, final=pb.AnswerFinal(
                    mode=pb.DEGRADED, reason="interrupted by barge-in", interrupted=True,
                    generator=self.svc.rt.generator.name, request_id=self.request_id,
                    total_ms=(time.monotonic() - areq.started) * 1000)))
            raise

    async def _barge_in(self) -> None:
        assert self.answer is not None
        self.answer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.answer
        self.answer = None

    def _maybe_retrieve_early(self, text: str, stability: float) -> None:
        vc = self.cfg.voice
        if stability < vc.early_retrieval_stability:
            return
        tokens = self.svc.rt.tokenizer(text)
        if len(tokens) < vc.early_retrieval_min_words:
            return
        if self.early is not None and _overlap(tokens, self.svc.rt.tokenizer(self.early_query)) >= vc.reuse_min_overlap:
            return  # what is already running answers this partial too
        if self.early is not None:
            self.early.cancel()
        self.early_query = text
        self.early = self._spawn(self._search(text))

    async def _search(self, text: str) -> list[Hit]:
        return await self.svc.answers.search(text, self.profile.default_k, self.filters)

    def _reusable_early(self, final_query: str) -> asyncio.Task[list[Hit]] | None:
        if self.early is None:
            return None
        tok = self.svc.rt.tokenizer
        if _overlap(tok(final_query), tok(self.early_query)) >= self.cfg.voice.reuse_min_overlap:
            return self.early
        self.early.cancel()
        return None


def _outcome_seen(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _overlap(a: list[str], b: list[str]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


# ---------------------------------------------------------------------- protobuf mapping
def timing_pb(t: Any) -> pb.StageTiming:
    return pb.StageTiming(stage=t.stage, elapsed_ms=t.elapsed_ms, budget_ms=t.budget_ms,
                          outcome=OUTCOME_PB[t.outcome], detail=t.detail)


def passage_pb(h: Hit) -> pb.Passage:
    p = h.passage
    return pb.Passage(id=p.id, text=p.text, intent=p.intent, domain=p.domain, locale=p.locale, source=p.source,
                      confidence=p.confidence, fault_code=p.fault_code)


def answer_event_pb(ev: AnswerEvent, utterance: int, request_id: str) -> pb.AnswerEvent:
    if isinstance(ev, ChunkEvent):
        return pb.AnswerEvent(utterance=utterance, chunk=pb.AnswerChunk(text=ev.text, index=ev.index,
                                                                        citation_markers=list(ev.markers)))
    if isinstance(ev, CitationsEvent):
        return pb.AnswerEvent(utterance=utterance, citations=pb.CitationList(citations=[
            pb.Citation(marker=s.marker, passage_id=s.passage_id, source=s.source, snippet=s.snippet)
            for s in ev.sources]))
    if isinstance(ev, TimingEvent):
        return pb.AnswerEvent(utterance=utterance, timing=timing_pb(ev.timing))
    return pb.AnswerEvent(utterance=utterance, final=pb.AnswerFinal(
        mode=MODE_PB[ev.mode.value], reason=ev.reason, missed_stage=ev.missed_stage,
        timings=[timing_pb(t) for t in ev.timings], answer_text=ev.answer_text, generator=ev.generator,
        total_ms=ev.total_ms, first_chunk_ms=ev.first_chunk_ms, early_retrieval_used=ev.early_retrieval_used,
        interrupted=ev.interrupted, request_id=request_id, generation=_generation_pb(ev)))


def _generation_pb(ev: FinalEvent) -> pb.GenerationInfo:
    r = ev.generation
    if r is None:  # the fallback planner answered: no generator ran to completion
        return pb.GenerationInfo(backend=ev.generator)
    return pb.GenerationInfo(backend=r.backend or ev.generator, model=r.model, adapter=r.adapter, ttft_ms=r.ttft_ms,
                             tokens=r.tokens, fallback_reason=r.fallback_reason,
                             ungrounded_dropped=len(r.ungrounded), prompt_trims=list(r.prompt_trims),
                             leaks_refused=len(r.leaks), injections_removed=len(r.injections))


def _param_pb(value: Any) -> pb.ParamValue:
    if isinstance(value, bool) or isinstance(value, str):
        return pb.ParamValue(text=str(value))
    if isinstance(value, int):
        return pb.ParamValue(integer=value)
    return pb.ParamValue(number=float(value))


_STEPS_PB: dict[tuple[Any, ...], list[pb.PlanStep]] = {}
_STEPS_PB_SIZE = 4096


def _steps_pb(steps: Sequence[Any]) -> list[pb.PlanStep]:
    """The wire form of a plan's steps, remembered per plan: most responses carry one of a few hundred rule
    and procedure plans, and building the step messages was about a quarter of our handler's time for an answered-by-rule Plan.
    The cached messages are only ever copied into responses, never changed."""
    # Keyed with each value's type: 5 == 5.0 == True in Python, but they go on the wire as different fields.
    key = tuple((s.action, *((k, type(v), v) for k, v in s.params.items())) for s in steps)
    try:
        found = _STEPS_PB.get(key)
        cacheable = True
    except TypeError:  # a parameter value of an unhashable type: build it each time
        found, cacheable = None, False
    if found is None:
        found = [pb.PlanStep(action=s.action, params={k: _param_pb(v) for k, v in s.params.items()}) for s in steps]
        if cacheable:
            if len(_STEPS_PB) >= _STEPS_PB_SIZE:
                _STEPS_PB.clear()
            _STEPS_PB[key] = found
    return found


def plan_pb(r: PlanResult, request_id: str) -> pb.PlanResponse:
    return pb.PlanResponse(
        steps=_steps_pb(r.steps),
        source=SOURCE_PB[r.source.value], mode=MODE_PB[r.mode.value], reason=r.reason, missed_stage=r.missed_stage,
        rule_id=r.rule_id, total_ms=r.total_ms, request_id=request_id,
        citations=[pb.Citation(marker=c.marker, passage_id=c.passage_id, source=c.source, snippet=c.snippet)
                   for c in r.citations],
        timings=[timing_pb(t) for t in r.timings])
