"""Prometheus metrics of the server, on their own registry, served on [observability] metrics_port.

The metrics are module-level objects on `REGISTRY` (not prometheus_client's global one), defined once at
import, so any number of in-process servers (the tests start many) share them without a duplicate
registration; each `start_server` only starts (or not) its own HTTP listener. Everything that records is
cheap (a lock and an add) and never raises into a request.

    snaprag_stage_latency_seconds{stage, outcome}       histogram, every StageTiming (Trace.record)
    snaprag_requests_total{rpc, mode, code}             counter, every RPC (errors.grpc_errors)
    snaprag_request_latency_seconds{rpc, code}          histogram, every RPC
    snaprag_in_flight{rpc}                              gauge
    snaprag_retrieved_chunks{pipeline}                  histogram, passages a retrieve stage returned
    snaprag_rerank_candidates                           histogram, candidates the cross-encoder scored
    snaprag_generated_tokens_total{backend}             counter, GenerationRecord.tokens of each answer
    snaprag_grounding_sentences_total{result}           counter, spoken | dropped (ungrounded) sentences
    snaprag_shed_total{rpc}                             counter, requests refused by admission control
    snaprag_index_version                               gauge, the live index snapshot served (1 if static)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
    start_http_server,
)

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
process_collector.ProcessCollector(registry=REGISTRY)
platform_collector.PlatformCollector(registry=REGISTRY)
gc_collector.GCCollector(registry=REGISTRY)

# Stage budgets run from a few ms (plan, rerank) to seconds (a voice answer's stream).
_LATENCY_BUCKETS = (.001, .0025, .005, .01, .02, .03, .04, .06, .08, .1, .12, .15, .2, .3, .5, .8, 1.0, 2.0, 5.0,
                    10.0)
_COUNT_BUCKETS = (0, 1, 2, 3, 5, 8, 10, 20, 50, 100)

STAGE_LATENCY = Histogram("snaprag_stage_latency_seconds", "Time each pipeline stage took, by outcome "
                          "(ok, skipped, missed_budget, failed).", ["stage", "outcome"], registry=REGISTRY,
                          buckets=_LATENCY_BUCKETS)
REQUESTS = Counter("snaprag_requests", "RPCs finished, by serving mode (FULL, DEGRADED, FALLBACK; NONE for "
                   "Retrieve and errors) and gRPC status code.", ["rpc", "mode", "code"], registry=REGISTRY)
REQUEST_LATENCY = Histogram("snaprag_request_latency_seconds", "Time from handler start to the last response "
                            "message, by RPC and gRPC status code.", ["rpc", "code"], registry=REGISTRY,
                            buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("snaprag_in_flight", "RPCs being handled now.", ["rpc"], registry=REGISTRY)
RETRIEVED_CHUNKS = Histogram("snaprag_retrieved_chunks", "Passages a retrieve stage returned, by pipeline "
                             "(answer, plan, retrieve).", ["pipeline"], registry=REGISTRY, buckets=_COUNT_BUCKETS)
RERANK_CANDIDATES = Histogram("snaprag_rerank_candidates", "Candidates the cross-encoder scored per request.",
                              registry=REGISTRY, buckets=_COUNT_BUCKETS)
GENERATED_TOKENS = Counter("snaprag_generated_tokens", "Tokens generated for answers, by the backend that "
                           "answered (0 for the extractive tier).", ["backend"], registry=REGISTRY)
GROUNDING = Counter("snaprag_grounding_sentences", "Generated sentences by grounding-check result: spoken "
                    "(passed) or dropped (ungrounded, not spoken).", ["result"], registry=REGISTRY)
AUTH_REFUSED = Counter("snaprag_auth_refused", "Calls refused for a missing or invalid bearer token "
                       "(UNAUTHENTICATED), by RPC.", ["rpc"], registry=REGISTRY)
SHED = Counter("snaprag_shed", "Requests refused by admission control (RESOURCE_EXHAUSTED) before any work.",
               ["rpc"], registry=REGISTRY)
START_DELAY = Gauge("snaprag_start_delay_seconds", "How long work admitted now would wait to start: event-loop "
                    "lag plus the CPU pool's queue (what admission control sheds on).", registry=REGISTRY)
INDEX_VERSION = Gauge("snaprag_index_version", "Snapshot version of the index being served (1 for the static "
                      "index built at startup).", registry=REGISTRY)
INDEX_VERSION.set(1)

MODE_NAMES = {1: "FULL", 2: "DEGRADED", 3: "FALLBACK"}


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, remembered: prometheus-client validates the values and takes a lock on every
    labels() call (~5 µs, six times per RPC). A child never changes once made (nothing here removes label
    sets), so the first one is reused. The label values come from our own fixed vocabularies (RPC names,
    status codes, modes, stages), so this stays a few hundred entries."""
    key = (id(metric), values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN.setdefault(key, metric.labels(*values))
    return found


def observe_stage(stage: str, outcome: str, elapsed_ms: float) -> None:
    child(STAGE_LATENCY, stage, outcome).observe(elapsed_ms / 1000.0)


def observe_retrieved(pipeline: str, n: int) -> None:
    child(RETRIEVED_CHUNKS, pipeline).observe(n)


def observe_answer(record: Any, spoken: int) -> None:
    """One finished answer that a generator produced (`record`: its GenerationRecord; fallback-planner answers
    have none and are not counted): tokens, and sentences that passed / failed the grounding check."""
    if record is None:
        return
    child(GENERATED_TOKENS, record.backend or "unknown").inc(max(0, int(record.tokens)))
    child(GROUNDING, "spoken").inc(spoken)
    child(GROUNDING, "dropped").inc(len(record.ungrounded))


def mode_of(message: Any) -> str | None:
    """The serving mode a response message reports (PlanResponse, or an AnswerEvent's final), else None."""
    final = message
    has = getattr(message, "HasField", None)
    if has is not None:
        try:
            if has("final"):
                final = message.final
        except ValueError:  # a message without a `final` field
            pass
    mode = getattr(final, "mode", None)
    return MODE_NAMES.get(mode) if isinstance(mode, int) else None


def set_index_version(source: Callable[[], float] | None) -> None:
    """The gauge reads `source()` at each scrape (the live index's current version), else stays 1."""
    if source is None:
        INDEX_VERSION.set(1)
    else:
        INDEX_VERSION.set_function(source)


def set_start_delay(source: Callable[[], float] | None) -> None:
    """The gauge reads `source()` (server.load.LoadGauge.expected_delay_s) at each scrape."""
    if source is None:
        START_DELAY.set(0)
    else:
        START_DELAY.set_function(source)


class MetricsServer:
    """The /metrics HTTP listener of one server (a daemon thread)."""

    def __init__(self, host: str, port: int) -> None:
        try:
            httpd, self._thread = start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as e:
            raise OSError(f"could not bind the metrics port {host}:{port} ({e.strerror}); change "
                          "observability.metrics_port (0 = a free port) or set observability.metrics = false") from e
        self._httpd: Any = httpd
        self.port: int = httpd.server_port
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._httpd is None:
                return
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
