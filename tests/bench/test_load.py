"""bench.load: Poisson arrivals (counts, gaps, dispersion), latency from the intended send time (no
coordinated omission), and the count / time bounds of every loop. Fake operations, no server."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from bench.load import closed_loop, open_loop, poisson_offsets


def test_poisson_arrival_counts_and_gaps() -> None:
    rate, duration = 200.0, 50.0
    t = poisson_offsets(rate, duration, max_count=100_000, rng=np.random.default_rng(0))
    expected = rate * duration
    assert abs(len(t) - expected) < 5 * math.sqrt(expected)  # Poisson count: sd = sqrt(mean)
    assert np.all(np.diff(t) > 0) and t[0] > 0 and t[-1] < duration
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps: CV = 1
    # Counts per 1 s window are Poisson: variance equals the mean (a fixed-rate schedule would give ~0).
    per_second = np.bincount(t.astype(int), minlength=int(duration))
    assert per_second.var() / per_second.mean() == pytest.approx(1.0, abs=0.3)


def test_poisson_is_seeded_and_bounded_by_count() -> None:
    a = poisson_offsets(50, 10, max_count=1000, rng=np.random.default_rng(3))
    b = poisson_offsets(50, 10, max_count=1000, rng=np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert len(poisson_offsets(1e6, 10, max_count=123, rng=np.random.default_rng(0))) == 123
    with pytest.raises(ValueError, match="must be positive"):
        poisson_offsets(0, 10, max_count=10, rng=np.random.default_rng(0))


class OneAtATime:
    """A server that serves one request at a time, `service_s` each, and can stall all work."""

    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.lock = asyncio.Lock()
        self.stalled_until = 0.0

    async def __call__(self, i: int) -> float:
        async with self.lock:
            wait = self.stalled_until - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await asyncio.sleep(self.service_s)
        return time.perf_counter()


async def test_open_loop_counts_queueing_from_the_intended_time() -> None:
    # 20 ms per request, one at a time (50/s capacity), offered 100/s for 0.4 s: a queue builds up.
    server = OneAtATime(0.02)
    offsets = np.arange(40) / 100.0
    shots = await open_loop(server, offsets, time_limit_s=1.0)
    assert len(shots) == 40 and all(not s.error for s in shots)
    lat = np.array([s.latency_ms for s in shots])
    # Request i is due at 10 ms * i but served at ~20 ms * (i + 1): latency grows with i. A generator
    # that timed from when the call really began would see ~20 ms throughout.
    assert lat[-1] > 300
    assert np.corrcoef(np.arange(40), lat)[0, 1] > 0.95
    assert shots[-1].sent < shots[19].done  # it kept sending on schedule, not after each reply


async def test_a_stall_shows_in_every_request_due_during_it_open_loop_but_once_closed_loop() -> None:
    async def run(kind: str) -> list[float]:
        server = OneAtATime(0.001)
        server.stalled_until = time.perf_counter() + 0.25  # the server freezes for the first 250 ms
        if kind == "open":
            shots = await open_loop(server, np.arange(60) * 0.005, time_limit_s=2.0, lead_s=0.0)
        else:
            shots = await closed_loop(server, concurrency=1, max_count=60, time_limit_s=2.0)
        return [s.latency_ms for s in shots]

    open_lat, closed_lat = await run("open"), await run("closed")
    # Open loop: the ~50 requests due during the stall all waited for it (most of them > 100 ms).
    assert sum(x > 100 for x in open_lat) >= 25
    # Closed loop: one request absorbed the whole stall, the rest look fast: coordinated omission.
    assert 1 <= sum(x > 100 for x in closed_lat) <= 3  # (a busy machine may add a hiccup of its own)


async def test_loops_are_bounded_in_count_and_time() -> None:
    async def instant(i: int) -> int:
        return i

    shots = await open_loop(instant, np.arange(1000) * 0.001, time_limit_s=0.1)
    assert len(shots) == 100  # offsets at or past the time limit are never sent
    shots = await closed_loop(instant, concurrency=4, max_count=50, time_limit_s=5.0)
    assert sorted(s.index for s in shots) == list(range(50))

    async def slow(i: int) -> int:
        await asyncio.sleep(0.05)
        return i

    shots = await closed_loop(slow, concurrency=2, max_count=10_000, time_limit_s=0.2)
    assert 2 <= len(shots) <= 12  # ~2 workers x 0.2 s / 50 ms, not 10 000


async def test_a_call_that_never_returns_is_cancelled_after_the_drain() -> None:
    async def hang(i: int) -> None:
        await asyncio.sleep(3600)

    shots = await open_loop(hang, [0.0, 0.01], time_limit_s=1.0, drain_s=0.1)
    assert [s.error for s in shots] == ["cancelled", "cancelled"]
    assert all(s.done >= s.intended for s in shots)


async def test_in_flight_cap_waits_but_still_counts_from_the_intended_time() -> None:
    async def op(i: int) -> int:
        await asyncio.sleep(0.05)
        return i

    shots = await open_loop(op, np.zeros(6), time_limit_s=1.0, max_in_flight=2)
    lat = sorted(s.latency_ms for s in shots)
    # 6 due at once, 2 at a time, 50 ms each: the last pair finishes ~150 ms after they were due.
    assert lat[-1] > 120 and lat[0] < lat[-1]
