"""How long would a call admitted now wait before its work starts? The load signal admission control reads.

Counting calls in flight does not say that: on a 2-core box 20 Plans in flight can already mean a queue longer
than the robot budget, while 100 open Converse streams waiting on their users cost nothing. Two measured
waits do say it:

    CpuPool       the stage worker pool (BM25, ONNX, grounding), a priority queue by class (robot, voice,
                  Retrieve): the jobs that would run first and an EWMA of what one job takes give the
                  wait of a job of a given class submitted now.
    LoopLagProbe  the event loop: a 10 ms timer measures how late the loop runs its callbacks; every
                  request's handler, (de)serialisation and hand-offs wait that long.

`LoadGauge.expected_delay_s()` is their sum, in O(1) with no locks taken on the event loop's hot path
beyond one short one, so admission can check it on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextvars import ContextVar
from typing import Any

EWMA_ALPHA = 0.2
"""Weight of the newest sample: reacts within ~5 samples, smooths single outliers."""


RATE_WINDOW_S = 1.0
"""Time constant of the per-class job arrival rates (how fast the estimate follows a burst or a lull)."""
MIN_SHARE = 0.05
"""Floor of the capacity share a lower class is assumed to get (its wait estimate stays finite)."""
WORK_CLASS: ContextVar[int] = ContextVar("snaprag_work_class", default=2)
"""Priority of the CPU jobs the current call submits: 0 robot Plan, 1 voice, 2 Retrieve (and anything
unclassified). Set by the servicer once a call is admitted; asyncio tasks inherit it."""
CLASS_PRIORITY = {"robot": 0, "voice": 1, "retrieve": 2}
_STOP = float("inf")


class CpuPool(Executor):
    """The stage worker pool: a priority queue in front of `max_workers` threads, which knows its backlog.

    Jobs run in class order (robot, voice, Retrieve; FIFO within a class), so a flood of voice or Retrieve
    work never sits in front of a robot's retrieval; and the wait of a job submitted now is estimated per
    class from the jobs that would run before it and an EWMA of what one job takes."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "cpu", job_s: float = 0.005,
                 nice: int = 0) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.workers = max_workers
        self.waiting_by_class = [0, 0, 0]
        self.running = 0
        self.job_s = job_s
        """EWMA of one job's run time (seeded; the warm-up requests calibrate it)."""
        self.rate_by_class = [0.0, 0.0, 0.0]
        """Jobs submitted per second by class, exponentially decayed over RATE_WINDOW_S."""
        self._rate_at = [time.monotonic()] * 3
        self._lock = threading.Lock()
        self._queue: queue.PriorityQueue[tuple[float, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._shutdown = False
        self._nice = nice
        self._threads = [threading.Thread(target=self._worker, name=f"{thread_name_prefix}_{i}", daemon=True)
                         for i in range(max_workers)]
        for t in self._threads:
            t.start()

    @property
    def waiting(self) -> int:
        return sum(self.waiting_by_class)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        cls = min(max(WORK_CLASS.get(), 0), 2)
        fut: Future[Any] = Future()
        now = time.monotonic()
        with self._lock:
            self.waiting_by_class[cls] += 1
            decay = math.exp(-(now - self._rate_at[cls]) / RATE_WINDOW_S)
            self.rate_by_class[cls] = self.rate_by_class[cls] * decay + 1.0 / RATE_WINDOW_S
            self._rate_at[cls] = now
        fut.add_done_callback(lambda f: self._cancelled(f, cls))
        self._queue.put((cls, next(self._seq), (fut, fn, args, kwargs)))
        return fut

    def _cancelled(self, fut: Future[Any], cls: int) -> None:
        # Cancelled while queued (its stage ran out of budget): out of the backlog now, skipped when popped.
        if fut.cancelled():
            with self._lock:
                self.waiting_by_class[cls] -= 1

    def _worker(self) -> None:
        _renice(self._nice)
        while True:
            cls, _, item = self._queue.get()
            if cls == _STOP:
                return
            fut, fn, args, kwargs = item
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled in the queue; _cancelled took it off the backlog
            with self._lock:
                self.waiting_by_class[int(cls)] -= 1
                self.running += 1
            t0 = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # handed to the awaiting caller, as ThreadPoolExecutor does
                fut.set_exception(e)
            else:
                fut.set_result(result)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.running -= 1
                    self.job_s += EWMA_ALPHA * (dt - self.job_s)
            del fut, fn, args, kwargs, item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            while True:
                try:
                    cls, seq, item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if cls == _STOP:
                    self._queue.put((cls, seq, item))
                    break
                item[0].cancel()
        for _ in self._threads:
            self._queue.put((_STOP, next(self._seq), None))
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()

    def expected_wait_s(self, cls: int = 2) -> float:
        """Wait of a job of class `cls` submitted now before a worker takes it: the jobs that run before
        it (its class and the ones above, beyond the free workers), each taking job_s, served at the
        capacity the classes above leave over: their new jobs keep jumping the queue while it waits."""
        ahead = sum(self.waiting_by_class[:cls + 1]) + self.running + 1 - self.workers
        if ahead <= 0:
            return 0.0
        now = time.monotonic()
        above = sum(self.rate_by_class[c] * math.exp(-(now - self._rate_at[c]) / RATE_WINDOW_S)
                    for c in range(cls))
        left = max(1.0 - above * self.job_s / self.workers, MIN_SHARE)
        return ahead * self.job_s / (self.workers * left)


def _renice(nice: int) -> None:
    """Lower this worker thread's CPU priority (Linux: nice is per thread), so the event loop thread, which
    answers and sheds, gets a core first when both are runnable."""
    if nice > 0:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


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
    """The expected start delay of a call admitted now: event-loop lag plus the CPU pool's queue wait for
    its class (robot work waits only behind robot work)."""

    def __init__(self, pool: CpuPool | None, probe: LoopLagProbe | None) -> None:
        self.pool = pool
        self.probe = probe

    def expected_delay_s(self, cls: int = 2) -> float:
        d = self.probe.lag_s if self.probe is not None else 0.0
        if self.pool is not None:
            d += self.pool.expected_wait_s(cls)
        return d

    def describe(self) -> str:
        parts = []
        if self.pool is not None:
            parts.append(f"{self.pool.waiting} CPU jobs queued at ~{self.pool.job_s * 1000:.1f} ms each")
        if self.probe is not None:
            parts.append(f"event loop {self.probe.lag_s * 1000:.1f} ms behind")
        return ", ".join(parts)
