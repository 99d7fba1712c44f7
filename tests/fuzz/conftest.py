"""One event loop and two real servers (port 0) for the whole fuzz package.

Hypothesis runs each example synchronously, so the fuzz tests are plain sync tests: the harness owns
an event loop and every example calls `harness.run(coro)`. The servers live as long as the package:

* `assistant`: the default config over the session runtime (the real KB, MiniLM, the extractive
  generator), IndexAdmin off.
* `admin`: IndexAdmin enabled with bearer tokens over a synthetic live index in a tmp dir (the fake
  encoder of tests/index), so fuzzed upserts, deletes, snapshots and swaps write only under tmp; it also
  serves Assistant, over the live index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import types
from collections import Counter
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from server.app import RunningServer, start_server
from server.config import Config
from server.index.live import LiveIndex
from server.index.serving import LiveKnowledge, LiveRetriever
from server.observability import metrics
from server.retrieval.text import Tokenizer
from server.runtime import Runtime
from tests.fuzz.calls import Outcome
from tests.index.conftest import ADMIN_TOKEN, READ_TOKEN, FakeEncoder, bearer, live_config

T = TypeVar("T")

OK = grpc.StatusCode.OK
ALLOWED = {OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE}
"""UNKNOWN, INTERNAL (an unhandled exception in our code), UNIMPLEMENTED, UNAVAILABLE and DATA_LOSS never
answer a fuzzed request; CANCELLED only when the test cancelled the call itself."""

MAX_DETAILS_CHARS = 2048
"""An error message is for a person (and travels as a trailer, 8 KiB soft limit): quote, don't echo."""
ADMIN_MD = bearer(ADMIN_TOKEN)
READ_MD = bearer(READ_TOKEN)
NO_MD: tuple[tuple[str, str], ...] = ()


def fuzz_cases(default: int) -> int:
    """SNAPRAG_FUZZ_CASES=N scales every fuzz budget by N / 10000 (the 10k wire run is the unit)."""
    raw = os.environ.get("SNAPRAG_FUZZ_CASES", "")
    return max(1, round(default * int(raw) / 10_000)) if raw else default


def check_status(out: Outcome, what: str, *, client_streaming: bool = False) -> None:
    """The client-side invariants of one call (the server side: `no_server_side_internal_errors`)."""
    if client_streaming and out.client_write_race:
        return
    allowed = ALLOWED | ({grpc.StatusCode.CANCELLED} if out.cancelled else set())
    assert out.code in allowed, f"{what}: {out.code.name} {out.details!r} {out.debug}"
    if out.code != OK:
        assert out.details and out.details.strip(), f"{what}: {out.code.name} without a details message"
        # An error message over the client's metadata limit never arrives: the client sees RESOURCE_EXHAUSTED
        # "received metadata size exceeds ..." instead (the server echoed too much of the request).
        assert "metadata size exceeds" not in out.details, f"{what}: the server's status was lost: {out.details}"
        assert len(out.details) <= MAX_DETAILS_CHARS, f"{what}: {len(out.details)}-character error message"


def server_codes() -> Counter[str]:
    """RPCs finished by the servers' handlers, by status code (the snaprag_requests counter)."""
    out: Counter[str] = Counter()
    for metric in metrics.REQUESTS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["code"]] += int(sample.value)
    return out


@pytest.fixture(autouse=True)
def no_server_side_internal_errors() -> Iterator[None]:
    """Whatever the client saw, no handler ended a fuzzed call with INTERNAL or UNKNOWN."""
    before = server_codes()
    yield
    grown = server_codes() - before
    assert not grown["INTERNAL"] and not grown["UNKNOWN"], f"server-side status codes during the test: {grown}"


def task_kinds(tasks: set[asyncio.Task[Any]]) -> Counter[str]:
    """Tasks counted by what they run. grpc.aio keeps a few tasks waiting for the next call; they are new
    objects after every call, so a leak is a kind of task that outnumbers its count before the run."""
    return Counter(_kind(t.get_coro()) for t in tasks)


def _kind(coro: Any) -> str:
    """A Python coroutine by its qualified name; grpc's compiled (Cython) server coroutines together, by count
    (they do not always carry a name)."""
    return getattr(coro, "__qualname__", repr(coro)) if type(coro) is types.CoroutineType else "grpc internal"


@dataclasses.dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    assistant: RunningServer
    admin: RunningServer
    live: LiveIndex
    tmp: Path
    channels: dict[str, grpc.aio.Channel] = dataclasses.field(default_factory=dict)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def channel(self, which: str) -> grpc.aio.Channel:
        """The shared channel to `assistant` or `admin` (opened on the harness loop by the fixture)."""
        return self.channels[which]

    def settle(self, baseline: set[asyncio.Task[Any]] | None = None, timeout_s: float = 5.0) -> set[asyncio.Task[Any]]:
        """Let finished calls unwind (up to `timeout_s` for the tasks beyond `baseline` to end), then the tasks
        still alive on the loop."""
        async def pause() -> set[asyncio.Task[Any]]:
            deadline = self.loop.time() + timeout_s
            while True:
                await asyncio.sleep(0.05)
                me = asyncio.current_task()
                alive = {t for t in asyncio.all_tasks(self.loop) if not t.done() and t is not me}
                if baseline is None or not task_kinds(alive) - task_kinds(baseline) or self.loop.time() > deadline:
                    return alive
        alive = self.run(pause())
        gc.collect()
        return alive


@pytest.fixture(scope="package")
def harness(config: Config, runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    enc = FakeEncoder()
    cfg = live_config(tmp, 120, observability__metrics_port=0)
    live = LiveIndex.open(cfg, Tokenizer(), enc, enc)
    try:
        assistant = loop.run_until_complete(start_server(config, runtime=runtime))
        rt = dataclasses.replace(runtime, cfg=live.cfg, retriever=LiveRetriever(live), kb=LiveKnowledge(live),
                                 index=live)
        admin = loop.run_until_complete(start_server(live.cfg, runtime=rt))
        h = Harness(loop, assistant, admin, live, tmp)

        async def open_channels() -> None:
            for which, port in (("assistant", assistant.port), ("admin", admin.admin_port)):
                h.channels[which] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        loop.run_until_complete(open_channels())
        yield h
        for ch in h.channels.values():
            loop.run_until_complete(ch.close())
        loop.run_until_complete(admin.stop(0))
        loop.run_until_complete(assistant.stop(0))
    finally:
        live.close()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
