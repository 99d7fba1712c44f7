"""Domain errors and the one mapper from them to gRPC status codes.

    SnapragError                      base; never escapes a servicer as UNKNOWN
    ├── InvalidArgument(field, msg)   INVALID_ARGUMENT: the caller can fix the request
    ├── DeadlineExpired               DEADLINE_EXCEEDED: no time left to even start
    ├── FailedPrecondition            FAILED_PRECONDITION: valid request this server is not set up for
    ├── ResourceExhausted             RESOURCE_EXHAUSTED: overloaded, retry later
    ├── Unavailable                   UNAVAILABLE: not ready (warming up, draining)
    ├── NotFound                      NOT_FOUND: IndexAdmin: an id or snapshot version that does not exist
    ├── Aborted                       ABORTED: IndexAdmin: another job is running, or the job's process died
    ├── Unauthenticated               UNAUTHENTICATED: IndexAdmin: no credentials, or unknown ones
    └── PermissionDenied              PERMISSION_DENIED: IndexAdmin: valid credentials, role not allowed

Anything else that escapes a handler is a bug: it is logged with the request id and reported as
INTERNAL with that id, so the caller can quote it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from server.observability.rpc import observed

log = logging.getLogger(__name__)


class SnapragError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(SnapragError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class DeadlineExpired(SnapragError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(SnapragError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(SnapragError):
    """Overloaded (admission control shed the call). `retry_after_ms` goes out as the trailing metadata
    `retry-after-ms`; the message names it too."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(SnapragError):
    code = grpc.StatusCode.UNAVAILABLE


class NotFound(SnapragError):
    code = grpc.StatusCode.NOT_FOUND


class Aborted(SnapragError):
    code = grpc.StatusCode.ABORTED


class Unauthenticated(SnapragError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SnapragError):
    code = grpc.StatusCode.PERMISSION_DENIED


# The id of the request being handled (set by `grpc_errors`), for logs and error messages.
REQUEST_ID: ContextVar[str] = ContextVar("snaprag_request_id", default="-")


def new_request_id(context: grpc.aio.ServicerContext | None = None) -> str:
    """The caller's `x-request-id` metadata when present (so logs join up), else a fresh one."""
    if context is not None:
        for key, value in context.invocation_metadata() or ():
            if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 64:
                return value
    return os.urandom(8).hex()  # 64 random bits, as uuid4().hex[:16] gave, at a third of its cost


MAX_DETAILS_CHARS = 2048
"""Status messages go back as a trailer; clients drop trailers over ~8-16 KiB and report RESOURCE_EXHAUSTED
instead, so a message quoting a huge input must be cut."""


def status_for(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, SnapragError):
        msg = str(exc)
        if len(msg) > MAX_DETAILS_CHARS:
            msg = msg[:MAX_DETAILS_CHARS - 20] + f"… ({len(msg)} chars)"
        return exc.code, msg
    log.exception("internal error (request %s)", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}); the server log has the details"


def trailers_for(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that goes with the status (the retry-after hint of a shed call)."""
    retry_after = getattr(exc, "retry_after_ms", None)
    return (("retry-after-ms", str(int(retry_after))),) if retry_after is not None else ()


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (unary or streaming) so every error leaves through `status_for`; the RPC is
    counted, timed and traced by `server.observability.rpc.observed` around that."""
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            REQUEST_ID.set(new_request_id(context))
            try:
                async for item in method(self, request, context):
                    yield item
            # GeneratorExit: the client went away and grpc closed this stream; nothing to report to it.
            except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
                raise
            except BaseException as e:
                code, msg = status_for(e, REQUEST_ID.get())
                await context.abort(code, msg, trailing_metadata=trailers_for(e))
        return observed(stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        REQUEST_ID.set(new_request_id(context))
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except BaseException as e:
            code, msg = status_for(e, REQUEST_ID.get())
            await context.abort(code, msg, trailing_metadata=trailers_for(e))
    return observed(unary)
