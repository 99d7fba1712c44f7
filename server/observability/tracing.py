"""Optional OpenTelemetry spans: one per RPC and one per pipeline stage. Off by default.

While off, nothing here imports opentelemetry (the package is not a dependency: install the `tracing` extra,
`pip install 'snaprag[tracing]'`). When on, spans go to the process's global TracerProvider (configure one
with the OpenTelemetry SDK, e.g. run under `opentelemetry-instrument` with OTEL_* settings); stage spans are
written after the stage finished, with its measured start and end, so the span and the StageTiming agree.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from server.config import ConfigError

_tracer: Any = None


def configure(enabled: bool, provider: Any = None) -> None:
    """Turn spans on or off for this process. Raises ConfigError if on and OpenTelemetry is missing."""
    global _tracer
    if not enabled:
        _tracer = None
        return
    try:
        from opentelemetry import trace
    except ImportError as e:
        raise ConfigError("observability.tracing = true needs OpenTelemetry, which is not installed: "
                          "pip install 'snaprag[tracing]' (or set observability.tracing = false)") from e
    _tracer = (provider or trace.get_tracer_provider()).get_tracer("snaprag")


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def rpc_span(rpc: str) -> Iterator[Any]:
    """A current span around one RPC (a no-op while tracing is off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(f"snaprag.{rpc}", attributes={"rpc.method": rpc}) as span:
        yield span


def stage_span(stage: str, outcome: str, elapsed_ms: float, budget_ms: float, detail: str) -> None:
    """A finished span for one stage, ending now and lasting `elapsed_ms`, child of the current RPC span."""
    tracer = _tracer
    if tracer is None:
        return
    end = time.time_ns()
    span = tracer.start_span(f"stage.{stage}", start_time=end - int(elapsed_ms * 1e6),
                             attributes={"stage": stage, "outcome": outcome, "budget_ms": budget_ms,
                                         "detail": detail})
    span.end(end_time=end)
