"""Server lifecycle: load and warm everything, then serve; drain on SIGTERM/SIGINT.

Health (grpc.health.v1) reports NOT_SERVING until the knowledge bases, indexes and fallback rules are
loaded and one request of each kind has run end to end (warm-up), and again while draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server import security
from server.config import REPO_ROOT, Config
from server.fallback import RobotSituation
from server.observability import tracing
from server.observability.logs import configure_logging
from server.observability.metrics import MetricsServer, set_index_version, set_start_delay
from server.pipeline.answer import AnswerRequest
from server.proto import ADMIN_SERVICE_NAME, SERVICE_NAME
from server.runtime import Runtime, build_runtime
from server.servicer import AssistantService

log = logging.getLogger("snaprag")


@dataclass
class RunningServer:
    server: grpc.aio.Server
    service: AssistantService
    health: health.aio.HealthServicer
    address: str
    port: int
    owns_runtime: bool = True
    admin: Any = None
    """server.index.admin.IndexAdminService when [admin] enabled."""
    admin_server: grpc.aio.Server | None = None
    """The separate admin listener when admin.port is set (else IndexAdmin shares `server`)."""
    admin_port: int = 0
    """The port IndexAdmin answers on (the main port unless admin.port is set)."""
    metrics: MetricsServer | None = None
    """The Prometheus /metrics listener when [observability] metrics is on (its port: metrics.port)."""

    async def stop(self, grace_s: float) -> None:
        """Drain, then stop: health NOT_SERVING and new calls refused (UNAVAILABLE) at once; calls in flight
        get `grace_s` to finish, then are cancelled (their cleanup runs); then models and pools close. The
        port stays open, refusing, until the admitted calls are done and `server.shutdown_refuse_s` passed."""
        await self.health.enter_graceful_shutdown()
        self.service.draining = True
        t_end = time.monotonic() + grace_s
        # Keep the port open while admitted calls finish (and for at least `shutdown_refuse_s`): a call that
        # arrives now is refused by our handler with UNAVAILABLE, which clients retry elsewhere. Once the gRPC
        # server itself stops, a call that has reached it but no handler yet is dropped as CANCELLED, which a
        # client cannot tell from its own cancellation.
        hold_until = time.monotonic() + min(grace_s, self.service.rt.cfg.server.shutdown_refuse_s)
        while time.monotonic() < t_end and (self.service.admission.in_flight > 0 or time.monotonic() < hold_until):
            await asyncio.sleep(0.01)
        await self.service.loop_lag.stop()
        left = max(0.0, t_end - time.monotonic())
        if self.admin_server is not None:
            await self.admin_server.stop(left)
        await self.server.stop(left)
        if self.metrics is not None:
            self.metrics.close()
        if self.owns_runtime:
            await self.service.rt.close_backends()
            self.service.rt.close()


async def warm_up(svc: AssistantService) -> float:
    """One request of each kind through the real pipelines, so the first caller pays no cold start."""
    t0 = time.perf_counter()
    voice = svc.rt.cfg.profiles["voice"]
    async for _ in svc.answers.run(AnswerRequest(query="how do i reset my smart plug", profile=voice)):
        pass
    await svc.plans.run(RobotSituation(robot_id="amr-001", fault_code="E302", state="obstacle ahead"),
                        svc.rt.cfg.profiles["robot"], None)
    return time.perf_counter() - t0


async def start_server(cfg: Config, runtime: Runtime | None = None) -> RunningServer:
    """Build (unless given), bind, warm up, then flip health to SERVING. Used by `serve` and the tests."""
    opts = [("grpc.max_receive_message_length", cfg.server.max_message_bytes),
            ("grpc.max_send_message_length", cfg.server.max_message_bytes),
            ("grpc.max_concurrent_streams", cfg.server.max_concurrent_streams),
            ("grpc.so_reuseport", 0)]
    tracing.configure(cfg.observability.tracing)  # a missing OpenTelemetry stops startup here, not later
    # Certificates and tokens first: a missing file stops startup before minutes of index loading.
    creds = security.main_port_credentials(cfg.security, cfg.resolve_path)
    interceptors = security.interceptors(cfg.security, base=REPO_ROOT)
    if cfg.security.tokens and creds is None and not security.is_loopback(cfg.server.host):
        log.warning("security.tokens is set but the main port is plaintext on %s: tokens cross the network in "
                    "clear; set security.tls_cert/tls_key unless a sidecar terminates TLS", cfg.server.host)
    auth = None
    if cfg.admin.enabled:
        # Credentials first: a missing token file stops startup before minutes of index loading.
        from server.index.auth import Authenticator

        auth = Authenticator.from_config(cfg.admin, base=REPO_ROOT)
    server = grpc.aio.server(options=opts, interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    bind = f"{cfg.server.host}:{cfg.server.port}"
    port = server.add_secure_port(bind, creds) if creds is not None else server.add_insecure_port(bind)
    if port == 0:
        raise OSError(f"could not bind {cfg.server.host}:{cfg.server.port} (in use?); pick another with --port")
    rt = runtime if runtime is not None else await asyncio.get_running_loop().run_in_executor(None, build_runtime, cfg)
    service = AssistantService(rt)
    server.add_generic_rpc_handlers((service.handlers(),))
    admin, admin_server, admin_port = None, None, port
    if auth is not None:
        if rt.index is None:
            raise ValueError("admin.enabled, but the runtime has no live index (build it with build_runtime(cfg))")
        from server.index.admin import IndexAdminService

        admin = IndexAdminService(rt.index, auth, cfg)
        if cfg.admin.port:
            admin_server, admin_port = _admin_listener(cfg, opts, admin)
        else:
            server.add_generic_rpc_handlers((admin.handlers(),))
    if cfg.server.reflection:
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names + ((ADMIN_SERVICE_NAME,) if admin and not admin_server else ()),
                                            server)
    obs = cfg.observability
    metrics_server = MetricsServer(obs.metrics_host, obs.metrics_port) if obs.metrics else None
    set_index_version(_index_version(rt))
    await rt.start_backends()
    await server.start()
    if admin_server is not None:
        await admin_server.start()
    service.ready = True
    warm_s = await warm_up(service)
    service.loop_lag.start()
    set_start_delay(service.admission.load.expected_delay_s if service.admission.load else None)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = cfg.server.host if ":" not in cfg.server.host else f"[{cfg.server.host}]"
    log.info("warm-up done in %.0f ms", warm_s * 1000)
    return RunningServer(server, service, health_servicer, f"{host}:{port}", port, owns_runtime=runtime is None,
                         admin=admin, admin_server=admin_server, admin_port=admin_port, metrics=metrics_server)


def _index_version(rt: Runtime) -> Any:
    """Reads the live index's snapshot version at each scrape; None (the gauge stays 1) for a static index."""
    if rt.index is None:
        return None
    from server.index.store import version_number

    index = rt.index
    return lambda: version_number(index.view.version)


