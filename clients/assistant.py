"""Async client for the Assistant service: one reused channel, a deadline per call, typed results.

Only unary calls that have not produced a result are retried (UNAVAILABLE); a streamed answer is
never retried once it has begun, because the user may already have heard part of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from server.proto import pb, pb_grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


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


def filters_pb(filters: Mapping[str, Sequence[str]] | None) -> dict[str, Any]:
    return {k: pb.FilterValues(values=list(v)) for k, v in (filters or {}).items()}


class AssistantClient:
    def __init__(self, target: str, *, timeout_s: float = 5.0, retries: int = 2,
                 channel: grpc.aio.Channel | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.channel = channel or grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.AssistantStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AssistantClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=timeout_s or self.timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def plan(self, robot_id: str, *, task: str = "", fault_code: str = "", state: str = "", location: str = "",
                   carrying_load: bool = False, battery_pct: float | None = None, profile: str = "",
                   timeout_s: float | None = None) -> Any:
        req = pb.PlanRequest(robot_id=robot_id, task=task, fault_code=fault_code, state=state, location=location,
                             carrying_load=carrying_load, profile=profile)
        if battery_pct is not None:
            req.battery_pct = battery_pct
        return await self._unary(self.stub.Plan, req, timeout_s)

    async def retrieve(self, query: str, *, k: int = 0, filters: Mapping[str, Sequence[str]] | None = None,
                       fusion: int = 0, profile: str = "", timeout_s: float | None = None) -> Any:
        req = pb.RetrieveRequest(query=query, k=k, filters=filters_pb(filters), fusion=fusion, profile=profile)
        return await self._unary(self.stub.Retrieve, req, timeout_s)

    def ask_stream(self, query: str, *, profile: str = "", filters: Mapping[str, Sequence[str]] | None = None,
                   locale: str = "", session_id: str = "", timeout_s: float | None = None) -> Any:
        """The raw event stream (a grpc call object: iterate it, or `.cancel()` it)."""
        req = pb.AskRequest(query=query, profile=profile, filters=filters_pb(filters), locale=locale,
                            session_id=session_id)
        return self.stub.Ask(req, timeout=timeout_s or self.timeout_s)

    async def ask(self, query: str, **kw: Any) -> Answer:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answer = Answer()
        async for ev in self.ask_stream(query, **kw):
            collect(answer, ev, t0, loop.time())
        return answer

    def converse(self, requests: AsyncIterator[Any] | Iterable[Any], *, timeout_s: float | None = None) -> Any:
        return self.stub.Converse(requests, timeout=timeout_s or self.timeout_s)


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
