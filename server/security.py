"""Transport security and caller authentication of the main port ([security]).

    TLS / mTLS     `server_credentials`: certificates from PEM files; with a client CA, a client certificate
                   chaining to it is required before any call (mutual TLS).
    Bearer tokens  `BearerTokenInterceptor`: every call to a protected method needs
                   `authorization: Bearer <token>` metadata, checked before the handler (and before the
                   request is even parsed), so an unauthenticated caller costs a hash and a refusal.
    Token sources  `resolve_token`: `env:VAR`, `file:PATH` or `sha256:HEX`, never the token in the config
                   file. Shared with IndexAdmin's role-based auth (server/index/auth.py).

Tokens are kept only as SHA-256 digests and compared in constant time against every configured one, so
the time a refusal takes does not say which prefix matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from server.config import ConfigError, SecurityConfig

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
"""A shorter token is guessable; refused at startup."""


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def resolve_token(source: str, where: str, env: Mapping[str, str] | None = None,
                  base: Path | None = None) -> tuple[bytes, str]:
    """`env:VAR` | `file:PATH` | `sha256:HEX` -> (SHA-256 digest of the token, origin for logs).
    ConfigError names `where` and the fix. The origin never contains the token."""
    env = os.environ if env is None else env
    kind, _, ref = source.partition(":")
    if kind == "sha256":
        try:
            digest = bytes.fromhex(ref)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"{where}: expected 64 hex digits (sha256 of the token, e.g. "
                              "`printf %s TOKEN | sha256sum`)")
        return digest, f"sha256:{ref[:8]}…"
    if kind == "env":
        token = env.get(ref, "")
        if not token:
            raise ConfigError(f"{where}: environment variable {ref} is not set or empty; export the token "
                              "there or remove the entry")
    elif kind == "file":
        path = Path(ref) if Path(ref).is_absolute() or base is None else base / ref
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {path} ({e.strerror}); write the token into it") from e
        if not token:
            raise ConfigError(f"{where}: {path} is empty; write the token into it")
    else:
        raise ConfigError(f"{where}: source must be env:VAR, file:PATH or sha256:HEX")
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                          "random ones (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token_digest(token), f"{kind}:{ref}"


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; "" when the header is there but malformed;
    None when there is none."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def matches(presented: str, digests: Iterable[bytes]) -> bool:
    """Constant time per configured digest, and every one is compared (no early exit)."""
    d = token_digest(presented)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(d, digest)
    return found


# ---------------------------------------------------------------------------------------------- TLS
def read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OSError(f"{what}: cannot read {path} ({e.strerror})") from e
    if b"-----BEGIN" not in data:
        raise OSError(f"{what}: {path} is not PEM (no -----BEGIN line); convert it with "
                      "`openssl x509 -in FILE -out FILE.pem -outform PEM`")
    return data


def server_credentials(cert: Path, key: Path, client_ca: Path | None, what: str) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with `client_ca`, clients must present a certificate chaining to it."""
    chain = read_pem(cert, f"{what} certificate")
    private = read_pem(key, f"{what} key")
    roots = read_pem(client_ca, f"{what} client CA") if client_ca is not None else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=roots,
                                       require_client_auth=roots is not None)


def main_port_credentials(cfg: SecurityConfig, resolve: Callable[[str], Path]) -> grpc.ServerCredentials | None:
    """The main port's credentials, or None for plaintext ([security] tls_cert unset)."""
    if not cfg.tls_cert:
        return None
    return server_credentials(resolve(cfg.tls_cert), resolve(cfg.tls_key),
                              resolve(cfg.client_ca) if cfg.client_ca else None, "security.tls")


def is_loopback(target: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 targets (with or without a port, `unix:` sockets too)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme):]
            break
    if target.startswith("["):  # [v6]:port
        host = target[1:].split("]", 1)[0]
    elif target.count(":") == 1:  # host:port
        host = target.split(":", 1)[0]
    else:  # a bare host, or a bare IPv6 address
        host = target
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------- interceptor
def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses with UNAUTHENTICATED without reading the
    request (raw bytes: no deserialisation for an unauthenticated caller)."""
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token, except `open_methods` (health probes) and the
    services in `own_auth` (IndexAdmin checks its own role-based credentials)."""

    def __init__(self, digests: list[bytes], open_methods: Iterable[str],
                 own_auth: Iterable[str] = ("/snaprag.v1.IndexAdmin/",),
                 on_refuse: Callable[[str, str], None] | None = None) -> None:
        if not digests:
            raise ValueError("BearerTokenInterceptor needs at least one token digest")
        self.digests = list(digests)
        self.open_methods = frozenset(open_methods)
        self.own_auth = tuple(own_auth)
        self.on_refuse = on_refuse

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """None if the call may proceed, else the refusal message (it names the fix, never the token)."""
        if method in self.open_methods or method.startswith(self.own_auth):
            return None
        token = bearer_token(metadata)
        if token is None:
            return ("this server requires a bearer token: send `authorization: Bearer <token>` metadata "
                    "(snaprag ask/plan/... --token, or env SNAPRAG_TOKEN)")
        if not token:
            return "authorization metadata must be `Bearer <token>`"
        if not matches(token, self.digests):
            return "the bearer token is not valid for this server"
        return None

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        problem = self.check(details.method, details.invocation_metadata)
        handler = await continuation(details)
        if problem is None or handler is None:  # None: unknown method, gRPC answers UNIMPLEMENTED
            return handler
        if self.on_refuse is not None:
            self.on_refuse(details.method, problem)
        return _refusal(handler, problem)


def interceptors(cfg: SecurityConfig, env: Mapping[str, str] | None = None,
                 base: Path | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The main port's interceptors: the bearer-token check when [security] tokens is set, else none
    (no per-call cost when auth is off)."""
    if not cfg.tokens:
        return []
    digests = [resolve_token(entry, f"security.tokens entry {entry}", env, base)[0] for entry in cfg.tokens]
    return [BearerTokenInterceptor(digests, cfg.open_methods, on_refuse=_count_refusal)]


def _count_refusal(method: str, reason: str) -> None:
    from server.observability.metrics import AUTH_REFUSED

    rpc = method.rsplit("/", 1)[-1]
    AUTH_REFUSED.labels(rpc).inc()
    log.info("refused %s: %s", method, reason)
