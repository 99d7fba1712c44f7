"""Shared fixtures: the config and runtime are built once per session (they are loop-independent);
servers are started per test on port 0, on the test's own event loop."""

from __future__ import annotations

import os

# gRPC core logs connection teardown (GOAWAY) at INFO; keep test output to what matters.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import pytest

from server.config import Config, load_config
from server.runtime import Runtime, build_runtime


# No delay-based shedding in servers the tests start: there the client shares the server's event loop and CI
# machines are shared, so loop lag would shed calls the tests expect answered. tests/faults/test_admission.py
# and tests/faults/test_load.py cover that check with their own configs.
NO_DELAY_SHEDDING = ["admission.robot_max_delay_ms=0", "admission.voice_max_delay_ms=0",
                     "admission.retrieve_max_delay_ms=0"]


@pytest.fixture(scope="session")
def config() -> Config:
    # Free ports only: the metrics listener too (its default, 9464, is for `make run`).
    return load_config(overrides=["server.port=0", "observability.metrics_port=0", *NO_DELAY_SHEDDING], env={})


@pytest.fixture(scope="session")
def runtime(config: Config) -> Runtime:
    rt = build_runtime(config)
    yield rt
    rt.close()
