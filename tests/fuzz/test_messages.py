"""Message-level fuzzing of every RPC: Hypothesis builds requests from the descriptors (tests/fuzz/strategies.py)
and sends them over a real channel to a real server; whatever it sends, the answer is OK or a deliberate
status with a message, never UNKNOWN or INTERNAL. Runs derandomized (the same cases in every CI run);
SNAPRAG_FUZZ_CASES scales the case counts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.proto import admin_pb, pb
from tests.fuzz.calls import METHODS, invoke, invoke_good
from tests.fuzz.conftest import ADMIN_MD, NO_MD, READ_MD, Harness, check_status, fuzz_cases, task_kinds
from tests.fuzz.strategies import HINTS, messages

WRONG_MD = (("authorization", "Bearer not-the-token-0123456789"),)
ANY_MD = st.sampled_from([ADMIN_MD, ADMIN_MD, READ_MD, NO_MD, WRONG_MD, (("authorization", "Bearer"),)])
SERVERS = st.sampled_from(["assistant", "admin"])


def fuzz(n: int) -> Any:
    return settings(max_examples=fuzz_cases(n), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


@pytest.fixture(scope="module", autouse=True)
def no_task_outlives_the_module(harness: Harness) -> Iterator[None]:
    before = harness.settle()
    yield
    after = harness.settle(before)
    seen = ", ".join(f"{r} {c}: {n}" for (r, c), n in sorted(SEEN.items()))
    print(f"\nmessage fuzz: {sum(SEEN.values())} calls; {seen}")
    assert not task_kinds(after) - task_kinds(before), f"tasks outlived the fuzz cases: {task_kinds(after)}"


SEEN: Counter[tuple[str, str]] = Counter()


def call(h: Harness, server: str, name: str, requests: list[Any], **kw: Any) -> None:
    out = h.run(invoke(h.channel(server), METHODS[name], requests, **kw))
    SEEN[(name, "client_write_race" if out.client_write_race else out.code.name)] += 1
    check_status(out, f"{name} on {server}: {requests!r:.400}", client_streaming=METHODS[name].client_streaming)


# ---------------------------------------------------------------------------- Assistant
@fuzz(150)
@given(req=messages(pb.RetrieveRequest), server=SERVERS)
def test_retrieve(harness: Harness, req: pb.RetrieveRequest, server: str) -> None:
    call(harness, server, "Retrieve", [req])


@fuzz(150)
@given(req=messages(pb.PlanRequest), server=SERVERS)
def test_plan(harness: Harness, req: pb.PlanRequest, server: str) -> None:
    call(harness, server, "Plan", [req])


@fuzz(120)
@given(req=messages(pb.AskRequest), server=SERVERS, cancel_after=st.sampled_from([None, None, None, 1, 2]))
def test_ask(harness: Harness, req: pb.AskRequest, server: str, cancel_after: int | None) -> None:
    call(harness, server, "Ask", [req], cancel_after=cancel_after)


def _transcripts(draw: Any, n: int, seq: int) -> list[pb.ConverseRequest]:
    out = []
    for i in range(n):
        final = i == n - 1 or draw(st.booleans())
        seq = min(seq + draw(st.sampled_from([1, 1, 2, 7])), 2**32 - 1)
        text = draw(st.one_of(st.sampled_from(HINTS["query"] + ["how do I", "reset the", "x"]), st.text(max_size=40)))
        out.append(pb.ConverseRequest(transcript=pb.TranscriptPartial(
            text=text, is_final=final, stability=draw(st.sampled_from([0.9, 0.5, 1.0, 0.0, 0.85])), sequence=seq)))
    return out


@st.composite
def converse_scripts(draw: Any) -> list[pb.ConverseRequest]:
    """A plausible conversation (a start, partials and finals with increasing sequence numbers, ending on a
    final) broken in 0-3 ways: a ConverseRequest straight from the descriptor inserted anywhere, two messages
    swapped, one dropped, or a transcript field replaced by a fuzzed value."""
    out: list[pb.ConverseRequest] = []
    if draw(st.booleans()):
        start = draw(st.one_of(st.builds(pb.SessionStart, profile=st.sampled_from(["", "voice", "robot"]),
                                         session_id=st.text(max_size=10)), messages(pb.SessionStart)))
        out.append(pb.ConverseRequest(start=start))
    out += _transcripts(draw, draw(st.integers(0, 6)), draw(st.integers(0, 3)))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["insert", "swap", "drop", "field"]))
        if how == "insert":
            out.insert(draw(st.integers(0, len(out))), draw(messages(pb.ConverseRequest)))
        elif how == "swap" and len(out) > 1:
            i, j = draw(st.integers(0, len(out) - 1)), draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        elif how == "drop" and out:
            del out[draw(st.integers(0, len(out) - 1))]
        elif how == "field" and out and out[-1].HasField("transcript"):
            fuzzed = draw(messages(pb.TranscriptPartial))
            name = draw(st.sampled_from(["text", "is_final", "stability", "sequence"]))
            setattr(out[-1].transcript, name, getattr(fuzzed, name))
    return out


@fuzz(200)
@given(script=converse_scripts(), server=SERVERS, cancel_after=st.sampled_from([None, None, None, 1, 3]),
       interleave=st.booleans())
def test_converse(harness: Harness, script: list[pb.ConverseRequest], server: str, cancel_after: int | None,
                  interleave: bool) -> None:
    call(harness, server, "Converse", script, cancel_after=cancel_after, yield_between=interleave)


# ---------------------------------------------------------------------------- IndexAdmin
@st.composite
def plausible_upserts(draw: Any) -> admin_pb.UpsertRequest:
    """Mostly valid passages (so the write path runs), a fuzzed field here and there."""
    passages = []
    for _ in range(draw(st.integers(0, 3))):
        p = admin_pb.AdminPassage(id=draw(st.from_regex(r"[a-z0-9][a-z0-9-]{0,12}", fullmatch=True)),
                                  text=draw(st.sampled_from(HINTS["text"])) + draw(st.text(max_size=20)),
                                  intent=draw(st.sampled_from(["setup", "fix", ""])),
                                  domain=draw(st.sampled_from(["home", "warehouse", ""])), locale="en-US")
        if draw(st.booleans()):
            p.confidence = draw(st.sampled_from([0.0, 0.5, 1.0]))
        if draw(st.integers(0, 3)) == 0:
            fuzzed = draw(messages(admin_pb.AdminPassage))
            name = draw(st.sampled_from([f.name for f in admin_pb.AdminPassage.DESCRIPTOR.fields]))
            if fuzzed.HasField(name) if name == "confidence" else True:
                setattr(p, name, getattr(fuzzed, name))
        passages.append(p)
    return admin_pb.UpsertRequest(passages=passages)


@fuzz(100)
@given(batch=st.lists(st.one_of(plausible_upserts(), messages(admin_pb.UpsertRequest)), max_size=4), md=ANY_MD)
def test_upsert(harness: Harness, batch: list[admin_pb.UpsertRequest], md: Any) -> None:
    call(harness, "admin", "Upsert", batch, metadata=md)


@fuzz(100)
@given(req=messages(admin_pb.DeleteRequest), md=ANY_MD)
def test_delete(harness: Harness, req: admin_pb.DeleteRequest, md: Any) -> None:
    call(harness, "admin", "Delete", [req], metadata=md)


@fuzz(20)
@given(req=messages(admin_pb.StatsRequest), md=ANY_MD)
def test_stats(harness: Harness, req: admin_pb.StatsRequest, md: Any) -> None:
    call(harness, "admin", "Stats", [req], metadata=md)


@fuzz(40)
@given(req=messages(admin_pb.SwapRequest), md=ANY_MD)
def test_swap(harness: Harness, req: admin_pb.SwapRequest, md: Any) -> None:
    """Fuzzed versions: a real swap only when one names a kept snapshot (test_snapshot makes one)."""
    call(harness, "admin", "Swap", [req], metadata=md)


@fuzz(4)
@given(req=messages(admin_pb.SnapshotRequest), md=st.sampled_from([ADMIN_MD, READ_MD, NO_MD]))
def test_snapshot(harness: Harness, req: admin_pb.SnapshotRequest, md: Any) -> None:
    """SnapshotRequest has no fields, so a few cases cover it (each admin one builds a snapshot, ~seconds)."""
    call(harness, "admin", "Snapshot", [req], metadata=md)


def test_still_serving_after_the_fuzz_cases(harness: Harness) -> None:
    async def go() -> None:
        for server in ("assistant", "admin"):
            out = await invoke_good(harness.channel(server), METHODS["Plan"],
                               [pb.PlanRequest(robot_id="amr-017", fault_code="E302", state="obstacle ahead")])
            assert out.code == grpc.StatusCode.OK, out
            out = await invoke_good(harness.channel(server), METHODS["Converse"], [
                pb.ConverseRequest(start=pb.SessionStart(session_id="s1")),
                pb.ConverseRequest(transcript=pb.TranscriptPartial(text="how do I reset", stability=0.5, sequence=1)),
                pb.ConverseRequest(transcript=pb.TranscriptPartial(text="how do I reset the thermostat",
                                                                   is_final=True, sequence=2))])
            assert out.code == grpc.StatusCode.OK and out.responses > 0, out
        out = await invoke_good(harness.channel("admin"), METHODS["Stats"], [admin_pb.StatsRequest()], metadata=READ_MD)
        assert out.code == grpc.StatusCode.OK, out
    harness.run(go())
