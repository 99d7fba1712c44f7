"""Admission control and load shedding: limits on calls in flight, per RPC and overall, by priority.

    classes, highest first:  robot (Plan)  >  voice (Ask, Converse)  >  retrieve (Retrieve)

A call takes a slot if its RPC is under its own limit and the server is under `max_in_flight` minus the
slots reserved for the classes above it (`reserved_robot` for Plan only, `reserved_voice` for Plan and
voice), so a Retrieve flood can never take the slots Plan needs. When no slot is free the call may wait
its class's queue time, capped by its profile's first stage budget (a call that cannot start within its
first stage's budget would be served late: it is refused instead); a freed slot goes to the waiter of
the highest class first. Then it is refused with `ResourceExhausted` (RESOURCE_EXHAUSTED, trailing
metadata `retry-after-ms`). The refuse path is synchronous: counters and one exception, microseconds.

A Converse stream holds one voice slot while it is open.

Slots bound how many calls are in flight, not how late they will be: before taking a slot, a call is refused
at once when work admitted now would wait longer than its class's `*_max_delay_ms` to start (event-loop lag
plus the CPU-pool jobs that would run before it, server/load.py). The pool runs jobs by class, so a robot's
retrieval waits only behind robot work: under CPU overload Retrieve's wait grows first, then voice's, and
they are shed before robot Plans are.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from server.config import AdmissionConfig
from server.errors import ResourceExhausted
from server.load import CLASS_PRIORITY, WORK_CLASS, LoadGauge

log = logging.getLogger(__name__)

RPC_CLASS = {"Plan": "robot", "Ask": "voice", "Converse": "voice", "Retrieve": "retrieve"}
CLASSES = ("robot", "voice", "retrieve")  # priority order


def record_shed(rpc: str) -> None:
    """Hook: one call shed. Feeds the `snaprag_shed_total{rpc}` counter when observability is installed."""
    if _shed_counter is not None:
        try:
            _shed_counter.labels(rpc=rpc).inc()
        except Exception:  # metrics must never turn a clean refusal into an error
            log.debug("shed counter failed", exc_info=True)


_shed_counter: Any
try:  # snaprag_shed_total{rpc}; without prometheus-client / observability the hook only counts locally
    from server.observability.metrics import SHED as _shed_counter
except Exception:  # any import failure: metrics are optional
    _shed_counter = None


@dataclass(slots=True)
class Ticket:
    """One admitted call's slot. `release()` is idempotent; use it as a context manager."""

    admission: Admission | None
    rpc: str

    def release(self) -> None:
        adm, self.admission = self.admission, None
        if adm is not None:
            adm._release(self.rpc)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    def __init__(self, cfg: AdmissionConfig, load: LoadGauge | None = None) -> None:
        self.cfg = cfg
        self.load = load
        """The expected start delay of a call admitted now (server/load.py); None = slots only."""
        self._max_delay_s = {"robot": cfg.robot_max_delay_ms / 1000, "voice": cfg.voice_max_delay_ms / 1000,
                             "retrieve": cfg.retrieve_max_delay_ms / 1000}
        self.in_flight = 0
        self.by_rpc: dict[str, int] = dict.fromkeys(RPC_CLASS, 0)
        self.shed: dict[str, int] = dict.fromkeys(RPC_CLASS, 0)
        self.waiting: dict[str, deque[tuple[str, asyncio.Future[Ticket]]]] = {c: deque() for c in CLASSES}
        self._rpc_limit = {"Plan": cfg.max_plan, "Ask": cfg.max_ask, "Converse": cfg.max_converse,
                           "Retrieve": cfg.max_retrieve}
        # Slots of max_in_flight each class may use (the rest are reserved for the classes above it).
        self._class_limit = {"robot": cfg.max_in_flight,
                             "voice": cfg.max_in_flight - cfg.reserved_robot,
                             "retrieve": cfg.max_in_flight - cfg.reserved_robot - cfg.reserved_voice}
        self._queue_s = {"robot": cfg.robot_queue_ms / 1000, "voice": cfg.voice_queue_ms / 1000,
                         "retrieve": cfg.retrieve_queue_ms / 1000}

    def _has_room(self, rpc: str) -> bool:
        return (self.by_rpc[rpc] < self._rpc_limit[rpc]
                and self.in_flight < self._class_limit[RPC_CLASS[rpc]])

    def _waiters_ahead(self, cls: str) -> bool:
        for c in CLASSES:
            if self.waiting[c]:
                return True
            if c == cls:
                return False
        return False

    def _take(self, rpc: str) -> Ticket:
        self.in_flight += 1
        self.by_rpc[rpc] += 1
        return Ticket(self, rpc)

    @staticmethod
    def classify(rpc: str) -> None:
        """The CPU jobs the current call submits from now on run at its class's priority (server/load.py)."""
        WORK_CLASS.set(CLASS_PRIORITY[RPC_CLASS[rpc]])

    def try_admit(self, rpc: str) -> Ticket | None:
        """A slot now, or None (no waiting). Always a ticket when admission is disabled."""
        if not self.cfg.enabled:
            return Ticket(None, rpc)
        if self._has_room(rpc) and not self._waiters_ahead(RPC_CLASS[rpc]):
            return self._take(rpc)
        return None

    async def admit(self, rpc: str, *, stage_budget_s: float, client_remaining_s: float | None = None) -> Ticket:
        """A slot, after waiting at most min(class queue time, first stage budget, client's time left);
        else `ResourceExhausted`. When no wait is allowed nothing is awaited. A call that would wait longer
        than its class's max delay for the loop and CPU pool to start it is refused at once: it could not
        start within budget, and waiting for a slot would not change that."""
        if self.load is not None and self.cfg.enabled:
            limit = self._max_delay_s[RPC_CLASS[rpc]]
            if limit > 0:
                delay = self.load.expected_delay_s(CLASS_PRIORITY[RPC_CLASS[rpc]])
                if delay > limit:
                    raise self._refuse(rpc, why=f"work admitted now would wait ~{delay * 1000:.0f} ms to start "
                                                f"({self.load.describe()}; {rpc} limit {limit * 1000:g} ms)")
        self.classify(rpc)
        ticket = self.try_admit(rpc)
        if ticket is not None:
            return ticket
        cls = RPC_CLASS[rpc]
        wait_s = min(self._queue_s[cls], stage_budget_s,
                     client_remaining_s if client_remaining_s is not None else float("inf"))
        if wait_s <= 0.0:
            raise self._refuse(rpc)
        fut: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        entry = (rpc, fut)
        self.waiting[cls].append(entry)
        try:
            async with asyncio.timeout(wait_s):
                return await asyncio.shield(fut)
        except TimeoutError:
            if fut.done() and not fut.cancelled():  # the slot came at the last moment: take it
                return fut.result()
            raise self._refuse(rpc, waited_ms=wait_s * 1000) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                fut.result().release()
            raise
        finally:
            if not fut.done():
                fut.cancel()
            try:
                self.waiting[cls].remove(entry)
            except ValueError:
                pass

    def _refuse(self, rpc: str, waited_ms: float = 0.0, why: str = "") -> ResourceExhausted:
        self.shed[rpc] += 1
        record_shed(rpc)
        retry = self.cfg.retry_after_ms
        limit = self._rpc_limit[rpc]
        if not why:
            why = (f"{self.by_rpc[rpc]} {rpc} calls in flight (limit {limit})" if self.by_rpc[rpc] >= limit
                   else f"{self.in_flight} calls in flight, no {RPC_CLASS[rpc]} slot free")
        waited = f" after waiting {waited_ms:.0f} ms" if waited_ms else ""
        return ResourceExhausted(f"server overloaded: {why}{waited}; retry after {retry} ms (retry-after-ms)",
                                 retry_after_ms=retry)

    def _release(self, rpc: str) -> None:
        self.in_flight -= 1
        self.by_rpc[rpc] -= 1
        # Hand freed slots to waiters, highest class first (FIFO within a class).
        for cls in CLASSES:
            queue = self.waiting[cls]
            for entry in list(queue):
                w_rpc, fut = entry
                if fut.done():
                    queue.remove(entry)
                    continue
                if self._has_room(w_rpc):
                    queue.remove(entry)
                    fut.set_result(self._take(w_rpc))
            if queue:
                return  # lower classes never overtake a waiting higher class

    def snapshot(self) -> dict[str, int]:
        """In-flight counts (for tests, metrics and logs)."""
        return {"total": self.in_flight, **self.by_rpc}
