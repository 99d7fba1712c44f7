"""Generation tests reuse the in-process server fixture of tests/server."""

from tests.server.conftest import make_server  # noqa: F401  (a fixture, used by name)
