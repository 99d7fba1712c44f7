"""Token configuration: resolved at startup from env/file/sha256, refused with the entry named; never literal."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import ConfigError, load_config
from server.errors import PermissionDenied, Unauthenticated
from server.index.auth import Authenticator, resolve_tokens
from tests.index.conftest import sha

TOKEN = "0123456789abcdef-token"


class Ctx:
    def __init__(self, *md: tuple[str, str]) -> None:
        self.md = md

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.md

    def auth_context(self) -> dict:
        return {}


def test_sources_resolve_to_the_same_credential(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(f"  {TOKEN}\n")
    creds = resolve_tokens(["admin:env:TOK", f"read:file:{tmp_path / 't'}", f"admin:sha256:{sha(TOKEN)}"],
                           env={"TOK": TOKEN})
    assert len({c.digest for c in creds}) == 1 and [c.role for c in creds] == ["admin", "read", "admin"]
    assert all(TOKEN not in c.origin for c in creds)


@pytest.mark.parametrize(("entry", "env", "message"), [
    ("admin:env:MISSING", {}, "environment variable MISSING is not set"),
    ("admin:env:SHORT", {"SHORT": "abc"}, "the token has 3 characters; use at least 16"),
    ("admin:file:/nonexistent/token", {}, "cannot read /nonexistent/token"),
    ("admin:sha256:abcd", {}, "expected 64 hex digits"),
])
def test_bad_token_sources_stop_startup_naming_the_entry(entry: str, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_tokens([entry], env=env)


def test_config_refuses_literal_tokens_and_admin_without_credentials() -> None:
    with pytest.raises(ConfigError, match="never the token itself"):
        load_config(overrides=['admin.tokens=["admin:hunter2hunter2hunter2"]'], env={})
    with pytest.raises(ConfigError, match="no credentials configured"):
        load_config(overrides=["admin.enabled=true"], env={})
    with pytest.raises(ConfigError, match="mTLS needs its own port"):
        load_config(overrides=['admin.tls_cert="a"', 'admin.tls_key="b"', 'admin.client_ca="c"'], env={})


def test_roles_and_header_forms() -> None:
    auth = Authenticator(resolve_tokens([f"admin:sha256:{sha(TOKEN)}", f"read:sha256:{sha(TOKEN + 'r')}"]))
    assert auth.require(Ctx(("authorization", f"Bearer {TOKEN}")), "admin", "Upsert") == "admin"
    assert auth.require(Ctx(("authorization", f"bearer {TOKEN}r")), "read", "Stats") == "read"
    with pytest.raises(PermissionDenied, match="Upsert needs the admin role"):
        auth.require(Ctx(("authorization", f"Bearer {TOKEN}r")), "admin", "Upsert")
    for md in [(), (("authorization", TOKEN),), (("authorization", "Bearer "),), (("authorization", "Bearer x"),)]:
        with pytest.raises(Unauthenticated):
            auth.require(Ctx(*md), "read", "Stats")
