"""Connection flags shared by the simulators and the bench: target, deadline, TLS / mTLS, bearer token."""

from __future__ import annotations

import argparse
import os

from clients.assistant import AssistantClient, TlsOptions

DEFAULT_TARGET = "127.0.0.1:50051"
TOKEN_ENV = "SNAPRAG_TOKEN"


def add_connection_args(p: argparse.ArgumentParser, *, target_help: str = "",
                        default_target: str | None = DEFAULT_TARGET) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=default_target,
                   help=target_help or f"server address host:port (default {DEFAULT_TARGET}, what `make run` serves)")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system trust store unless --ca)")
    g.add_argument("--ca", help="PEM file of the CA that signed the server certificate (implies --tls)")
    g.add_argument("--cert", help="PEM client certificate, for mutual TLS (with --key; implies --tls)")
    g.add_argument("--key", help="PEM private key of --cert")
    g.add_argument("--server-name", default="", help="name to verify the server certificate against, when it "
                                                     "differs from the --target host")
    g.add_argument("--token", default=None, help=f"bearer token sent as `authorization: Bearer ...` "
                                                 f"(default: ${TOKEN_ENV} when set)")


def tls_from_args(args: argparse.Namespace) -> TlsOptions | None:
    if not (args.tls or args.ca or args.cert or args.key):
        return None
    if bool(args.cert) != bool(args.key):
        raise ValueError("--cert and --key go together (mutual TLS needs both)")
    return TlsOptions.from_files(ca=args.ca, cert=args.cert, key=args.key, server_name=args.server_name)


def client_from_args(args: argparse.Namespace, *, timeout_s: float, retries: int = 0) -> AssistantClient:
    """A client for --target with the TLS / token flags applied. ValueError names a bad flag."""
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    return AssistantClient(args.target, timeout_s=timeout_s, retries=retries, tls=tls_from_args(args), token=token)
