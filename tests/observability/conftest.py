"""The in-process server fixture of tests/server."""

from tests.server.conftest import make_server  # noqa: F401
