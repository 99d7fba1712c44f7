"""The one stage contract: a named async step with a budget, run under `run_stage`.

`run_stage` is the only place that times a stage, enforces its budget and records the outcome, so
every response's per-stage timings mean the same thing. Mandatory stages raise `StageMissed` on a
miss or failure (the caller hands over to the fallback planner); optional ones return `None` and the
caller keeps what it had.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from server.observability.metrics import observe_stage
from server.observability.tracing import stage_span
from server.pipeline.budget import Budget

log = logging.getLogger(__name__)
T = TypeVar("T")


class Outcome(Enum):
    OK = "ok"
    SKIPPED = "skipped"
    MISSED_BUDGET = "missed_budget"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StageTiming:
    stage: str
    elapsed_ms: float
    budget_ms: float
    outcome: Outcome
    detail: str = ""


class StageMissed(Exception):
    """A mandatory stage missed its budget or failed. Carries the timing that says which and why."""

    def __init__(self, timing: StageTiming) -> None:
        super().__init__(f"{timing.stage}: {timing.detail}")
        self.timing = timing


@dataclass(slots=True)
class Trace:
    """The timings of one request, in the order stages finished. `on_timing` streams them as they land."""

    timings: list[StageTiming] = field(default_factory=list)
    on_timing: Callable[[StageTiming], None] | None = None

    def record(self, timing: StageTiming) -> StageTiming:
        self.timings.append(timing)
        # The one place every stage is observed: latency histogram, and a span when tracing is on.
        observe_stage(timing.stage, timing.outcome.value, timing.elapsed_ms)
        stage_span(timing.stage, timing.outcome.value, timing.elapsed_ms, timing.budget_ms, timing.detail)
        if self.on_timing is not None:
            self.on_timing(timing)
        return timing

    def skipped(self, stage: str, detail: str) -> StageTiming:
        return self.record(StageTiming(stage, 0.0, 0.0, Outcome.SKIPPED, detail))

    @property
    def degraded_by(self) -> StageTiming | None:
        """The first stage that missed or failed, if any (after a mandatory miss the fallback answered;
        an optional one leaves the answer DEGRADED)."""
        for t in self.timings:
            if t.outcome in (Outcome.MISSED_BUDGET, Outcome.FAILED):
                return t
        return None


async def run_stage(name: str, work: Callable[[], Awaitable[T]], *, budget: Budget, stage_budget_s: float,
                    trace: Trace, mandatory: bool, ok_detail: str = "") -> T | None:
    """Run one stage under min(stage budget, time left). Cancellation from outside always propagates."""
    timeout = budget.for_stage(stage_budget_s)
    budget_ms = timeout * 1000.0
    start = time.perf_counter()
    if timeout <= 0.0:
        timing = StageTiming(name, 0.0, 0.0, Outcome.MISSED_BUDGET, "no time left before the deadline")
    else:
        try:
            async with asyncio.timeout(timeout):
                result = await work()
        except TimeoutError:
            timing = StageTiming(name, _ms(start), budget_ms, Outcome.MISSED_BUDGET,
                                 f"exceeded its {budget_ms:.0f} ms budget")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failing stage must degrade the answer, never fail the request
            log.warning("stage %s failed: %r", name, e, exc_info=log.isEnabledFor(logging.DEBUG))
            timing = StageTiming(name, _ms(start), budget_ms, Outcome.FAILED, f"{type(e).__name__}: {e}"[:300])
        else:
            trace.record(StageTiming(name, _ms(start), budget_ms, Outcome.OK, ok_detail))
            return result
    trace.record(timing)
    if mandatory:
        raise StageMissed(timing)
    return None


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
