"""Async client for the Assistant service: one reused channel, a deadline per call, typed results.

    async with AssistantClient("127.0.0.1:50051") as c:                      # plaintext, loopback
        reply = await c.plan_reply("fl-004", fault_code="E202", carrying_load=True)
        print(reply.mode, [s.action for s in reply.steps], f"{reply.latency_ms:.1f} ms")
        answer = await c.ask("how do i reset my smart plug")
        print(answer.text, answer.first_chunk_ms)

    tls = TlsOptions.from_files(ca="ca.pem", cert="client.pem", key="client.key")   # mTLS
    AssistantClient("rag.internal:443", tls=tls, token="...")   # + `authorization: Bearer ...`

Retries: only unary calls (Plan, Retrieve are reads, safe to repeat) that failed with UNAVAILABLE, i.e.
the request never reached a handler (connect refused, server restarting, GOAWAY). Every attempt runs
inside the one deadline of the call, so a retry can never make a call later than its deadline. A streamed
answer is retried only while no event has arrived; once the user may have heard part of it, never.

`plan()` / `retrieve()` return the protobuf responses (typed by the generated .pyi); `plan_reply()` /
`retrieve_reply()` return plain dataclasses with enum names resolved and the client-side latency.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from server.proto import pb, pb_grpc
from server.robot_plan import PlanStep
from server.security import is_loopback

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
# Retry backoff: first wait, growth and cap (with full jitter so a restarted server is not stampeded).
RETRY_FIRST_S = 0.05
RETRY_CAP_S = 1.0


# ---------------------------------------------------------------------------------------------- security
@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel. With no `root_certs` the system trust store verifies the server; with
    `client_cert` + `client_key` the client also proves who it is (mutual TLS)."""

    root_certs: bytes | None = None
    """PEM of the CA(s) that signed the server's certificate."""
    client_cert: bytes | None = None
    """PEM certificate chain of this client (mTLS)."""
    client_key: bytes | None = None
    """PEM private key of `client_cert`."""
    server_name: str = ""
    """Name to check the server certificate against when it differs from the target's host (e.g. the
    target is an IP address but the certificate names `snaprag.internal`)."""

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mTLS needs both client_cert and client_key (PEM); pass both or neither")

    @classmethod
    def from_files(cls, *, ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None, server_name: str = "") -> TlsOptions:
        def read(p: str | Path | None, what: str) -> bytes | None:
            if p is None:
                return None
            try:
                return Path(p).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the {what} file {p}: {e.strerror}; check the path") from None

        return cls(read(ca, "CA certificate"), read(cert, "client certificate"), read(key, "client key"),
                   server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certs, private_key=self.client_key,
                                            certificate_chain=self.client_cert)


def make_channel(target: str, *, tls: TlsOptions | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    opts = [("grpc.enable_retries", 0),  # retries are ours (above): only where safe, inside the deadline
            ("grpc.keepalive_time_ms", 30_000), *options]
    if tls is None:
        return grpc.aio.insecure_channel(target, options=opts)
    if tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, tls.credentials(), options=opts)


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class StageTime:
    """One server stage's time against its budget (from a response's `timings`)."""

    stage: str
    elapsed_ms: float
    budget_ms: float
    outcome: str
    """OK, SKIPPED, MISSED_BUDGET or FAILED."""
    detail: str = ""

    @classmethod
    def from_pb(cls, t: pb.StageTiming) -> StageTime:
        return cls(t.stage, t.elapsed_ms, t.budget_ms, pb.StageOutcome.Name(t.outcome), t.detail)


@dataclass(frozen=True)
class CitationRef:
    marker: int
    passage_id: str
    source: str
    snippet: str = ""


def param_value(v: pb.ParamValue) -> str | int | float:
    kind = v.WhichOneof("kind")
    return getattr(v, kind) if kind else ""


def plan_steps(resp: pb.PlanResponse) -> list[dict[str, Any]]:
    """The response's steps as `[{"action", "params"}]`, the shape `ActionVocabulary.parse_steps` reads."""
    return [{"action": s.action, "params": {k: param_value(v) for k, v in s.params.items()}} for s in resp.steps]


def miss_offset_ms(timings: Sequence[StageTime]) -> float | None:
    """Server time from the start of the pipeline to the first missed or failed stage giving up (None when
    no stage missed): the stages before it plus its own elapsed time."""
    at = 0.0
    for t in timings:
        at += t.elapsed_ms
        if t.outcome in ("MISSED_BUDGET", "FAILED"):
            return at
    return None


