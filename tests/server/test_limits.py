"""Limits on message size and stream length: each refusal has the right status, names the limit, and the
server keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from clients.assistant import transcript
from server.config import Config
from server.proto import pb, pb_grpc
from tests.server.conftest import rpc_error


def _with(config: Config, section: str, **values: Any) -> Config:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})


async def test_oversized_message_is_refused_by_the_transport(make_server: Callable[..., Any], config: Config) -> None:
    running, client = await make_server(_with(config, "server", max_message_bytes=4096))
    async with grpc.aio.insecure_channel(running.address) as ch:
        err = await rpc_error(pb_grpc.AssistantStub(ch).Retrieve(pb.RetrieveRequest(query="x" * 10_000)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4096" in (err.details() or "")  # gRPC names the limit
    assert (await client.retrieve_reply("smart plug")).passages  # and the server keeps serving


async def test_too_many_partials_in_one_utterance(make_server: Callable[..., Any], config: Config) -> None:
    running, client = await make_server(_with(config, "voice", max_partials=5))
    stuck_recogniser = [transcript("my thermostat" + " says" * i, is_final=False, sequence=i, stability=0.2)
                        for i in range(1, 50)]

    def call() -> grpc.RpcError:
        # The sync client: grpc.aio's client reports INTERNAL instead of the server's status when one of its
        # writes is in flight as the server ends the stream (grpc/grpc#36066); the server sends the right one.
        with grpc.insecure_channel(running.address) as ch:
            try:
                list(pb_grpc.AssistantStub(ch).Converse(iter(stuck_recogniser), timeout=10))
            except grpc.RpcError as e:
                return e
        raise AssertionError("the stream was not refused")

    err = await asyncio.to_thread(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 5 partial transcripts" in err.details() and "voice.max_partials" in err.details()

    async def fine() -> AsyncIterator[Any]:  # the count is per utterance: five partials, a final, five more
        seq = 0
        for _ in range(2):
            for _ in range(5):
                seq += 1
                yield transcript("set an alarm", is_final=False, sequence=seq, stability=0.3)
            seq += 1
            yield transcript("set an alarm for six", is_final=True, sequence=seq)
            await asyncio.sleep(0.3)

    events = [ev async for ev in client.converse(fine())]
    assert sum(ev.HasField("final") for ev in events) == 2


async def test_idle_converse_stream_is_ended(make_server: Callable[..., Any], config: Config) -> None:
    running, client = await make_server(_with(config, "voice", idle_timeout_s=0.3))
    done = asyncio.Event()

    async def abandoned() -> AsyncIterator[Any]:
        yield transcript("how do i reset my smart plug", is_final=True, sequence=1)
        await done.wait()  # the client never sends again, never closes

    call = client.converse(abandoned(), timeout_s=10)
    events: list[Any] = []
    try:
        err = await rpc_error(_collect_into(call, events))
    finally:
        done.set()
    assert any(ev.HasField("final") for ev in events)  # the answer streamed in full first
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "voice.idle_timeout_s" in err.details()
    await asyncio.sleep(0.05)
    assert running.service.admission.snapshot()["Converse"] == 0  # its voice slot is free again


async def _collect_into(call: Any, out: list[Any]) -> None:
    async for ev in call:
        out.append(ev)


async def test_draining_server_refuses_with_unavailable_while_its_port_stays_open(
        make_server: Callable[..., Any], config: Config) -> None:
    """After SIGTERM's stop() begins, new calls meet our handler's UNAVAILABLE ("draining"), which clients
    retry elsewhere, for server.shutdown_refuse_s, and not gRPC's own stop, which would drop a call arriving
    at that instant as CANCELLED (grpc/grpc#41785). A call already running finishes; stop() then returns well
    inside the grace period."""
    running, client = await make_server(_with(config, "server", shutdown_refuse_s=0.6))
    stream = client.ask_stream("how do i reset my smart plug").__aiter__()
    first = await stream.__anext__()  # the call is admitted and answering

    async def rest() -> list[Any]:
        return [first] + [ev async for ev in stream]

    in_flight = asyncio.create_task(rest())
    t0 = asyncio.get_running_loop().time()
    stopping = asyncio.create_task(running.stop(5.0))
    await asyncio.sleep(0.05)
    refused = []
    while asyncio.get_running_loop().time() - t0 < 0.4:
        refused.append(await rpc_error(client.plan("fl-004", fault_code="E202", carrying_load=True)))
        await asyncio.sleep(0.05)
    assert refused and {e.code() for e in refused} == {grpc.StatusCode.UNAVAILABLE}
    assert all("draining" in (e.details() or "") for e in refused)
    events = await in_flight
    assert any(ev.HasField("final") for ev in events)  # the admitted call finished normally
    await stopping
    assert 0.6 <= asyncio.get_running_loop().time() - t0 < 4.0
