"""A real in-process grpc.aio server on port 0 and a real channel to it (no mocked channels)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from clients.assistant import AssistantClient
from server.app import RunningServer, start_server
from server.config import Config
from server.runtime import Runtime


@pytest.fixture
async def make_server(config: Config, runtime: Runtime) -> AsyncIterator[Callable[..., object]]:
    """Start a server, optionally with runtime parts replaced (a slow stage, a failing one...)."""
    started: list[tuple[RunningServer, AssistantClient]] = []

    async def make(cfg: Config | None = None, **replace: object) -> tuple[RunningServer, AssistantClient]:
        rt = dataclasses.replace(runtime, **replace) if replace else runtime
        if cfg is not None:
            rt = dataclasses.replace(rt, cfg=cfg)
        running = await start_server(cfg or config, runtime=rt)
        client = AssistantClient(running.address, timeout_s=5.0, retries=0)
        started.append((running, client))
        return running, client

    yield make
    for running, client in started:
        await client.close()
        await running.stop(0)


@pytest.fixture
async def client(make_server: Callable[..., object]) -> AssistantClient:
    _, c = await make_server()  # type: ignore[misc]
    return c


async def rpc_error(awaitable: object) -> grpc.aio.AioRpcError:
    """Await a call that must fail, and return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(awaitable, "__aiter__"):
            async for _ in awaitable:  # type: ignore[attr-defined]
                pass
        else:
            await awaitable  # type: ignore[misc]
    return info.value