@dataclass(frozen=True)
class PlanReply:
    """A Plan response with enum names resolved, steps as `server.robot_plan.PlanStep`, and the
    client-side round trip."""

    steps: tuple[PlanStep, ...]
    source: str
    """RETRIEVED, MODEL or RULES."""
    mode: str
    """FULL, DEGRADED or FALLBACK."""
    reason: str
    missed_stage: str
    rule_id: str
    citations: tuple[CitationRef, ...]
    timings: tuple[StageTime, ...]
    total_ms: float
    """Server-side pipeline time."""
    request_id: str
    latency_ms: float
    """Client-side: request sent to response parsed (retries included)."""
    raw: pb.PlanResponse = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, resp: pb.PlanResponse, latency_ms: float = 0.0) -> PlanReply:
        steps = tuple(PlanStep(s["action"], s["params"]) for s in plan_steps(resp))
        return cls(steps, pb.PlanSource.Name(resp.source), pb.ServingMode.Name(resp.mode), resp.reason,
                   resp.missed_stage, resp.rule_id,
                   tuple(CitationRef(c.marker, c.passage_id, c.source, c.snippet) for c in resp.citations),
                   tuple(StageTime.from_pb(t) for t in resp.timings), resp.total_ms, resp.request_id, latency_ms,
                   resp)


@dataclass(frozen=True)
class RetrievedPassage:
    id: str
    text: str
    score: float
    rank: int
    intent: str
    domain: str
    source: str
    fault_code: str = ""


@dataclass(frozen=True)
class RetrieveReply:
    passages: tuple[RetrievedPassage, ...]
    fusion: str
    timings: tuple[StageTime, ...]
    total_ms: float
    request_id: str
    latency_ms: float
    raw: pb.RetrieveResponse = field(repr=False, compare=False)

    @classmethod
    def from_pb(cls, resp: pb.RetrieveResponse, latency_ms: float = 0.0) -> RetrieveReply:
        passages = tuple(RetrievedPassage(sp.passage.id, sp.passage.text, sp.score, sp.rank, sp.passage.intent,
                                          sp.passage.domain, sp.passage.source, sp.passage.fault_code)
                         for sp in resp.passages)
        return cls(passages, pb.FusionMode.Name(resp.fusion), tuple(StageTime.from_pb(t) for t in resp.timings),
                   resp.total_ms, resp.request_id, latency_ms, resp)


@dataclass
class Answer:
    """A whole Ask/Converse answer, assembled from its events."""

    chunks: list[str] = field(default_factory=list)
    citations: list[Any] = field(default_factory=list)
    timings: list[Any] = field(default_factory=list)
    final: Any = None
    first_chunk_s: float | None = None  # client-side, from the request (Ask) or the final transcript

    @property
    def text(self) -> str:
        return " ".join(self.chunks)

    @property
    def mode(self) -> str:
        return pb.ServingMode.Name(self.final.mode) if self.final is not None else "NONE"

    @property
    def first_chunk_ms(self) -> float | None:
        return None if self.first_chunk_s is None else self.first_chunk_s * 1000.0

    @property
    def interrupted(self) -> bool:
        return bool(self.final is not None and self.final.interrupted)

    @property
    def stage_times(self) -> list[StageTime]:
        return [StageTime.from_pb(t) for t in (self.final.timings if self.final is not None else self.timings)]


