"""Every RPC of both services, taken from the descriptors, and one way to call any of them over a real
channel with typed messages or raw bytes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from server.proto import admin_pb, pb

CALL_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Method:
    path: str
    name: str
    service: str
    request: type[Message]
    client_streaming: bool
    server_streaming: bool


def _methods(file_desc: Any, service: str) -> list[Method]:
    svc = file_desc.services_by_name[service]
    return [Method(f"/{svc.full_name}/{m.name}", m.name, service, GetMessageClass(m.input_type), m.client_streaming,
                   m.server_streaming) for m in svc.methods]


ASSISTANT = _methods(pb.DESCRIPTOR, "Assistant")
ADMIN = _methods(admin_pb.DESCRIPTOR, "IndexAdmin")
METHODS = {m.name: m for m in ASSISTANT + ADMIN}


@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    details: str | None
    responses: int
    cancelled: bool = False
    debug: str = ""

    @property
    def client_write_race(self) -> bool:
        """grpc.aio's *client* bug grpc/grpc#36066: when the server ends a client-streaming call (here: refuses
        it) while the client is still writing, the failed write overwrites the server's status with INTERNAL
        "Internal error from Core" on the client side only. The server's own status for such calls is checked
        through its RPC counters instead (conftest.server_codes)."""
        return (self.code == grpc.StatusCode.INTERNAL and self.details == "Internal error from Core"
                and 'Failed "execute_batch"' in self.debug and "SendMessageOperation" in self.debug)


async def _messages(requests: Sequence[Any], yield_between: bool, box: list[Any]) -> Any:
    for r in requests:
        if yield_between:
            await asyncio.sleep(0)
        if box and box[0].done():
            return  # the server already ended the call (see Outcome.client_write_race)
        yield r


async def invoke(channel: grpc.aio.Channel, method: Method, requests: Sequence[Any], *,
                 metadata: Sequence[tuple[str, str]] = (), cancel_after: int | None = None, raw: bool = False,
                 deadline_s: float = CALL_TIMEOUT_S, yield_between: bool = False) -> Outcome:
    """Call `method` with `requests` (one for a unary request; raw=True: bytes sent as they are) and read the
    whole response. cancel_after=N (streaming responses): the test cancels the call after N responses."""
    ser = None if raw else (lambda m: m.SerializeToString())
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    factory = kinds[(method.client_streaming, method.server_streaming)]
    multi = factory(method.path, request_serializer=ser, response_deserializer=None)
    box: list[Any] = []
    arg = _messages(requests, yield_between, box) if method.client_streaming else requests[0]
    call = multi(arg, metadata=tuple(metadata), timeout=deadline_s)
    box.append(call)
    count, cancelled, debug = 0, False, ""
    try:
        if method.server_streaming:
            async for _ in call:
                count += 1
                if cancel_after is not None and count >= cancel_after:
                    cancelled = call.cancel()
                    break
        else:
            await call
            count = 1
        code, details = await call.code(), await call.details()
    except grpc.aio.AioRpcError as e:
        code, details = e.code(), e.details()
        debug = e.debug_error_string()
    except asyncio.CancelledError:
        if not cancelled:
            raise
        code, details = grpc.StatusCode.CANCELLED, "cancelled by the test"
    return Outcome(code, details, count, cancelled, debug)


async def invoke_good(channel: grpc.aio.Channel, method: Method, requests: Sequence[Any], **kw: Any) -> Outcome:
    """A well-formed call that must succeed; admission control may shed it on a busy box (RESOURCE_EXHAUSTED,
    a deliberate answer), so it is retried as a client would, for up to ~5 s."""
    for _ in range(50):
        out = await invoke(channel, method, requests, **kw)
        if out.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return out
        await asyncio.sleep(0.1)
    return out
