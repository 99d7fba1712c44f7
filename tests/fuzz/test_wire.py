"""Random bytes on the wire: every method path of both services gets noise and broken encodings of its
request type (a raw channel, no client-side serializer), 10,000 cases in the default run.

The 10k run is also the leak test: no asyncio task outlives it, the live Python object count stays flat
and so does RSS (details in `test_ten_thousand_wire_cases_...`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import os
import random
import time
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.proto import pb
from tests.fuzz.calls import ADMIN, ASSISTANT, METHODS, Method, Outcome, invoke, invoke_good
from tests.fuzz.conftest import ADMIN_MD, NO_MD, READ_MD, Harness, check_status, fuzz_cases, task_kinds
from tests.fuzz.strategies import mutate, random_bytes, random_message, wire_bytes

WIRE_CASES = fuzz_cases(10_000)
BATCH = 32  # calls in flight at once
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # musl and other non-glibc libcs
    _LIBC = None
WRONG_MD = (("authorization", "Bearer not-the-token-0123456789"),)


def _payload(m: Method, rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.35:
        return random_bytes(rng)
    data = random_message(m.request, rng).SerializeToString()
    return data if r > 0.9 else mutate(data, rng, m.request)


def _starts_a_job(h: Harness, m: Method, payload: bytes) -> bool:
    """Would this admin-token Snapshot/Swap run a real build or gate process (seconds each)? Those are fuzzed
    by test_messages with a few cases; here they go with the read-only token instead."""
    if m.name not in ("Snapshot", "Swap"):
        return False
    try:
        req = m.request.FromString(payload)
    except Exception:
        return False  # refused as INVALID_ARGUMENT before any work
    if m.name == "Snapshot":
        return True
    version = req.version.strip()
    return not version or version in h.live.store.versions()


def wire_case(h: Harness, rng: random.Random) -> tuple[str, Method, list[bytes], Any, int | None]:
    m = rng.choice(ASSISTANT + ADMIN)
    server = "admin" if m in ADMIN or rng.random() < 0.25 else "assistant"
    n = rng.choice([0, 1, 1, 2, 3, 5]) if m.client_streaming else 1
    payloads = [_payload(m, rng) for _ in range(n)]
    md: Any = rng.choice([ADMIN_MD, ADMIN_MD, ADMIN_MD, READ_MD, NO_MD, WRONG_MD]) if m in ADMIN else NO_MD
    if md is ADMIN_MD and any(_starts_a_job(h, m, p) for p in payloads):
        md = READ_MD
    cancel_after = 1 if m.server_streaming and rng.random() < 0.05 else None
    return server, m, payloads, md, cancel_after


async def _one(h: Harness, case: tuple[str, Method, list[bytes], Any, int | None]) -> tuple[Outcome, Any]:
    server, m, payloads, md, cancel_after = case
    out = await invoke(h.channel(server), m, payloads, metadata=md, cancel_after=cancel_after, raw=True)
    return out, case


def _rss_bytes() -> int:
    """Resident memory after handing freed heap pages back to the OS, so the figure follows live memory and not
    how much glibc happens to keep cached in its arenas at that moment (that alone swings by ~10 MiB)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _good_requests_still_answered(h: Harness) -> None:
    async def go() -> None:
        for server in ("assistant", "admin"):
            out = await invoke_good(h.channel(server), METHODS["Retrieve"],
                                    [pb.RetrieveRequest(query="reset thermostat")])
            assert out.code == grpc.StatusCode.OK, (server, out)
            out = await invoke_good(h.channel(server), METHODS["Ask"], [pb.AskRequest(query="reset the thermostat")])
            assert out.code == grpc.StatusCode.OK and out.responses > 0, (server, out)
        out = await invoke_good(h.channel("admin"), METHODS["Stats"], [METHODS["Stats"].request()], metadata=READ_MD)
        assert out.code == grpc.StatusCode.OK, out
    h.run(go())


