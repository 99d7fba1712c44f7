"""clients.assistant: TLS and mutual TLS, the bearer token, retries only where safe, typed results.

The server has no TLS or auth of its own yet, so these tests build an in-process grpc.aio server with the
real Assistant service behind throwaway certificates (made here with `cryptography`) and a token check.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from clients.assistant import AssistantClient, PlanReply, RetrieveReply, TlsOptions, is_loopback
from server.proto import SERVICE_NAME, pb
from server.robot_plan import ActionVocabulary, PlanStep
from server.servicer import AssistantService

TOKEN = "s3cret-token"


# ---------------------------------------------------------------------------------------------- certificates
@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None, *,
          ca: bool = False, names: tuple[str, ...] = (), ips: tuple[str, ...] = (), client: bool = False
          ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer[0].subject if issuer else name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names or ips:
        b = b.add_extension(x509.SubjectAlternativeName([*map(x509.DNSName, names),
                                                         *(x509.IPAddress(ipaddress.ip_address(i)) for i in ips)]),
                            critical=False)
    if not ca:
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer[1] if issuer else key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: bytes
    server: Pem
    client: Pem
    other_ca: bytes
    named_server: Pem  # certificate for "snaprag.test" only, no IP


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_key, other_key = _key(), _key()
    ca = _cert("test CA", ca_key, None, ca=True)
    other = _cert("another CA", other_key, None, ca=True)
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    sk, ck, nk = _key(), _key(), _key()
    server = _cert("snaprag server", sk, (ca, ca_key), names=("localhost",), ips=("127.0.0.1",))
    client = _cert("robot-controller-7", ck, (ca, ca_key), client=True)
    named = _cert("snaprag.test", nk, (ca, ca_key), names=("snaprag.test",))
    return Pki(pem(ca), Pem(pem(server), _pem_key(sk)), Pem(pem(client), _pem_key(ck)), pem(other),
               Pem(pem(named), _pem_key(nk)))


# ---------------------------------------------------------------------------------------------- server
class BearerAuth(grpc.aio.ServerInterceptor):
    """What the later server auth will do: UNAUTHENTICATED unless `authorization: Bearer TOKEN`."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}"
        self.seen: list[str] = []

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        self.seen.append(got)
        if got == self.expected:
            return await continuation(details)

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        # the refusing handler must have the method's shape (Ask streams its answer, Converse both ways)
        method = details.method.rsplit("/", 1)[-1]
        if method == "Ask":
            return grpc.unary_stream_rpc_method_handler(deny)
        if method == "Converse":
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


@pytest.fixture
async def tls_server(runtime: Any, pki: Pki) -> AsyncIterator[Callable[..., Any]]:
    servers: list[grpc.aio.Server] = []

    async def start(*, require_client_cert: bool = True, cert: Pem | None = None) -> tuple[str, BearerAuth]:
        auth = BearerAuth(TOKEN)
        server = grpc.aio.server(interceptors=[auth])
        svc = AssistantService(runtime)
        svc.ready = True
        server.add_generic_rpc_handlers((svc.handlers(),))
        cert = cert or pki.server
        creds = grpc.ssl_server_credentials([(cert.key, cert.cert)], root_certificates=pki.ca,
                                            require_client_auth=require_client_cert)
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", auth

    yield start
    for s in servers:
        await s.stop(0)


def mtls(pki: Pki, **kw: Any) -> TlsOptions:
    return TlsOptions(root_certs=pki.ca, client_cert=pki.client.cert, client_key=pki.client.key, **kw)


