"""A reflection-based client (what grpcurl does) can list every service and call every RPC, knowing
nothing of our stubs: descriptors come from the server, messages are built dynamically."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def _call_everything(address: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        out["services"] = set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName("snaprag.v1.Assistant")
        out["methods"] = {m.name for m in svc.methods}

        def cls(name: str) -> Any:
            return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

        def method(name: str, stream_in: bool, stream_out: bool) -> Any:
            m = svc.methods_by_name[name]
            path = f"/{svc.full_name}/{name}"
            req, resp = cls(m.input_type.full_name), cls(m.output_type.full_name)
            factory = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                       (True, True): channel.stream_stream}[(stream_in, stream_out)]
            return factory(path, request_serializer=req.SerializeToString, response_deserializer=resp.FromString), req

        plan, PlanReq = method("Plan", False, False)
        out["plan"] = plan(PlanReq(robot_id="amr-007", fault_code="E303"), timeout=5)
        retrieve, RetReq = method("Retrieve", False, False)
        out["retrieve"] = retrieve(RetReq(query="smart plug reset", k=3), timeout=5)
        ask, AskReq = method("Ask", False, True)
        out["ask"] = list(ask(AskReq(query="how do i reset my smart plug"), timeout=5))
        converse, ConvReq = method("Converse", True, True)
        Partial = cls("snaprag.v1.TranscriptPartial")
        out["converse"] = list(converse(iter([ConvReq(transcript=Partial(text="how do i set a timer", is_final=True,
                                                                           sequence=1))]), timeout=5))
    return out


async def test_reflection_lists_and_calls_every_rpc(make_server: Any) -> None:
    running, _ = await make_server()
    out = await asyncio.to_thread(_call_everything, running.address)
    assert {"snaprag.v1.Assistant", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= out["services"]
    assert out["methods"] == {"Converse", "Ask", "Plan", "Retrieve"}
    assert len(out["plan"].steps) >= 1
    assert len(out["retrieve"].passages) == 3
    assert out["ask"][-1].WhichOneof("event") == "final"
    assert out["converse"][-1].WhichOneof("event") == "final"
