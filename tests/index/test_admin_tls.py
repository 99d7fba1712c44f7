"""IndexAdmin on its own mTLS port: client certificates map to roles; no certificate, no connection."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.proto import admin_pb, admin_pb_grpc
from tests.certs import issue, pem
from tests.index.conftest import live_config
from tests.index.test_admin_rpc import ap, error_of


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def tls_admin(tmp_path: Path, admin_server: Callable[..., Any]) -> AsyncIterator[Callable[..., Any]]:
    ca = issue("test-ca", None)
    srv_cert, srv_key = pem(*issue("localhost", ca, server=True))
    files = {"ca.pem": pem(*ca)[0], "server.pem": srv_cert, "server.key": srv_key}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    port = _free_port()
    cfg = live_config(tmp_path, admin__port=port, admin__tls_cert=f'"{tmp_path / "server.pem"}"',
                      admin__tls_key=f'"{tmp_path / "server.key"}"', admin__client_ca=f'"{tmp_path / "ca.pem"}"',
                      admin__client_roles='["admin:ops-cli", "read:dashboard"]')
    running, _, live = await admin_server(cfg)
    channels: list[grpc.aio.Channel] = []

    def connect(cn: str | None) -> Any:
        cert = key = None
        if cn is not None:
            cert, key = pem(*issue(cn, ca))
        creds = grpc.ssl_channel_credentials(root_certificates=files["ca.pem"], private_key=key,
                                             certificate_chain=cert)
        ch = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                     options=[("grpc.ssl_target_name_override", "localhost")])
        channels.append(ch)
        return admin_pb_grpc.IndexAdminStub(ch)

    yield connect, running, live
    for ch in channels:
        await ch.close()


async def test_client_certificates_map_to_roles(tls_admin: Any) -> None:
    connect, running, live = tls_admin
    assert running.admin_server is not None and running.admin_port != running.port
    ops = connect("ops-cli")
    upsert = admin_pb.UpsertRequest(passages=[ap(900)])

    async def one() -> AsyncIterator[admin_pb.UpsertRequest]:
        yield upsert

    assert (await ops.Upsert(one())).inserted == 1  # no token: the certificate is the credential
    dash = connect("dashboard")
    assert (await dash.Stats(admin_pb.StatsRequest())).passages == 121
    err = await error_of(dash.Delete(admin_pb.DeleteRequest(ids=["doc-00900"])))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await error_of(connect("mallory").Delete(admin_pb.DeleteRequest(ids=["doc-00900"])))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "'mallory' has no role" in err.details()
    assert len(live.view) == 121


async def test_no_client_certificate_no_connection_and_no_admin_on_the_main_port(tls_admin: Any) -> None:
    connect, running, _live = tls_admin
    err = await error_of(connect(None).Stats(admin_pb.StatsRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        err = await error_of(admin_pb_grpc.IndexAdminStub(ch).Stats(admin_pb.StatsRequest()))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