# ---------------------------------------------------------------------------------------------- TLS + token
async def test_mutual_tls_with_bearer_token_gets_typed_plan(tls_server: Any, pki: Pki) -> None:
    address, auth = await tls_server()
    async with AssistantClient(address, tls=mtls(pki), token=TOKEN, retries=0) as c:
        reply = await c.plan_reply("fl-004", fault_code="E202", carrying_load=True, state="pallet leaning")
        answer = await c.ask("how do i reset my smart plug")
        found = await c.retrieve_reply("battery overtemperature", k=3)
    # (FALLBACK when a busy machine made retrieval miss its budget: still a typed, valid, safe plan)
    assert isinstance(reply, PlanReply) and reply.mode in ("FULL", "DEGRADED", "FALLBACK")
    assert reply.source in ("RETRIEVED", "RULES")
    assert all(isinstance(s, PlanStep) for s in reply.steps)
    assert reply.steps[0].action in ("stop", "emergency_stop") and reply.steps[1].action == "hold_load"
    assert not ActionVocabulary.load().validate(reply.steps)
    assert reply.latency_ms > 0 and reply.timings
    assert {t.outcome for t in reply.timings} <= {"OK", "SKIPPED", "MISSED_BUDGET", "FAILED"}
    assert answer.mode == "FULL" and answer.chunks and answer.first_chunk_ms is not None
    assert isinstance(found, RetrieveReply) and [p.rank for p in found.passages] == [1, 2, 3]
    assert set(auth.seen) == {f"Bearer {TOKEN}"}


