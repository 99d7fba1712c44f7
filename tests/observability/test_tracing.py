"""OpenTelemetry is optional: off imports nothing; on (when installed) gives spans per RPC and stage."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from server.config import ConfigError
from server.observability import tracing

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_tracing_off_never_imports_opentelemetry() -> None:
    code = ("import sys\n"
            "from server.config import load_config\n"
            "from server.observability import tracing\n"
            "import server.app, server.servicer\n"
            "from server.pipeline.stage import Trace, StageTiming, Outcome\n"
            "tracing.configure(load_config(env={}).observability.tracing)\n"
            "Trace().record(StageTiming('retrieve', 1.0, 2.0, Outcome.OK))\n"
            "bad = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_enabling_without_the_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"snaprag\[tracing\]"):
        tracing.configure(True)
    assert not tracing.enabled()


async def test_spans_per_rpc_and_stage_when_on(make_server: Any, config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    from opentelemetry import trace

    exporter = memory.InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    import dataclasses

    cfg = dataclasses.replace(config, observability=dataclasses.replace(config.observability, tracing=True))
    try:
        _, client = await make_server(cfg)
        exporter.clear()  # warm-up stages
        await client.retrieve("battery overtemperature", k=3)
    finally:
        tracing.configure(False)
    spans = exporter.get_finished_spans()
    rpc = [s for s in spans if s.name == "snaprag.Retrieve"]
    stage = [s for s in spans if s.name == "stage.retrieve"]
    assert len(rpc) == 1 and len(stage) == 1
    assert stage[0].parent is not None and stage[0].parent.span_id == rpc[0].context.span_id
    assert stage[0].attributes["outcome"] == "ok"
