"""IndexAdmin over a real channel: auth refuses and touches nothing, malformed batches are refused whole,
and queries see 0 failures and no torn results while upserts, a snapshot and swaps run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from server.proto import admin_pb, admin_pb_grpc, pb, pb_grpc
from tests.index.conftest import ADMIN_TOKEN, READ_TOKEN, bearer, passage, word

ADMIN = bearer(ADMIN_TOKEN)


def ap(i: int, **fields: Any) -> admin_pb.AdminPassage:
    d = passage(i, **fields)
    return admin_pb.AdminPassage(id=d["id"], text=d["text"], intent=d["intent"], domain=d["domain"],
                                 locale=d["locale"], source=d["source"], confidence=d["confidence"])


async def stream(*messages: admin_pb.UpsertRequest) -> AsyncIterator[admin_pb.UpsertRequest]:
    for m in messages:
        yield m


async def error_of(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value


async def state(stub: Any) -> tuple:
    s = await stub.Stats(admin_pb.StatsRequest(), metadata=ADMIN)
    return s.generation, s.passages, s.pending_batches, s.live_version


async def test_no_wrong_or_read_only_credentials_are_refused_and_change_nothing(admin_server: Callable[..., Any],
                                                                                ) -> None:
    _, channel, live = await admin_server()
    stub = admin_pb_grpc.IndexAdminStub(channel)
    before = await state(stub)
    calls = {
        "Upsert": lambda md: stub.Upsert(stream(admin_pb.UpsertRequest(passages=[ap(900)])), metadata=md),
        "Delete": lambda md: stub.Delete(admin_pb.DeleteRequest(ids=["doc-00001"]), metadata=md),
        "Snapshot": lambda md: stub.Snapshot(admin_pb.SnapshotRequest(), metadata=md),
        "Swap": lambda md: stub.Swap(admin_pb.SwapRequest(version="v000001"), metadata=md),
    }
    for name, call in calls.items():
        for md, code in [((), grpc.StatusCode.UNAUTHENTICATED),
                         (bearer("not-the-token-0123456789"), grpc.StatusCode.UNAUTHENTICATED),
                         ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
                         (bearer(READ_TOKEN), grpc.StatusCode.PERMISSION_DENIED)]:
            err = await error_of(call(md))
            assert err.code() == code, (name, md, err)
            if code == grpc.StatusCode.PERMISSION_DENIED:
                assert f"{name} needs the admin role" in err.details()
    for md in [(), bearer("not-the-token-0123456789")]:
        assert (await error_of(stub.Stats(admin_pb.StatsRequest(), metadata=md))).code() == \
            grpc.StatusCode.UNAUTHENTICATED
    assert (await stub.Stats(admin_pb.StatsRequest(), metadata=bearer(READ_TOKEN))).passages == 120
    assert await state(stub) == before
    assert "doc-00900" not in {p.id for p in live.view.passages()} and live.store.versions() == ["v000001"]
    assert "doc-00001" in {p.id for p in live.view.passages()}


@pytest.mark.parametrize(("messages", "field", "what"), [
    ([[ap(900), ap(901), ap(902, text="   ")]], "passages[2].text", "is empty"),
    ([[ap(900)], [ap(901, text="x" * 201)]], "passages[1].text", "is 201 characters; the limit is 200"),
    ([[ap(900), ap(901), ap(902)], [ap(903, pid="doc-00900")]], "passages[3].id",
     "'doc-00900' is already passages[0] in this batch"),
    ([[ap(900, pid="Bad Id")]], "passages[0].id", "must match"),
])
async def test_malformed_upserts_name_the_passage_and_apply_nothing(admin_server: Callable[..., Any],
                                                                    messages: list, field: str, what: str) -> None:
    _, channel, live = await admin_server(index__max_passage_chars=200)
    stub = admin_pb_grpc.IndexAdminStub(channel)
    before = await state(stub)
    err = await error_of(stub.Upsert(stream(*[admin_pb.UpsertRequest(passages=m) for m in messages]), metadata=ADMIN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: ") and what in err.details()
    assert await state(stub) == before  # all-or-nothing: the valid passages before it are not in either
    assert "doc-00900" not in {p.id for p in live.view.passages()}


async def test_invalid_utf8_is_refused_with_its_position(admin_server: Callable[..., Any]) -> None:
    _, channel, live = await admin_server()
    good = admin_pb.UpsertRequest(passages=[ap(900), ap(901)]).SerializeToString()
    bad = admin_pb.UpsertRequest(passages=[ap(902), ap(903, text="PLACEHOLDER")]).SerializeToString()
    bad = bad.replace(b"PLACEHOLDER", b"caf\xe9 \xff\xfe!!")
    raw = channel.stream_unary("/snaprag.v1.IndexAdmin/Upsert", request_serializer=lambda b: b,
                               response_deserializer=admin_pb.UpsertResponse.FromString)

    async def frames() -> AsyncIterator[bytes]:
        yield good
        yield bad

    err = await error_of(raw(frames(), metadata=ADMIN))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("passages[3].text: is not valid UTF-8")
    assert len(live.view) == 120 and not live.pending


async def test_delete_of_an_unknown_id_is_not_found_unless_missing_ok(admin_server: Callable[..., Any]) -> None:
    _, channel, live = await admin_server()
    stub = admin_pb_grpc.IndexAdminStub(channel)
    err = await error_of(stub.Delete(admin_pb.DeleteRequest(ids=["doc-00001", "ghost-1"]), metadata=ADMIN))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "ghost-1" in err.details()
    assert len(live.view) == 120
    resp = await stub.Delete(admin_pb.DeleteRequest(ids=["doc-00001", "ghost-1"], missing_ok=True), metadata=ADMIN)
    assert (resp.deleted, list(resp.not_found), resp.live_passages) == (1, ["ghost-1"], 119)


async def test_reads_see_no_failure_and_no_torn_batch_during_upserts_snapshot_and_swaps(
        admin_server: Callable[..., Any]) -> None:
    # Correctness, not latency (that is bench/index_lifecycle.py): on a shared 2-core box four readers at full
    # speed plus a builder process can push one Retrieve past 120 ms, which would count as a failure here.
    _, channel, live = await admin_server(profiles__voice__retrieve_ms=5000)
    admin = admin_pb_grpc.IndexAdminStub(channel)
    query = pb_grpc.AssistantStub(channel)
    group = [f"grp-{i}" for i in range(4)]

    def batch(v: int) -> admin_pb.UpsertRequest:
        return admin_pb.UpsertRequest(passages=[ap(0, pid=g, text=f"aardvark zeppelin version{v} member {g}")
                                                for g in group])

    await admin.Upsert(stream(batch(0)), metadata=ADMIN)
    stop = asyncio.Event()
    stats = {"ok": 0, "failed": [], "torn": [], "versions": set()}

    async def reader(fusion: int) -> None:
        while not stop.is_set():
            try:
                resp = await query.Retrieve(pb.RetrieveRequest(query="aardvark zeppelin", k=10, fusion=fusion),
                                            timeout=5)
            except grpc.aio.AioRpcError as e:
                stats["failed"].append(f"{e.code().name}: {e.details()}")
                continue
            hits = [(sp.passage.id, sp.passage.text.split()[2]) for sp in resp.passages
                    if sp.passage.id.startswith("grp-")]
            if len(hits) != 4 or len({v for _, v in hits}) != 1:
                stats["torn"].append(hits)
            stats["versions"].add(hits[0][1] if hits else "")
            stats["ok"] += 1

    readers = [asyncio.create_task(reader(f)) for f in (pb.SPARSE_ONLY, pb.CONVEX, pb.RRF, pb.DENSE_ONLY)]
    events: list[str] = []
    try:
        for v in range(1, 13):
            await admin.Upsert(stream(batch(v)), metadata=ADMIN)
            if v == 4:
                async for ev in admin.Snapshot(admin_pb.SnapshotRequest(), metadata=ADMIN):
                    events.append(ev.WhichOneof("event"))
            if v == 6:
                async for ev in admin.Swap(admin_pb.SwapRequest(), metadata=ADMIN):
                    events.append(ev.WhichOneof("event"))
            if v == 9:  # rollback to the seed snapshot: pending writes come along
                async for ev in admin.Swap(admin_pb.SwapRequest(version="v000001"), metadata=ADMIN):
                    events.append(ev.WhichOneof("event"))
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.gather(*readers)
    assert stats["ok"] > 50 and not stats["failed"], stats["failed"][:3]
    assert not stats["torn"], stats["torn"][:3]
    assert len(stats["versions"]) > 3  # readers really did see the writes land
    assert events.count("snapshot") == 1 and events.count("swap") == 2 and "progress" in events
    assert live.view.version == "v000001" and live.pointer.history[-1]["previous"] == "v000002"
    final = {p.id: p.text for p in live.view.passages() if p.id.startswith("grp-")}
    assert set(final.values()) == {f"aardvark zeppelin version12 member {g}" for g in group}


async def test_snapshot_and_swap_stream_progress_and_stats_reports_them(admin_server: Callable[..., Any]) -> None:
    _, channel, _live = await admin_server()
    stub = admin_pb_grpc.IndexAdminStub(channel)
    await stub.Upsert(stream(admin_pb.UpsertRequest(passages=[ap(900), ap(901)])), metadata=ADMIN)
    stages, result = [], None
    async for ev in stub.Snapshot(admin_pb.SnapshotRequest(), metadata=ADMIN):
        if ev.WhichOneof("event") == "progress":
            stages.append(ev.progress.stage)
        else:
            result = ev.snapshot
    assert result is not None and result.version == "v000002" and result.passages == 122
    assert stages[0] == "seal" and "hnsw" in stages and stages[-1] == "renamed"
    s = await stub.Stats(admin_pb.StatsRequest(), metadata=bearer(READ_TOKEN))
    assert (s.live_version, s.pending_batches, [i.version for i in s.snapshots]) == ("v000001", 1,
                                                                                     ["v000002", "v000001"])
    swap = None
    async for ev in stub.Swap(admin_pb.SwapRequest(version="v000002"), metadata=ADMIN):
        if ev.WhichOneof("event") == "swap":
            swap = ev.swap
    assert swap is not None and (swap.previous, swap.version, swap.passages) == ("v000001", "v000002", 122)
    assert [g.name for g in swap.gates if g.passed] == ["integrity", "doc_count", "recall@10"]
    s = await stub.Stats(admin_pb.StatsRequest(), metadata=ADMIN)
    assert (s.live_version, s.pending_batches, s.delta_rows, s.tombstones) == ("v000002", 0, 0, 0)
    assert s.last_swap_previous == "v000001" and not s.last_failure
    # a refused swap is reported with the gate in the status and in Stats
    err = await error_of(stub.Swap(admin_pb.SwapRequest(version="v000009"), metadata=ADMIN))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "kept versions: v000001, v000002" in err.details()
    hits = await pb_grpc.AssistantStub(channel).Retrieve(pb.RetrieveRequest(query=word(900), k=1))
    assert hits.passages[0].passage.id == "doc-00900"
