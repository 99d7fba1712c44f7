"""Micro-benchmark: what a shed call costs inside the server (admission check + refusal), without gRPC.

    .venv/bin/python bench/shed_cost.py
"""

from __future__ import annotations

import asyncio
import time

from server.admission import Admission
from server.config import AdmissionConfig
from server.errors import ResourceExhausted


async def main(n: int = 100_000) -> None:
    a = Admission(AdmissionConfig(max_in_flight=2, max_retrieve=1, reserved_robot=0, reserved_voice=0,
                                  retrieve_queue_ms=0.0))
    held = await a.admit("Retrieve", stage_budget_s=0.1)
    t0 = time.perf_counter()
    for _ in range(n):
        try:
            await a.admit("Retrieve", stage_budget_s=0.1)
        except ResourceExhausted:
            pass
    refuse_us = (time.perf_counter() - t0) / n * 1e6
    held.release()
    t0 = time.perf_counter()
    for _ in range(n):
        (await a.admit("Plan", stage_budget_s=0.1)).release()
    admit_us = (time.perf_counter() - t0) / n * 1e6
    print(f"shed: {refuse_us:.2f} us per refused call; admit+release: {admit_us:.2f} us ({n} calls each)")


if __name__ == "__main__":
    asyncio.run(main())
