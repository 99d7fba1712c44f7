"""Per-RPC metrics and span: applied by `server.errors.grpc_errors` around every handler, so each RPC is
counted once, with its serving mode (from the response messages) and its final gRPC status code."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from server.observability import metrics, tracing


def _code(context: Any, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = None
    try:
        code = context.code()
    except Exception:  # a test double without code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio returns the numeric cygrpc code for an abort
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    return "OK" if exc is None else "UNKNOWN"


def _done(rpc: str, mode: str | None, code: str, t0: float) -> None:
    metrics.child(metrics.REQUESTS, rpc, mode or "NONE", code).inc()
    metrics.child(metrics.REQUEST_LATENCY, rpc, code).observe(time.perf_counter() - t0)
    metrics.child(metrics.IN_FLIGHT, rpc).dec()


def observed(method: Callable[..., Any]) -> Callable[..., Any]:
    rpc = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metrics.child(metrics.IN_FLIGHT, rpc).inc()
            t0, mode, err = time.perf_counter(), None, None
            try:
                with tracing.rpc_span(rpc):
                    async for item in method(self, request, context):
                        mode = metrics.mode_of(item) or mode
                        yield item
            except BaseException as e:
                err = e
                raise
            finally:
                _done(rpc, mode, _code(context, err), t0)
        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics.child(metrics.IN_FLIGHT, rpc).inc()
        t0, mode, err = time.perf_counter(), None, None
        try:
            with tracing.rpc_span(rpc):
                reply = await method(self, request, context)
            mode = metrics.mode_of(reply)
            return reply
        except BaseException as e:
            err = e
            raise
        finally:
            _done(rpc, mode, _code(context, err), t0)
    return unary
