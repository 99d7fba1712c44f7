"""Who may call IndexAdmin: bearer tokens by role, or verified mTLS client certificates by common name.

Roles: `admin` may call every method, `read` only Stats. Checked at the top of every IndexAdmin
method, before the request (or the first message of a stream) is read, so a refused call changes
nothing. The configured tokens are resolved once at startup (env var or file) and kept only as SHA-256
digests, compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from server.config import AdminConfig
from server.errors import PermissionDenied, Unauthenticated
from server.security import MIN_TOKEN_CHARS, resolve_token, token_digest

Role = Literal["admin", "read"]
__all__ = ["MIN_TOKEN_CHARS", "Authenticator", "Credential", "resolve_tokens"]


@dataclass(frozen=True)
class Credential:
    role: Role
    digest: bytes
    origin: str
    """Where it came from ("env:SNAPRAG_ADMIN_TOKEN"), for logs; never the token."""


def resolve_tokens(entries: list[str], env: Mapping[str, str] | None = None,
                   base: Path | None = None) -> list[Credential]:
    """`ROLE:env:VAR`, `ROLE:file:PATH`, `ROLE:sha256:HEX` -> credentials. ConfigError names the entry."""
    out = []
    for entry in entries:
        role, _, source = entry.partition(":")
        kind, _, ref = source.partition(":")
        digest, origin = resolve_token(source, f"admin.tokens entry {role}:{kind}:{ref}", env, base)
        out.append(Credential(role, digest, origin))  # type: ignore[arg-type]
    return out


class Authenticator:
    def __init__(self, credentials: list[Credential], client_roles: Mapping[str, Role] | None = None) -> None:
        self.credentials = credentials
        self.client_roles = dict(client_roles or {})

    @classmethod
    def from_config(cls, cfg: AdminConfig, env: Mapping[str, str] | None = None,
                    base: Path | None = None) -> Authenticator:
        roles: dict[str, Role] = {}
        for entry in cfg.client_roles:
            role, _, cn = entry.partition(":")
            roles[cn] = role  # type: ignore[assignment]
        return cls(resolve_tokens(cfg.tokens, env, base), roles)

    def role_of(self, context: Any) -> Role:
        """The caller's role, or Unauthenticated naming what is missing."""
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                header = value
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be `Bearer <token>`")
            presented = token_digest(token.strip())
            role: Role | None = None
            for cred in self.credentials:  # compare against all, constant time each
                if hmac.compare_digest(presented, cred.digest):
                    role = cred.role
            if role is None:
                raise Unauthenticated("the bearer token is not valid for IndexAdmin")
            return role
        cn = _client_common_name(context)
        if cn is not None:
            if cn in self.client_roles:
                return self.client_roles[cn]
            raise Unauthenticated(f"client certificate {cn!r} has no role (admin.client_roles)")
        raise Unauthenticated("IndexAdmin needs credentials: send `authorization: Bearer <token>` metadata "
                              "(snaprag index ... --token-file FILE, or env SNAPRAG_ADMIN_TOKEN)")

    def require(self, context: Any, need: Role, method: str) -> Role:
        role = self.role_of(context)
        if need == "admin" and role != "admin":
            raise PermissionDenied(f"{method} needs the admin role; this credential has role {role!r} "
                                   "(Stats only)")
        return role


def _client_common_name(context: Any) -> str | None:
    """The verified client certificate's CN when the call came over mTLS (the admin port requires and
    verifies client certificates, so a CN there is authenticated); None otherwise."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # no transport security information on this call
        return None
    if b"ssl" not in [v for v in auth.get("transport_security_type", [])]:
        return None
    names = auth.get("x509_common_name") or []
    return names[0].decode("utf-8", "replace") if names else None
