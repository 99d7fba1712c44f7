"""Fault injection for tests and bench ([faults], off by default): wrappers installed at runtime build.

    stage      wraps                         kinds
    retrieve   rt.retriever (CPU pool)       slow | hang | raise | garbage (NaN scores, unknown ids)
    rerank     rt.reranker  (CPU pool)       slow | hang | raise | garbage (NaN / wrong-length scores)
    generate   rt.generator (voice policy)   slow | hang | raise | garbage (empty pieces)
    plan       PlanPipeline's plan stage     slow | hang | raise | garbage (a plan that does not validate)
    backend    every model backend (vLLM)    slow | hang | raise | garbage (not JSON / noise) | refused | stall

The pipelines carry no fault checks: a fault reaches them exactly as a real failure would, and the
documented degradation answers inside the deadline (rerank skipped -> DEGRADED, fused order; model
backend -> extractive tier; retriever or generator -> fallback planner; plan -> rule plan). Garbage is
caught by the validation the pipelines always run (server/retrieval/checks.py, check_piece,
check_chosen, the rerank score check).

`FaultSwitch` is the runtime switch: `set(stage, kind)` / `clear()` take effect on the next call, and
`clear()` releases threads blocked in a sync `hang` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from server.config import FaultsConfig

STAGES = ("retrieve", "rerank", "generate", "plan", "backend")
KINDS = ("none", "slow", "hang", "raise", "garbage", "refused", "stall")
BACKEND_ONLY = ("refused", "stall")


class InjectedFault(RuntimeError):
    """What a `raise` fault raises (a model backend raises a BackendError subclass instead)."""


class FaultSwitch:
    def __init__(self, *, delay_ms: float = 200.0, hang_max_s: float = 30.0, **kinds: str) -> None:
        self.delay_s = delay_ms / 1000
        self.hang_max_s = hang_max_s
        self.kinds: dict[str, str] = dict.fromkeys(STAGES, "none")
        self._released = threading.Event()
        self._released.set()
        for stage, kind in kinds.items():
            self.set(stage, kind)

    @classmethod
    def from_config(cls, cfg: FaultsConfig) -> FaultSwitch:
        return cls(delay_ms=cfg.delay_ms, hang_max_s=cfg.hang_max_s,
                   **{s: getattr(cfg, s) for s in STAGES})

    # ------------------------------------------------------------------ switching
    def set(self, stage: str, kind: str, *, delay_ms: float | None = None) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown fault stage {stage!r}; one of {', '.join(STAGES)}")
        if kind not in KINDS or (kind in BACKEND_ONLY and stage != "backend"):
            raise ValueError(f"fault kind {kind!r} does not apply to {stage}")
        if delay_ms is not None:
            self.delay_s = delay_ms / 1000
        if kind == "hang":
            self._released.clear()
        self.kinds[stage] = kind

    def clear(self, stage: str | None = None) -> None:
        for s in (STAGES if stage is None else (stage,)):
            self.kinds[s] = "none"
        if "hang" not in self.kinds.values():
            self._released.set()

    def kind(self, stage: str) -> str:
        return self.kinds[stage]

    @property
    def active(self) -> bool:
        return any(k != "none" for k in self.kinds.values())

    # ------------------------------------------------------------------ fault behaviour
    def before_sync(self, stage: str) -> str:
        """In a worker thread: sleep / block / raise as set; returns the kind (garbage is the caller's)."""
        kind = self.kinds[stage]
        if kind == "slow":
            time.sleep(self.delay_s)
        elif kind == "hang":
            self._released.wait(self.hang_max_s)  # until cleared: a hung dependency holds its thread
        elif kind == "raise":
            raise InjectedFault(f"injected fault: {stage} raised")
        return kind

    async def before_async(self, stage: str) -> str:
        kind = self.kinds[stage]
        if kind == "slow":
            await asyncio.sleep(self.delay_s)
        elif kind == "hang":
            await asyncio.sleep(self.hang_max_s)  # the stage deadline cancels it
        elif kind == "raise":
            raise InjectedFault(f"injected fault: {stage} raised")
        return kind

    # ------------------------------------------------------------------ wrappers
    def wrap_retriever(self, retriever: Any) -> Any:
        return retriever if retriever is None else FaultyRetriever(retriever, self)

    def wrap_reranker(self, reranker: Any) -> Any:
        return reranker if reranker is None else FaultyReranker(reranker, self)

    def wrap_generator(self, generator: Any) -> Any:
        return FaultyGenerator(generator, self)

    def wrap_backend(self, backend: Any) -> Any:
        return FaultyBackend(backend, self)

    def wrap_plan(self, choose: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Coroutine[Any, Any, Any]]:
        async def faulty_choose(hits: list[Any], situation: Any) -> Any:
            kind = await self.before_async("plan")
            if kind == "garbage":
                from server.pipeline.plan import Chosen, check_chosen
                from server.robot_plan import PlanStep

                if not hits:
                    raise InjectedFault("injected fault: plan garbage with no hit to cite")
                garbage = Chosen(hits[0], (PlanStep("teleport_to_moon", {}),))
                return check_chosen(garbage, self._vocabulary(choose))
            return await choose(hits, situation)

        return faulty_choose

    @staticmethod
    def _vocabulary(choose: Any) -> Any:
        return choose.__self__.rt.vocabulary


def runtime_parts(rt: Any, switch: FaultSwitch) -> dict[str, Any]:
    """The runtime fields to replace so `rt` runs with `switch` (tests: make_server(**runtime_parts(...)))."""
    return {"retriever": switch.wrap_retriever(rt.retriever), "reranker": switch.wrap_reranker(rt.reranker),
            "generator": switch.wrap_generator(rt.generator), "faults": switch}


class _Delegate:
    def __init__(self, inner: Any, switch: FaultSwitch) -> None:
        self.inner = inner
        self.switch = switch

    def __getattr__(self, name: str) -> Any:  # everything not faulted behaves like the real part
        return getattr(self.inner, name)


class FaultyRetriever(_Delegate):
    def search(self, query: str, k: int, filters: Any = None, *mode: Any) -> Any:
        kind = self.switch.before_sync("retrieve")
        hits = self.inner.search(query, k, filters, *mode)
        if kind == "garbage":
            from server.retrieval.sparse import Hit

            return [Hit(dataclasses.replace(h.passage, id=f"no-such-passage-{i}"), math.nan)
                    for i, h in enumerate(hits)] or [Hit(None, math.nan)]  # type: ignore[arg-type]
        return hits


class FaultyReranker(_Delegate):
    def score(self, query: str, texts: list[str], **kw: Any) -> Any:
        kind = self.switch.before_sync("rerank")
        if kind == "garbage":
            import numpy as np

            return np.full(len(texts) + 1, np.nan, dtype=np.float32)
        return self.inner.score(query, texts, **kw)


class FaultyGenerator(_Delegate):
    @property
    def name(self) -> str:
        return str(self.inner.name)

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        kind = await self.switch.before_async("generate")
        if kind == "garbage":
            from server.generate.base import AnswerPiece

            yield AnswerPiece("", ())
            return
        async with contextlib.aclosing(self.inner.stream(request)) as inner:
            async for piece in inner:
                yield piece


class FaultyBackend(_Delegate):
    @property
    def name(self) -> str:
        return str(self.inner.name)

    async def stream(self, prompt: Any, limits: Any, *, model: str, adapter: str | None = None) -> AsyncIterator[Any]:
        from server.generate.backend import BackendServerError, BackendUnavailable, TextDelta

        kind = self.switch.kinds["backend"]
        if kind == "refused":
            raise BackendUnavailable("injected fault: connection refused (vLLM down)")
        if kind == "raise":
            raise BackendServerError("injected fault: HTTP 500")
        if kind in ("slow", "hang"):
            await self.switch.before_async("backend")
        if kind == "garbage":
            yield TextDelta('{"steps": [{"action": ')
            yield TextDelta("\x00\x01 }}}] not json ]]")
            return
        if kind == "stall":
            yield TextDelta("The")
            await asyncio.sleep(self.switch.hang_max_s)  # guarded()'s stall limit ends it
            return
        async with contextlib.aclosing(self.inner.stream(prompt, limits, model=model, adapter=adapter)) as inner:
            async for delta in inner:
                yield delta