async def test_missing_or_wrong_token_is_unauthenticated(tls_server: Any, pki: Pki) -> None:
    address, _ = await tls_server()
    for token in (None, "wrong"):
        async with AssistantClient(address, tls=mtls(pki), token=token, retries=0) as c:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.plan("amr-001", fault_code="E302")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.ask("how do i reset my smart plug")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_server_requiring_a_client_certificate_refuses_one_without(tls_server: Any, pki: Pki) -> None:
    address, auth = await tls_server(require_client_cert=True)
    async with AssistantClient(address, tls=TlsOptions(root_certs=pki.ca), token=TOKEN, retries=0) as c:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.plan("amr-001", timeout_s=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert auth.seen == [], "the handshake failed before any call reached the service"


async def test_server_certificate_from_another_ca_is_refused(tls_server: Any, pki: Pki) -> None:
    address, auth = await tls_server(require_client_cert=False)
    async with AssistantClient(address, tls=TlsOptions(root_certs=pki.other_ca), token=TOKEN, retries=0) as c:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.plan("amr-001", timeout_s=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and auth.seen == []


async def test_server_name_override_checks_the_certificate_name(tls_server: Any, pki: Pki) -> None:
    address, _ = await tls_server(require_client_cert=False, cert=pki.named_server)
    async with AssistantClient(address, tls=TlsOptions(root_certs=pki.ca, server_name="snaprag.test"),
                               token=TOKEN, retries=0) as c:
        assert (await c.plan("amr-001", fault_code="E302")).steps
    async with AssistantClient(address, tls=TlsOptions(root_certs=pki.ca), token=TOKEN, retries=0) as c:
        with pytest.raises(grpc.aio.AioRpcError):  # 127.0.0.1 is not a name on that certificate
            await c.plan("amr-001", timeout_s=3)


def test_options_that_cannot_work_are_refused_with_the_fix(pki: Pki, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"plaintext to 10\.1\.2\.3:50051: pass tls="):
        AssistantClient("10.1.2.3:50051", token=TOKEN)
    with pytest.raises(ValueError, match="both client_cert and client_key"):
        TlsOptions(root_certs=pki.ca, client_cert=pki.client.cert)
    with pytest.raises(ValueError, match="cannot read the CA certificate file"):
        TlsOptions.from_files(ca=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="token is empty"):
        AssistantClient("127.0.0.1:1", token="  ")
    (tmp_path / "ca.pem").write_bytes(pki.ca)
    assert TlsOptions.from_files(ca=tmp_path / "ca.pem").root_certs == pki.ca


@pytest.mark.parametrize(("target", "loopback"), [
    ("127.0.0.1:50051", True), ("localhost:50051", True), ("[::1]:50051", True), ("::1", True),
    ("ipv4:127.0.0.2:80", True), ("dns:///localhost:50051", True), ("unix:/tmp/s.sock", True),
    ("10.0.0.5:50051", False), ("rag.example.com:443", False), ("[2001:db8::1]:443", False)])
def test_is_loopback(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


# ---------------------------------------------------------------------------------------------- retries
class Flaky:
    """A bare server whose Plan fails UNAVAILABLE `fail_first` times, and whose Ask fails UNAVAILABLE
    either before any event or after the first chunk."""

    def __init__(self, *, fail_first: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 ask_fails_after_chunk: bool = False) -> None:
        self.fail_first, self.code, self.ask_fails_after_chunk = fail_first, code, ask_fails_after_chunk
        self.plan_calls = self.ask_calls = 0

    def handler(self) -> grpc.GenericRpcHandler:
        async def plan(request: pb.PlanRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
            self.plan_calls += 1
            if self.plan_calls <= self.fail_first:
                await context.abort(self.code, "restarting")
            return pb.PlanResponse(steps=[pb.PlanStep(action="stop")], mode=pb.FULL, source=pb.RULES)

        async def ask(request: pb.AskRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AnswerEvent]:
            self.ask_calls += 1
            if self.ask_fails_after_chunk:
                yield pb.AnswerEvent(chunk=pb.AnswerChunk(text="First sentence."))
                await context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-answer")
            if self.ask_calls <= self.fail_first:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            yield pb.AnswerEvent(chunk=pb.AnswerChunk(text="Hello."))
            yield pb.AnswerEvent(final=pb.AnswerFinal(mode=pb.FULL))

        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Plan": grpc.unary_unary_rpc_method_handler(plan, request_deserializer=pb.PlanRequest.FromString,
                                                        response_serializer=pb.PlanResponse.SerializeToString),
            "Ask": grpc.unary_stream_rpc_method_handler(ask, request_deserializer=pb.AskRequest.FromString,
                                                        response_serializer=pb.AnswerEvent.SerializeToString)})


@pytest.fixture
async def flaky_server() -> AsyncIterator[Callable[..., Any]]:
    servers: list[grpc.aio.Server] = []

    async def start(flaky: Flaky) -> str:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((flaky.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        await s.stop(0)


async def test_unary_call_is_retried_after_unavailable(flaky_server: Any) -> None:
    flaky = Flaky(fail_first=2)
    async with AssistantClient(await flaky_server(flaky), retries=2) as c:
        assert [s.action for s in (await c.plan_reply("amr-001")).steps] == ["stop"]
    assert flaky.plan_calls == 3


async def test_other_errors_are_not_retried(flaky_server: Any) -> None:
    flaky = Flaky(fail_first=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    async with AssistantClient(await flaky_server(flaky), retries=3) as c:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.plan("amr-001")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and flaky.plan_calls == 1


async def test_retries_stop_at_the_call_deadline(flaky_server: Any) -> None:
    flaky = Flaky(fail_first=10_000)
    async with AssistantClient(await flaky_server(flaky), retries=10_000) as c:
        with pytest.raises(grpc.aio.AioRpcError):
            await c.plan("amr-001", timeout_s=0.3)
    # exponential backoff inside one 0.3 s deadline: a handful of attempts, never the 10 000 allowed
    assert 1 <= flaky.plan_calls < 20


async def test_streamed_answer_is_retried_only_before_its_first_event(flaky_server: Any) -> None:
    before = Flaky(fail_first=1)
    async with AssistantClient(await flaky_server(before), retries=2) as c:
        answer = await c.ask("hello")
    assert answer.text == "Hello." and before.ask_calls == 2

    after = Flaky(ask_fails_after_chunk=True)
    async with AssistantClient(await flaky_server(after), retries=5) as c:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.ask("hello")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert after.ask_calls == 1, "part of the answer was already spoken: never asked again"
