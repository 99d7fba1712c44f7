"""The server as a user starts it (`make run` runs `snaprag serve`), called with the project's CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _snaprag() -> list[str]:
    exe = Path(sys.executable).parent / "snaprag"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": "ERROR",
           "SNAPRAG__OBSERVABILITY__METRICS_PORT": "0"}
    proc = subprocess.Popen([*_snaprag(), "serve", "--host", "127.0.0.1", "--port", "0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = ""
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"snaprag serving on (\S+)", line)
        if m:
            address = m.group(1)
            break
    if not address:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
    yield proc, address
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_snaprag(), *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GRPC_VERBOSITY": "ERROR"})


def test_health_ask_plan_retrieve_through_the_cli(served: tuple[subprocess.Popen[str], str]) -> None:
    _, address = served
    health = _cli("health", "--target", address)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"

    ask = _cli("ask", "--target", address, "how do i reset my smart plug")
    assert ask.returncode == 0, ask.stderr
    assert "mode=FULL" in ask.stdout and "Smart Plug" in ask.stdout and "retrieve=" in ask.stdout

    plan = _cli("plan", "--target", address, "--robot", "fl-004", "--fault", "E202", "--loaded")
    assert plan.returncode == 0, plan.stderr
    assert re.search(r"1\. (emergency_)?stop\(\)", plan.stdout) and "2. hold_load()" in plan.stdout

    bad = _cli("retrieve", "--target", address, "plug", "-k", "500")
    assert bad.returncode == 1 and "INVALID_ARGUMENT: k: must be in 1..100" in bad.stderr


def test_sigterm_drains_and_exits_cleanly(served: tuple[subprocess.Popen[str], str]) -> None:
    proc, _ = served
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert proc.stderr is not None and "draining" in proc.stderr.read()