def filters_pb(filters: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    return {k: pb.FilterValues(values=list(v)) for k, v in (filters or {}).items()}


# ---------------------------------------------------------------------------------------------- client
class AssistantClient:
    """One channel per client, reused by every call (HTTP/2 multiplexes them); close it when done."""

    def __init__(self, target: str, *, timeout_s: float = 5.0, retries: int = 2,
                 channel: grpc.aio.Channel | None = None, tls: TlsOptions | None = None, token: str | None = None,
                 allow_plaintext_token: bool = False, options: Sequence[tuple[str, Any]] = ()) -> None:
        """`timeout_s`: deadline of every call that does not pass its own. `retries`: extra attempts of a
        unary call after UNAVAILABLE. `token`: bearer token sent as `authorization` metadata on every call;
        refused over plaintext to anything but loopback unless `allow_plaintext_token` (it would travel
        in clear text)."""
        if token is not None and not token.strip():
            raise ValueError("token is empty; pass the bearer token string, or None for no token")
        if token and tls is None and channel is None and not is_loopback(target) and not allow_plaintext_token:
            raise ValueError(f"refusing to send a bearer token in plaintext to {target}: pass tls=TlsOptions(...) "
                             "(`--tls` / `--ca` on the CLI) or use a loopback address")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token.strip()}"),) if token else ()
        self.channel = channel or make_channel(target, tls=tls, options=options)
        self.stub = pb_grpc.AssistantStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AssistantClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _metadata(self, extra: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...] | None:
        md = (*self.metadata, *extra)
        return md or None

    async def _unary(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        delay = RETRY_FIRST_S
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            try:
                return await method(request, timeout=max(left, 0.001), metadata=self._metadata())
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                wait = random.uniform(0, delay)
                if time.monotonic() + wait >= deadline:
                    raise  # no time left for another attempt: the caller sees the real cause
                await asyncio.sleep(wait)
                delay = min(delay * 2, RETRY_CAP_S)
        raise AssertionError("unreachable")

    async def plan(self, robot_id: str, *, task: str = "", fault_code: str = "", state: str = "", location: str = "",
                   carrying_load: bool = False, battery_pct: float | None = None, profile: str = "",
                   timeout_s: float | None = None) -> pb.PlanResponse:
        req = pb.PlanRequest(robot_id=robot_id, task=task, fault_code=fault_code, state=state, location=location,
                             carrying_load=carrying_load, profile=profile)
        if battery_pct is not None:
            req.battery_pct = battery_pct
        return await self._unary(self.stub.Plan, req, timeout_s)

    async def plan_reply(self, robot_id: str, **kw: Any) -> PlanReply:
        t0 = time.perf_counter()
        resp = await self.plan(robot_id, **kw)
        return PlanReply.from_pb(resp, (time.perf_counter() - t0) * 1000.0)

    async def retrieve(self, query: str, *, k: int = 0, filters: Mapping[str, Sequence[str]] | None = None,
                       fusion: int = 0, profile: str = "", timeout_s: float | None = None) -> pb.RetrieveResponse:
        req = pb.RetrieveRequest(query=query, k=k, filters=filters_pb(filters), fusion=fusion, profile=profile)
        return await self._unary(self.stub.Retrieve, req, timeout_s)

    async def retrieve_reply(self, query: str, **kw: Any) -> RetrieveReply:
        t0 = time.perf_counter()
        resp = await self.retrieve(query, **kw)
        return RetrieveReply.from_pb(resp, (time.perf_counter() - t0) * 1000.0)

    def ask_stream(self, query: str, *, profile: str = "", filters: Mapping[str, Sequence[str]] | None = None,
                   locale: str = "", session_id: str = "", timeout_s: float | None = None) -> Any:
        """The raw event stream (a grpc call object: iterate it, or `.cancel()` it). Not retried."""
        req = pb.AskRequest(query=query, profile=profile, filters=filters_pb(filters), locale=locale,
                            session_id=session_id)
        return self.stub.Ask(req, timeout=timeout_s or self.timeout_s, metadata=self._metadata())

    async def ask(self, query: str, **kw: Any) -> Answer:
        """The whole answer. Retried after UNAVAILABLE only while no event has arrived (nothing was spoken)."""
        delay = RETRY_FIRST_S
        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            answer = Answer()
            got_any = False
            try:
                async for ev in self.ask_stream(query, **kw):
                    got_any = True
                    collect(answer, ev, t0, time.perf_counter())
                return answer
            except grpc.aio.AioRpcError as e:
                if got_any or e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, RETRY_CAP_S)
        raise AssertionError("unreachable")

    def converse(self, requests: AsyncIterator[Any] | Iterable[Any], *, timeout_s: float | None = None) -> Any:
        """A Converse stream (never retried: the request stream is consumed as it is sent)."""
        return self.stub.Converse(requests, timeout=timeout_s or self.timeout_s, metadata=self._metadata())


def collect(answer: Answer, ev: Any, t0: float, now: float) -> None:
    kind = ev.WhichOneof("event")
    if kind == "chunk":
        if answer.first_chunk_s is None:
            answer.first_chunk_s = now - t0
        answer.chunks.append(ev.chunk.text)
    elif kind == "citations":
        answer.citations.extend(ev.citations.citations)
    elif kind == "timing":
        answer.timings.append(ev.timing)
    elif kind == "final":
        answer.final = ev.final


def transcript(text: str, *, is_final: bool, sequence: int, stability: float = 0.9) -> Any:
    return pb.ConverseRequest(transcript=pb.TranscriptPartial(text=text, is_final=is_final, stability=stability,
                                                              sequence=sequence))


def session_start(*, session_id: str = "", profile: str = "", locale: str = "",
                  filters: Mapping[str, Sequence[str]] | None = None) -> Any:
    return pb.ConverseRequest(start=pb.SessionStart(session_id=session_id, profile=profile, locale=locale,
                                                    filters=filters_pb(filters)))
