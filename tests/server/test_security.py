"""[security] on the main port: TLS, mutual TLS and bearer tokens, with certificates made by the tests.

Every call goes over a real loopback socket to a real in-process server; the refused ones must be refused
before any work, with a status and message a caller can act on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clients.assistant import AssistantClient, TlsOptions, transcript
from server.app import start_server
from server.config import Config, ConfigError, load_config
from server.observability import metrics
from server.proto import pb, pb_grpc
from server.security import BearerTokenInterceptor, resolve_token, token_digest
from tests.certs import Pki, issue, pem
from tests.server.conftest import rpc_error

TOKEN = "query-token-0123456789abcdef"


def _secured(config: Config, tmp_path: Path, *, tls: bool = True, mtls: bool = False,
             token: bool = False) -> tuple[Config, Pki]:
    pki = Pki.create(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    sec = dataclasses.replace(
        config.security,
        tls_cert=str(tmp_path / "server.pem") if tls else "", tls_key=str(tmp_path / "server.key") if tls else "",
        client_ca=str(tmp_path / "ca.pem") if mtls else "",
        tokens=[f"file:{tmp_path / 'token'}"] if token else [])
    return dataclasses.replace(config, security=sec).validate(), pki


@pytest.fixture
async def serve(runtime: Any) -> AsyncIterator[Callable[..., Any]]:
    running_list: list[Any] = []
    clients: list[AssistantClient] = []

    async def start(cfg: Config) -> Any:
        running = await start_server(cfg, runtime=dataclasses.replace(runtime, cfg=cfg))
        running_list.append(running)
        return running

    def client(running: Any, **kw: Any) -> AssistantClient:
        c = AssistantClient(f"127.0.0.1:{running.port}", timeout_s=5.0, retries=0, **kw)
        clients.append(c)
        return c

    start.client = client  # type: ignore[attr-defined]
    yield start
    for c in clients:
        await c.close()
    for r in running_list:
        await r.stop(0)


async def test_tls_serves_verified_clients_and_refuses_plaintext(serve: Any, config: Config, tmp_path: Path) -> None:
    cfg, pki = _secured(config, tmp_path, tls=True)
    running = await serve(cfg)
    good = serve.client(running, tls=TlsOptions(root_certs=pki.ca_pem))
    reply = await good.plan_reply("fl-004", fault_code="E202", carrying_load=True)
    assert reply.steps
    answer = await good.ask("how do i reset my smart plug")
    assert "plug" in answer.text.lower()

    err = await rpc_error(serve.client(running).plan("fl-004", fault_code="E202"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # a plaintext client cannot even connect

    other_ca = pem(*issue("someone-else", None))[0]
    err = await rpc_error(serve.client(running, tls=TlsOptions(root_certs=other_ca)).plan("fl-004", fault_code="E202"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # the server's certificate does not verify


async def test_mtls_needs_a_client_certificate_from_the_configured_ca(serve: Any, config: Config,
                                                                      tmp_path: Path) -> None:
    cfg, pki = _secured(config, tmp_path, mtls=True)
    running = await serve(cfg)
    ca = pki.ca_pem
    stranger = Pki(tmp_path, issue("another-ca", None))

    # No client certificate: the handshake fails, no call reaches the server.
    err = await rpc_error(serve.client(running, tls=TlsOptions(root_certs=ca)).plan("fl-004", fault_code="E202"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # A client certificate from another CA: refused too.
    cert, key = stranger.client("robot-fleet")
    err = await rpc_error(serve.client(running, tls=TlsOptions(root_certs=ca, client_cert=cert, client_key=key))
                          .plan("fl-004", fault_code="E202"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    cert, key = pki.client("robot-fleet")
    ok = serve.client(running, tls=TlsOptions(root_certs=ca, client_cert=cert, client_key=key))
    assert (await ok.plan_reply("fl-004", fault_code="E202")).steps


async def test_bearer_token_required_on_every_rpc_but_health(serve: Any, config: Config, tmp_path: Path) -> None:
    running = await serve(_secured(config, tmp_path, tls=False, token=True)[0])
    before = metrics.AUTH_REFUSED.labels("Plan")._value.get()
    anon = serve.client(running)
    for call in (anon.plan("fl-004", fault_code="E202"), anon.retrieve("smart plug"),
                 anon.ask("how do i reset my smart plug")):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <token>" in err.details()

    async def one() -> AsyncIterator[Any]:
        yield transcript("how do i reset my smart plug", is_final=True, sequence=1)

    err = await rpc_error(anon.converse(one()))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert metrics.AUTH_REFUSED.labels("Plan")._value.get() == before + 1

    wrong = serve.client(running, token="not-the-token-at-all-0000")
    err = await rpc_error(wrong.plan("fl-004", fault_code="E202"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "not valid" in err.details()
    assert TOKEN not in err.details()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        malformed = await rpc_error(pb_grpc.AssistantStub(ch).Plan(
            pb.PlanRequest(robot_id="fl-004"), metadata=(("authorization", "Basic dXNlcjpwYXNz"),)))
        assert malformed.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in malformed.details()
        # Health probes need no token (open_methods); reflection does.
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        async def ask_services() -> AsyncIterator[Any]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        err = await rpc_error(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(ask_services()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED

    good = serve.client(running, token=TOKEN)
    assert (await good.plan_reply("fl-004", fault_code="E202")).steps
    assert (await good.retrieve_reply("smart plug")).passages
    assert "plug" in (await good.ask("how do i reset my smart plug")).text.lower()
    events = [ev async for ev in good.converse(one())]
    assert any(ev.HasField("final") for ev in events)


async def test_tls_mtls_and_token_together(serve: Any, config: Config, tmp_path: Path) -> None:
    cfg, pki = _secured(config, tmp_path, mtls=True, token=True)
    running = await serve(cfg)
    cert, key = pki.client("voice-frontend")
    tls = TlsOptions(root_certs=pki.ca_pem, client_cert=cert, client_key=key)
    err = await rpc_error(serve.client(running, tls=tls).plan("fl-004", fault_code="E202"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # the certificate is transport; the token is still needed
    assert (await serve.client(running, tls=tls, token=TOKEN).plan_reply("fl-004", fault_code="E202")).steps


def test_interceptor_checks_without_a_server() -> None:
    icpt = BearerTokenInterceptor([token_digest(TOKEN)], ["/grpc.health.v1.Health/Check"])
    assert icpt.check("/snaprag.v1.Assistant/Plan", [("authorization", f"Bearer {TOKEN}")]) is None
    assert icpt.check("/snaprag.v1.Assistant/Plan", [("authorization", f"bearer  {TOKEN} ")]) is None
    assert icpt.check("/grpc.health.v1.Health/Check", []) is None
    assert icpt.check("/snaprag.v1.IndexAdmin/Stats", []) is None  # IndexAdmin checks its own credentials
    assert "requires a bearer token" in (icpt.check("/snaprag.v1.Assistant/Plan", []) or "")
    assert "not valid" in (icpt.check("/snaprag.v1.Assistant/Plan", [("authorization", "Bearer x" * 3)]) or "")


def test_config_refuses_half_set_tls_and_literal_tokens(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"security\.tls_cert, security\.tls_key: set both"):
        load_config(overrides=['security.tls_cert="a.pem"'], env={})
    with pytest.raises(ConfigError, match=r"security\.client_ca: mutual TLS needs TLS"):
        load_config(overrides=['security.client_ca="ca.pem"'], env={})
    with pytest.raises(ConfigError, match="never the token itself"):
        load_config(overrides=[f'security.tokens=["{TOKEN}"]'], env={})
    with pytest.raises(ConfigError, match="SNAPRAG_QUERY_TOKEN is not set"):
        resolve_token("env:SNAPRAG_QUERY_TOKEN", "security.tokens entry", env={})
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_token("env:T", "security.tokens entry", env={"T": "short"})
    digest, origin = resolve_token("env:T", "x", env={"T": TOKEN})
    assert digest == token_digest(TOKEN) and TOKEN not in origin


async def test_missing_certificate_file_stops_startup_naming_it(config: Config, runtime: Any, tmp_path: Path) -> None:
    cfg, _ = _secured(config, tmp_path)
    (tmp_path / "server.key").unlink()
    with pytest.raises(OSError, match=r"security.tls key: cannot read .*server.key"):
        await start_server(cfg, runtime=dataclasses.replace(runtime, cfg=cfg))
    (tmp_path / "server.key").write_text("not a key")
    with pytest.raises(OSError, match="is not PEM"):
        await start_server(cfg, runtime=dataclasses.replace(runtime, cfg=cfg))
