"""Minimal inputs the fuzzer found, pinned."""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import pytest

from server.proto import admin_pb, pb
from tests.fuzz.calls import METHODS, invoke
from tests.fuzz.conftest import ADMIN_MD, Harness, server_codes


def test_converse_refused_mid_stream_is_invalid_argument_on_the_server(harness: Harness) -> None:
    """Found by test_converse: the first message is refused (stability 200) while the client still writes the
    rest. The server answers INVALID_ARGUMENT every time; the client sometimes reports INTERNAL "Internal error
    from Core" instead, grpc.aio's client-side bug grpc/grpc#36066 (a write failing after the server's status
    overwrites it). So the fuzz suite checks the server's own status counters, and only excuses that exact
    client-side signature (Outcome.client_write_race) on client-streaming calls."""
    script = [pb.ConverseRequest(transcript=pb.TranscriptPartial(text="how do I reset the thermostat",
                                                                 stability=200)),
              *[pb.ConverseRequest(start=pb.SessionStart())] * 3,
              pb.ConverseRequest(transcript=pb.TranscriptPartial(text="how do I reset the thermostat",
                                                                 stability=0.9, sequence=1))]
    before = server_codes()
    seen: Counter[str] = Counter()

    async def go() -> None:
        for i in range(40):
            out = await invoke(harness.channel("assistant"), METHODS["Converse"], script, yield_between=bool(i % 2))
            if out.client_write_race:
                seen["client_write_race"] += 1
                continue
            assert out.code == grpc.StatusCode.INVALID_ARGUMENT, out
            assert out.details == "transcript.stability: must be in [0, 1], got 200.0"
            seen["INVALID_ARGUMENT"] += 1
    harness.run(go())
    grown = server_codes() - before
    assert grown == Counter(INVALID_ARGUMENT=40), grown
    assert seen["INVALID_ARGUMENT"] > 0


@pytest.mark.parametrize(("server", "name", "request_", "field", "md"), [
    # Found by test_plan: the unknown profile was echoed whole, a 70,057-byte grpc-message trailer.
    ("assistant", "Plan", pb.PlanRequest(robot_id="amr-1", profile="x" * 70_000), "profile: unknown profile", ()),
    ("assistant", "Retrieve", pb.RetrieveRequest(query="q", filters={"k" * 20_000: pb.FilterValues(values=["a"])}),
     "filters: unknown filter field", ()),
    ("assistant", "Retrieve", pb.RetrieveRequest(query="q", filters={"domain": pb.FilterValues(values=["v" * 9000])}),
     "filters[domain]: unknown value", ()),
    ("assistant", "Ask", pb.AskRequest(query="q", profile="p" * 9000), "profile: unknown profile", ()),
    # Found by test_swap: the version was echoed in the NOT_FOUND / INVALID_ARGUMENT message.
    ("admin", "Swap", admin_pb.SwapRequest(version="v" + "0" * 70_000), "version: is 70001 characters", ADMIN_MD),
])
def test_huge_values_are_quoted_not_echoed(harness: Harness, server: str, name: str, request_: Any, field: str,
                                           md: Any) -> None:
    """An error message over the client's metadata limit (8 KiB soft, 16 KiB hard) never arrives: the client
    got RESOURCE_EXHAUSTED "Stream removed (received metadata size exceeds hard limit (value length 70057 vs.
    16384))" (an overload code, so clients retried) instead of INVALID_ARGUMENT naming the field."""
    out = harness.run(invoke(harness.channel(server), METHODS[name], [request_], metadata=md))
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT, out
    assert out.details is not None and out.details.startswith(field), out.details
    assert len(out.details) < 400, out.details
