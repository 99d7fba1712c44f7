"""One absolute deadline per request, and each stage's slice of it.

Time is `time.monotonic()` only: wall-clock jumps (NTP, DST) must never shorten or stretch a budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Budget:
    """The request's absolute deadline: min(client gRPC deadline, profile total), on the monotonic clock.

    `reserve_s` is held back from every stage so the fallback planner, which runs after a miss,
    still answers inside the deadline.
    """

    deadline: float
    reserve_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, total_s: float, *, client_remaining_s: float | None = None, reserve_s: float = 0.0) -> Budget:
        now = time.monotonic()
        total = total_s if client_remaining_s is None else min(total_s, client_remaining_s)
        return cls(deadline=now + total, reserve_s=min(reserve_s, max(total, 0.0) / 2), started=now)

    def remaining(self) -> float:
        """Seconds until the deadline (negative once past it)."""
        return self.deadline - time.monotonic()

    def for_stage(self, stage_budget_s: float) -> float:
        """A stage's timeout: min(its own budget, time left minus the fallback reserve), never negative."""
        return max(0.0, min(stage_budget_s, self.remaining() - self.reserve_s))

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0
