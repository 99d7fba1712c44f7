"""The physical limit: a bare grpc.aio server answering snaprag's RPCs with canned bytes.

    python -m bench.echo --port 0 [--responses FILE]      prints "echo serving on ADDRESS"

Same service and method paths as snaprag (so the same client code drives it), the same response sizes
(the canned responses are real snaprag responses captured at the start of a bench run), and no work at
all: the request bytes are not even parsed, the response bytes are sent as they are. What a call costs
here is what gRPC, HTTP/2, the event loop and the loopback cost on this machine; anything snaprag adds
on top is our overhead.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from clients.assistant import AssistantClient
from server.proto import SERVICE_NAME, pb

Canned = dict[str, list[bytes]]


def synthetic_canned() -> Canned:
    """Responses of typical size, for when no snaprag server was there to capture from."""
    steps = [pb.PlanStep(action=a) for a in ("stop", "hold_load", "engage_brake", "request_assistance")]
    steps[3].params["reason"].text = "E202 pallet shifted on forklift fl-004 at aisle A12: keep people clear"
    plan = pb.PlanResponse(steps=steps, source=pb.RETRIEVED, mode=pb.FULL, total_ms=5.0, request_id="0" * 16,
                           reason="retrieved procedure for E202: Heron FL-20 — Fault Recovery Manual",
                           citations=[pb.Citation(marker=1, passage_id="wh-f-e202-fl20", source="Heron FL-20",
                                                  snippet="x" * 160)],
                           timings=[pb.StageTiming(stage=s, elapsed_ms=1.0, budget_ms=60.0, outcome=pb.OK)
                                    for s in ("retrieve", "rerank", "plan")])
    passage = pb.Passage(id="home-a-plug-reset-01", text="y" * 600, intent="troubleshooting", domain="smart_home",
                         locale="en-US", source="Lumo Smart Plug Mini — User Guide", confidence=0.9)
    retrieve = pb.RetrieveResponse(passages=[pb.ScoredPassage(passage=passage, score=1.0, rank=r) for r in range(1, 6)],
                                   timings=[pb.StageTiming(stage="retrieve", elapsed_ms=4.0, budget_ms=120.0,
                                                           outcome=pb.OK)], total_ms=4.0, request_id="0" * 16)
    ask = [pb.AnswerEvent(chunk=pb.AnswerChunk(text="z" * 110, index=i)) for i in range(3)]
    ask.append(pb.AnswerEvent(final=pb.AnswerFinal(mode=pb.FULL, answer_text="z" * 330, generator="extractive")))
    return {"Plan": [plan.SerializeToString()], "Retrieve": [retrieve.SerializeToString()],
            "Ask": [e.SerializeToString() for e in ask]}


async def capture_canned(client: AssistantClient, *, plan_kwargs: dict[str, Any], question: str) -> Canned:
    """One real response of each RPC from a snaprag server, as the bytes the echo server will send."""
    robot = plan_kwargs.pop("robot_id", "fl-004")
    plan = await client.plan(robot, **plan_kwargs)
    retrieve = await client.retrieve(question, k=5)
    events = [ev.SerializeToString() async for ev in client.ask_stream(question)]
    return {"Plan": [plan.SerializeToString()], "Retrieve": [retrieve.SerializeToString()], "Ask": events}


def save_canned(canned: Canned, path: Path) -> None:
    path.write_text(json.dumps({k: [base64.b64encode(b).decode("ascii") for b in v] for k, v in canned.items()}),
                    encoding="utf-8")


def load_canned(path: Path) -> Canned:
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {k: [base64.b64decode(s) for s in v] for k, v in raw.items()}


def echo_handler(canned: Canned) -> grpc.GenericRpcHandler:
    plan, retrieve, ask = canned["Plan"][0], canned["Retrieve"][0], canned["Ask"]

    # No deserializer and no serializer: grpc hands over and takes raw bytes, so nothing is parsed.
    async def plan_fn(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return plan

    async def retrieve_fn(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return retrieve

    async def ask_fn(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for ev in ask:
            yield ev

    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Plan": grpc.unary_unary_rpc_method_handler(plan_fn),
        "Retrieve": grpc.unary_unary_rpc_method_handler(retrieve_fn),
        "Ask": grpc.unary_stream_rpc_method_handler(ask_fn),
    })


async def start_echo(canned: Canned, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((echo_handler(canned),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}; pick another --port")
    await server.start()
    return server, f"{host}:{bound}"


async def _serve(args: argparse.Namespace) -> None:
    canned = load_canned(args.responses) if args.responses else synthetic_canned()
    server, address = await start_echo(canned, args.host, args.port)
    print(f"echo serving on {address}", flush=True)
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    ap.add_argument("--port", type=int, default=0, help="port, 0 = any free one (default)")
    ap.add_argument("--responses", type=Path, help="canned responses captured by `snaprag bench` (JSON)")
    args = ap.parse_args(argv)
    import uvloop

    try:
        uvloop.run(_serve(args))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError, KeyError) as e:
        print(f"bench.echo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
