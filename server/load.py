"""How long would a call admitted now wait before its work starts? The load signal admission control reads.

Counting calls in flight does not say that: on a 2-core box 20 Plans in flight can already mean a queue longer
than the robot budget, while 100 open Converse streams waiting on their users cost nothing. Two measured
waits do say it:

    CpuPool       the stage worker pool (BM25, ONNX, grounding): jobs queued and running, and an EWMA of
                  what one job takes, give the wait of a job submitted now.
    LoopLagProbe  the event loop: a 10 ms timer measures how late the loop runs its callbacks; every
                  request's handler, (de)serialisation and hand-offs wait that long.

`LoadGauge.expected_delay_s()` is their sum, in O(1) with no locks taken on the event loop's hot path
beyond one short one, so admission can check it on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

EWMA_ALPHA = 0.2
"""Weight of the newest sample: reacts within ~5 samples, smooths single outliers."""


class CpuPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor that knows its backlog: jobs waiting, jobs running, and the EWMA run time."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "", job_s: float = 0.005) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.workers = max_workers
        self.waiting = 0
        self.running = 0
        self.job_s = job_s
        """EWMA of one job's run time (seeded; the warm-up requests calibrate it)."""
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        started = [False]
        with self._lock:
            self.waiting += 1
        try:
            fut = super().submit(self._timed, started, fn, args, kwargs)
        except BaseException:
            with self._lock:
                self.waiting -= 1
            raise
        fut.add_done_callback(lambda f: self._cancelled(f, started))
        return fut

    def _cancelled(self, fut: Future[Any], started: list[bool]) -> None:
        # A job cancelled before it started (its stage ran out of budget) never reaches _timed.
        if fut.cancelled() and not started[0]:
            with self._lock:
                self.waiting -= 1

    def _timed(self, started: list[bool], fn: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
        with self._lock:
            started[0] = True
            self.waiting -= 1
            self.running += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self.running -= 1
                self.job_s += EWMA_ALPHA * (dt - self.job_s)

    def expected_wait_s(self) -> float:
        """Wait of a job submitted now before a worker takes it: the jobs ahead of it beyond the free
        workers, each taking job_s, spread over the workers."""
        ahead = self.waiting + self.running + 1 - self.workers
        return ahead * self.job_s / self.workers if ahead > 0 else 0.0


class LoopLagProbe:
    """Measures how late the event loop runs a timer, every `interval_s` (EWMA)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="snaprag-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval_s)
            late = max(0.0, loop.time() - t0 - self.interval_s)
            self.lag_s += EWMA_ALPHA * (late - self.lag_s)


class LoadGauge:
    """The expected start delay of a call admitted now: event-loop lag plus the CPU pool's queue wait."""

    def __init__(self, pool: CpuPool | None, probe: LoopLagProbe | None) -> None:
        self.pool = pool
        self.probe = probe

    def expected_delay_s(self) -> float:
        d = self.probe.lag_s if self.probe is not None else 0.0
        if self.pool is not None:
            d += self.pool.expected_wait_s()
        return d

    def describe(self) -> str:
        parts = []
        if self.pool is not None:
            parts.append(f"{self.pool.waiting} CPU jobs queued at ~{self.pool.job_s * 1000:.1f} ms each")
        if self.probe is not None:
            parts.append(f"event loop {self.probe.lag_s * 1000:.1f} ms behind")
        return ", ".join(parts)
