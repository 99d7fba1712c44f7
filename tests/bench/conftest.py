"""The in-process server fixtures of tests/server, for the bench smoke runs."""

from tests.server.conftest import client, make_server  # noqa: F401  (pytest fixtures, used by name)
