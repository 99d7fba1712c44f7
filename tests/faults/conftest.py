"""Fault-injection and admission tests: a real in-process server (tests/server/conftest.py's make_server)."""

from __future__ import annotations

from tests.server.conftest import make_server, rpc_error  # noqa: F401  (fixtures and helper shared)