def test_ten_thousand_wire_cases_crash_nothing_and_leak_nothing(harness: Harness) -> None:
    """10k raw-bytes calls, BATCH at a time. After a warm-up tenth (channel, caches, allocator arenas, the
    metrics label sets), the run is split in halves and measured at each end:

    * Python objects (gc.get_objects() after a full collection): a leak of one object per case would be
      thousands; the second half may grow by at most 1 % of the live objects (caches filling up, the live
      index's small write log from the fuzzed upserts that happen to be valid).
    * RSS (after malloc_trim): allocator noise on a shared box is still a few MiB either way, and the first half
      may shrink as much as the second grows back. So the end may stand at most 8 MiB above the higher of the
      two earlier marks, and at most 16 MiB above the warm mark. A per-case leak of 2 KiB would show as 18 MiB
      over the 9,000 measured cases, every run, while a flat run shows ~0.
    * asyncio tasks: the set alive on the loop after the run settles equals the one before it.
    """
    h = harness
    rng = random.Random(20261121)
    _good_requests_still_answered(h)
    tasks_before = h.settle()
    warm = WIRE_CASES // 10
    half = warm + (WIRE_CASES - warm) // 2
    marks: dict[int, tuple[int, int]] = {}
    codes: dict[str, int] = {}
    t0 = time.perf_counter()

    async def batch(cases: list[Any]) -> list[tuple[Outcome, Any]]:
        return await asyncio.gather(*(_one(h, c) for c in cases))

    done = 0
    while done < WIRE_CASES:
        if done in (warm, half):
            h.settle()
            gc.collect()
            marks[done] = (len(gc.get_objects()), _rss_bytes())
        size = min(BATCH, WIRE_CASES - done, *(b - done for b in (warm, half) if b > done))
        for out, case in h.run(batch([wire_case(h, rng) for _ in range(size)])):
            name = "client_write_race" if out.client_write_race else out.code.name
            codes[name] = codes.get(name, 0) + 1
            _, m, payloads, md, _ = case
            check_status(out, f"{m.path} {payloads[:2]!r:.300} md={md}", client_streaming=m.client_streaming)
        done += size
    elapsed = time.perf_counter() - t0

    tasks_after = h.settle(tasks_before)
    gc.collect()
    marks[done] = (len(gc.get_objects()), _rss_bytes())
    _good_requests_still_answered(h)

    (o0, r0), (o1, r1), (o2, r2) = marks[warm], marks[half], marks[done]
    print(f"\nwire fuzz: {done} cases in {elapsed:.1f} s; codes {dict(sorted(codes.items()))}; objects "
          f"{o0} -> {o1} -> {o2}; RSS MiB {r0 / 2**20:.1f} -> {r1 / 2**20:.1f} -> {r2 / 2**20:.1f}; tasks "
          f"{len(tasks_before)} -> {len(tasks_after)}")
    assert sum(codes.values()) == WIRE_CASES
    leaked = task_kinds(tasks_after) - task_kinds(tasks_before)
    assert not leaked, f"tasks outlived the run: {leaked}"
    assert o2 - o1 <= max(1000, o1 // 100), f"Python objects grew by {o2 - o1} over the second half ({o1} -> {o2})"
    over_peak, overall = r2 - max(r0, r1), r2 - r0
    assert over_peak <= 8 * 2**20 and overall <= 16 * 2**20, \
        f"RSS ended {over_peak / 2**20:.1f} MiB above its earlier peak and {overall / 2**20:.1f} MiB above the warm mark"


@settings(max_examples=fuzz_cases(150), deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_hypothesis_wire_bytes_on_every_method(harness: Harness, data: st.DataObject) -> None:
    """The same, with Hypothesis choosing the bytes (so a failure shrinks to a minimal input)."""
    m = data.draw(st.sampled_from(ASSISTANT + ADMIN), label="method")
    n = data.draw(st.integers(0, 3), label="messages") if m.client_streaming else 1
    payloads = [data.draw(wire_bytes(m.request), label="payload") for _ in range(n)]
    server = "admin" if m in ADMIN else data.draw(st.sampled_from(["assistant", "admin"]), label="server")
    md = data.draw(st.sampled_from([ADMIN_MD, READ_MD, NO_MD]), label="metadata") if m in ADMIN else NO_MD
    if md is ADMIN_MD and any(_starts_a_job(harness, m, p) for p in payloads):
        md = READ_MD
    out = harness.run(invoke(harness.channel(server), m, payloads, metadata=md, raw=True))
    check_status(out, f"{m.path} {payloads!r:.300}", client_streaming=m.client_streaming)