def _admin_listener(cfg: Config, opts: list[tuple[str, Any]], admin: Any) -> tuple[grpc.aio.Server, int]:
    """IndexAdmin alone on admin.port: with mTLS (client certificates required and verified against
    admin.client_ca) when admin.tls_cert is set, else plaintext with bearer tokens."""
    a = cfg.admin
    srv = grpc.aio.server(options=opts)
    srv.add_generic_rpc_handlers((admin.handlers(),))
    address = f"{cfg.server.host}:{a.port}"
    if a.tls_cert:
        creds = security.server_credentials(cfg.resolve_path(a.tls_cert), cfg.resolve_path(a.tls_key),
                                            cfg.resolve_path(a.client_ca), "admin TLS")
        port = srv.add_secure_port(address, creds)
    else:
        port = srv.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind the admin port {address} (in use?); change admin.port")
    if cfg.server.reflection:
        reflection.enable_server_reflection((ADMIN_SERVICE_NAME, reflection.SERVICE_NAME), srv)
    return srv, port


async def serve(cfg: Config) -> None:
    running = await start_server(cfg)
    sec = cfg.security
    how = (" over mTLS" if sec.client_ca else " over TLS") if sec.tls_cert else ""
    how += ", bearer token required" if sec.tokens else ""
    print(f"snaprag serving on {running.address}{how}  ({len(running.service.rt.kb)} passages, health SERVING)",
          flush=True)
    print(f"  try:  .venv/bin/snaprag ask --target {running.address} \"how do i reset my smart plug\"", flush=True)
    print(f"        .venv/bin/snaprag plan --target {running.address} --robot fl-004 --fault E202 --loaded",
          flush=True)
    if running.metrics is not None:
        print(f"  metrics: http://{cfg.observability.metrics_host}:{running.metrics.port}/metrics", flush=True)
    if running.admin is not None:
        host = running.address.rsplit(":", 1)[0]
        tls = " (mTLS)" if cfg.admin.tls_cert else ""
        print(f"  IndexAdmin on {host}:{running.admin_port}{tls}, live index {running.service.rt.index.view.version} "
              f"in {cfg.resolve_path(cfg.index.root)}: .venv/bin/snaprag index stats --target {host}:"
              f"{running.admin_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"snaprag: draining (health NOT_SERVING, new calls refused, in-flight calls get up to "
          f"{cfg.server.shutdown_grace_s:g} s)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    await running.stop(cfg.server.shutdown_grace_s)
    print(f"snaprag: stopped after draining for {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def run_forever(cfg: Config) -> None:
    import uvloop

    # Text or JSON lines, each with the request id; emails, phone and card numbers redacted (always).
    configure_logging(cfg.server.log_level, cfg.observability.log_format, sys.stderr)
    sys.setswitchinterval(cfg.server.gil_switch_interval_ms / 1000)
    # httpx logs every request to vLLM at INFO: one line per generated answer drowns the server's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvloop.run(serve(cfg))
