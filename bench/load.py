"""Load generators: open loop (Poisson arrivals at a target rate) and closed loop (fixed concurrency).

Open loop is the default because it does not suffer from coordinated omission: request i is due at its
*intended* time t0 + offset_i whatever happened to the requests before it, and its latency is measured
from that intended time. When the server (or this client) stalls, the requests that should have gone out
during the stall all carry the stall in their latency, as real users would. A closed-loop generator sends
the next request only when one returns, so a stall delays the sending too and is counted once; use it
for throughput at a given concurrency, not for tail latency.

Every loop is bounded twice: by a count and by a time limit, whichever comes first; then in-flight calls
get `drain_s` to finish (each call also carries its own gRPC deadline).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# Generators keep at most this many calls in flight. Past it the schedule waits for a free slot, but
# latency is still measured from the intended time, so the wait is counted, not hidden.
DEFAULT_MAX_IN_FLIGHT = 512


def poisson_offsets(rate_per_s: float, duration_s: float, *, max_count: int,
                    rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Intended send times (seconds from the start) of a Poisson process of `rate_per_s`, inside
    [0, duration_s) and at most `max_count` of them. Gaps are exponential with mean 1 / rate."""
    if rate_per_s <= 0 or duration_s <= 0 or max_count < 1:
        raise ValueError(f"rate ({rate_per_s}), duration ({duration_s}) and max_count ({max_count}) must be positive")
    expected = rate_per_s * duration_s
    chunk = int(min(max_count, expected + 6 * np.sqrt(expected) + 16))  # enough in one draw, nearly always
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, size=chunk))
    while times[-1] < duration_s and len(times) < max_count:
        more = np.cumsum(rng.exponential(1.0 / rate_per_s, size=chunk)) + times[-1]
        times = np.concatenate([times, more])
    # The first arrival is not at 0 (a Poisson process has no event at its start); keep it that way.
    return times[times < duration_s][:max_count]


@dataclass(slots=True)
class Shot:
    """One request of a load run."""

    index: int
    intended: float
    """perf_counter time it was due (open loop) or sent (closed loop)."""
    sent: float
    """perf_counter time it actually went out; sent - intended is this client's own lag."""
    result: Any = None
    """What the operation returned (its own timestamps inside), or None when it raised."""
    done: float = 0.0
    error: str = ""

    @property
    def latency_ms(self) -> float:
        """From the intended time to completion: the figure that does not omit queueing."""
        return (self.done - self.intended) * 1000.0

    @property
    def send_lag_ms(self) -> float:
        return (self.sent - self.intended) * 1000.0


Operation = Callable[[int], Awaitable[Any]]
Progress = Callable[[Shot], None]


async def _fire(op: Operation, shot: Shot, on_done: Progress | None) -> None:
    try:
        shot.result = await op(shot.index)
    except asyncio.CancelledError:
        shot.error = "cancelled"
        raise
    except Exception as e:  # an operation's own failure is a result, not a crash of the run
        shot.error = f"{type(e).__name__}: {e}"
    finally:
        shot.done = time.perf_counter()
        if on_done is not None and shot.error != "cancelled":
            on_done(shot)


async def open_loop(op: Operation, offsets: npt.NDArray[np.float64] | list[float], *, time_limit_s: float,
                    drain_s: float = 5.0, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                    on_done: Progress | None = None, lead_s: float = 0.01) -> list[Shot]:
    """Call `op(i)` at start + offsets[i] for every offset inside `time_limit_s`, without waiting for
    earlier calls. Returns every shot sent, in order; latencies count from the intended times."""
    start = time.perf_counter() + lead_s
    shots: list[Shot] = []
    tasks: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(max_in_flight)

    def release(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        slots.release()

    for i, off in enumerate(offsets):
        if off >= time_limit_s:
            break
        intended = start + float(off)
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        shot = Shot(i, intended, time.perf_counter())
        shots.append(shot)
        task = asyncio.create_task(_fire(op, shot, on_done))
        tasks.add(task)
        task.add_done_callback(release)
    await _drain(tasks, drain_s)
    return shots


async def closed_loop(op: Operation, *, concurrency: int, max_count: int, time_limit_s: float,
                      drain_s: float = 5.0, on_done: Progress | None = None) -> list[Shot]:
    """`concurrency` workers, each sending its next call as soon as its last one returned, until
    `max_count` calls were sent or `time_limit_s` passed."""
    if concurrency < 1 or max_count < 1:
        raise ValueError("concurrency and max_count must be >= 1")
    start = time.perf_counter()
    shots: list[Shot] = []
    counter = iter(range(max_count))

    async def worker() -> None:
        for i in counter:  # shared iterator: the workers together send max_count calls
            now = time.perf_counter()
            if now - start >= time_limit_s:
                return
            shot = Shot(i, now, now)
            shots.append(shot)
            await _fire(op, shot, on_done)

    workers = {asyncio.create_task(worker()) for _ in range(concurrency)}
    _, pending = await asyncio.wait(workers, timeout=time_limit_s + drain_s)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    shots.sort(key=lambda s: s.index)
    return [s for s in shots if s.done]


async def _drain(tasks: set[asyncio.Task[None]], drain_s: float) -> None:
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=drain_s)
    for t in pending:  # only a call that ignores its own deadline gets here
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
