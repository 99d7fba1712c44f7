"""The servers a bench run starts for itself: subprocesses bound to loopback on a free port.

Each one prints "... serving on HOST:PORT" when it is ready; its stdout and stderr go to a log file in the
run's output folder (never to a pipe nobody reads: a full pipe would stall the server mid-run and show up
as latency).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from server.config import REPO_ROOT

READY = re.compile(r"serving on (\S+)")
# Loading the KB, the ONNX encoder and the HNSW index takes a few seconds; a cold page cache more.
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


class ServerStartError(RuntimeError):
    """A bench server did not come up; the message names it, its log and the log's last lines."""


@dataclass
class StartedServer:
    name: str
    address: str
    proc: subprocess.Popen[str]
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # snaprag drains; the bench servers just exit
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start(name: str, args: list[str], log_path: Path, *, timeout_s: float = START_TIMEOUT_S) -> StartedServer:
    """Run `python ARGS` from the repo root and wait for its "serving on ADDRESS" line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_VERBOSITY": os.environ.get("GRPC_VERBOSITY", "ERROR")}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    assert proc.stdout is not None
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # copy stdout to the log for the whole life of the process; spot the ready line
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            m = READY.search(line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, name=f"{name}-log", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            proc.kill()
            raise ServerStartError(f"{name} did not print 'serving on' within {timeout_s:.0f} s; see {log_path}")
    if not found:
        proc.wait(5)
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise ServerStartError(f"{name} exited with code {proc.returncode} before serving; {log_path}:\n  "
                               + "\n  ".join(tail))
    return StartedServer(name, found[0], proc, log_path)
