"""One real vLLM server per test session, serving a tiny seeded Llama and a LoRA adapter named "voice".

The model and adapter are built offline (tests/generate/tiny_llama.py) in the session's temp dir, and
the server is started through `VllmProcess` on 127.0.0.1 with a free port and stopped by PID at the end.
If vLLM cannot start, every test that uses the server fails with vLLM's log tail: a missing server is
a broken install here, never a reason to skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.generate.vllm_launcher import VllmProcess, VllmStartError
from tests.generate.tiny_llama import CONTEXT, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SERVED_MODEL = "tiny-llama"
ADAPTER = "voice"
STARTUP_TIMEOUT_S = 240.0


@dataclass(frozen=True, slots=True)
class VllmServer:
    base_url: str
    """e.g. http://127.0.0.1:PORT (no /v1)."""
    model: str
    """Served name of the base model (what a request's `model` names for no adapter)."""
    adapter: str
    """Served name of the LoRA adapter."""
    model_dir: Path
    adapter_dir: Path
    port: int
    pid: int
    log_path: Path
    """The server's combined stdout/stderr. Requests are logged (--enable-log-requests), aborts included:
    "Request ID aborted."."""


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    root = tmp_path_factory.mktemp("vllm")
    tiny = build_tiny_llama(root / "tiny-llama")
    process = VllmProcess(tiny.model_dir, loras=[f"{ADAPTER}={tiny.adapter_dir}"], max_loras=2,
                          max_model_len=CONTEXT, max_num_seqs=8, served_model_name=SERVED_MODEL,
                          dtype="float32",  # the transformers reference runs in float32: greedy tokens must match
                          extra_args=["--enable-log-requests"], startup_timeout_s=STARTUP_TIMEOUT_S,
                          log_path=root / "vllm-server.log")
    try:
        process.start()
    except VllmStartError as e:
        pytest.fail(f"the vLLM test server did not start: {e}", pytrace=False)
    assert process.pid is not None
    print(f"\nvLLM test server ready on {process.base_url} in {process.startup_s:.1f} s (pid {process.pid}, "
          f"log {process.log_path})")
    try:
        yield VllmServer(base_url=process.base_url, model=SERVED_MODEL, adapter=ADAPTER, model_dir=tiny.model_dir,
                         adapter_dir=tiny.adapter_dir, port=process.port, pid=process.pid,
                         log_path=process.log_path)
    finally:
        process.stop()
