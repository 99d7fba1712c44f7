"""The IndexAdmin gRPC service (protos/snaprag/v1/admin.proto): thin handlers over LiveIndex.

Every method checks credentials first (auth.py), then validates, then hands the work to the live
index's threads (nothing CPU-heavy on the event loop); errors leave through the one mapper
(server/errors.py). Snapshot and Swap stream progress while their work runs elsewhere (the builder
process, the lifecycle thread), and a client cancel stops the builder.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc

from server.config import Config
from server.errors import Aborted, InvalidArgument, grpc_errors
from server.index.auth import Authenticator
from server.index.batch import MAX_ID_CHARS, admin_passage_fields, check_unique, passage_from_fields
from server.index.builder import BuildFailed, run_build
from server.index.gates import GateResult
from server.index.live import LiveIndex
from server.knowledge import Passage
from server.proto import ADMIN_SERVICE_NAME, admin_pb
from server.wire import MalformedRequest, safe_deserializer

T = TypeVar("T")
MAX_VERSION_CHARS = 32
"""Longer is no snapshot version (v000002); refused before it could be echoed back in a NOT_FOUND message."""
_INDEXED = re.compile(r"^passages\[(\d+)\]")


def _checked(request: Any) -> Any:
    if isinstance(request, MalformedRequest):
        raise request.error()
    return request


def gate_pb(g: GateResult) -> admin_pb.GateResult:
    return admin_pb.GateResult(name=g.name, passed=g.passed, candidate=g.candidate, live=g.live, limit=g.limit,
                               detail=g.detail)


def progress_event(stage: str, done: int = 0, total: int = 0, detail: str = "") -> admin_pb.IndexJobEvent:
    return admin_pb.IndexJobEvent(progress=admin_pb.JobProgress(stage=stage, done=done, total=total, detail=detail))


async def _relay(work: Awaitable[T], queue: asyncio.Queue[admin_pb.IndexJobEvent],
                 ) -> AsyncIterator[admin_pb.IndexJobEvent | tuple[str, T]]:
    """Yield progress events from `queue` while `work` runs, then ("done", its result). Cancelling the
    consumer cancels `work`."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            yield ("done", task.result())
            return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class IndexAdminService:
    def __init__(self, live: LiveIndex, auth: Authenticator, cfg: Config) -> None:
        self.live = live
        self.auth = auth
        self.cfg = cfg

    def handlers(self) -> grpc.GenericRpcHandler:
        ser = lambda cls: cls.SerializeToString  # noqa: E731
        methods = {
            "Upsert": grpc.stream_unary_rpc_method_handler(
                self.Upsert, request_deserializer=safe_deserializer(admin_pb.UpsertRequest),
                response_serializer=ser(admin_pb.UpsertResponse)),
            "Delete": grpc.unary_unary_rpc_method_handler(
                self.Delete, request_deserializer=safe_deserializer(admin_pb.DeleteRequest),
                response_serializer=ser(admin_pb.DeleteResponse)),
            "Snapshot": grpc.unary_stream_rpc_method_handler(
                self.Snapshot, request_deserializer=safe_deserializer(admin_pb.SnapshotRequest),
                response_serializer=ser(admin_pb.IndexJobEvent)),
            "Swap": grpc.unary_stream_rpc_method_handler(
                self.Swap, request_deserializer=safe_deserializer(admin_pb.SwapRequest),
                response_serializer=ser(admin_pb.IndexJobEvent)),
            "Stats": grpc.unary_unary_rpc_method_handler(
                self.Stats, request_deserializer=safe_deserializer(admin_pb.StatsRequest),
                response_serializer=ser(admin_pb.IndexStats)),
        }
        return grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, methods)

    # ------------------------------------------------------------------ writes
    @grpc_errors
    async def Upsert(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> admin_pb.UpsertResponse:
        self.auth.require(context, "admin", "Upsert")  # before a single message is read
        ix = self.cfg.index
        passages: list[Passage] = []
        wheres: list[str] = []
        async for raw in request_iterator:
            if isinstance(raw, MalformedRequest):
                # Positions inside the bad message count on from the passages already received.
                field = _INDEXED.sub(lambda m: f"passages[{len(passages) + int(m.group(1))}]", raw.field)
                raise InvalidArgument(field, f"{raw.reason}; nothing of this batch was applied")
            for msg in raw.passages:
                where = f"passages[{len(passages)}]"
                if len(passages) >= ix.max_batch_passages:
                    raise InvalidArgument("passages", f"more than {ix.max_batch_passages} in one stream ([index] "
                                          "max_batch_passages); send them as several Upsert calls")
                passages.append(passage_from_fields(admin_passage_fields(msg, where), where, ix.max_passage_chars))
                wheres.append(where)
        if not passages:
            raise InvalidArgument("passages", "the stream carried no passages")
        check_unique(passages, wheres)
        vectors = await self.live.in_encoder(self.live.encode, passages)  # niced: queries come first
        out = await self.live.in_writer(self.live.upsert, passages, vectors)
        return admin_pb.UpsertResponse(inserted=out.inserted, replaced=out.replaced, generation=out.generation,
                                       live_passages=out.live_passages, elapsed_ms=out.elapsed_ms)

    @grpc_errors
    async def Delete(self, request: Any, context: grpc.aio.ServicerContext) -> admin_pb.DeleteResponse:
        self.auth.require(context, "admin", "Delete")
        req: admin_pb.DeleteRequest = _checked(request)
        ids = [i.strip() for i in req.ids]
        if not ids:
            raise InvalidArgument("ids", "is empty; name at least one passage id")
        for n, pid in enumerate(ids):
            if not pid or len(pid) > MAX_ID_CHARS:
                raise InvalidArgument(f"ids[{n}]", f"must be 1..{MAX_ID_CHARS} characters")
        out = await self.live.in_writer(self.live.delete, ids, req.missing_ok)
        return admin_pb.DeleteResponse(deleted=out.deleted, not_found=out.not_found, generation=out.generation,
                                       live_passages=out.live_passages)

    # ------------------------------------------------------------------ jobs
    @grpc_errors
    async def Snapshot(self, request: Any, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[admin_pb.IndexJobEvent]:
        self.auth.require(context, "admin", "Snapshot")
        _checked(request)
        self.live.begin_job("snapshot")
        ok, failure = False, "snapshot cancelled or interrupted (the builder was stopped)"
        try:
            yield progress_event("seal")
            job = await self.live.in_writer(self.live.seal)
            yield progress_event("start", 0, 0, f"building {job.version} from {job.base_version} + "
                                                f"{len(job.segments)} log segments")
            queue: asyncio.Queue[admin_pb.IndexJobEvent] = asyncio.Queue()
            result = None
            async for item in _relay(run_build(job, lambda s, d, t: queue.put_nowait(progress_event(s, d, t))),
                                     queue):
                if isinstance(item, tuple):
                    result = item[1]
                else:
                    yield item
            assert result is not None
            await self.live.in_writer(self.live.built, result)
            ok = True
            yield admin_pb.IndexJobEvent(snapshot=admin_pb.SnapshotResult(
                version=result.version, passages=result.passages, wal_through=result.wal_through,
                build_s=result.build_s, path=result.path))
        except BuildFailed as e:
            failure = str(e)
            raise Aborted(f"{e}; the live index is unchanged and its writes stay pending for the next "
                          "snapshot: retry `snaprag index snapshot`") from None
        except Exception as e:
            failure = f"snapshot failed: {e}"
            raise
        finally:
            self.live.end_job("" if ok else failure)

    @grpc_errors
    async def Swap(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[admin_pb.IndexJobEvent]:
        self.auth.require(context, "admin", "Swap")
        req: admin_pb.SwapRequest = _checked(request)
        if len(req.version.strip()) > MAX_VERSION_CHARS:  # before the job starts: a refusal records no failure
            raise InvalidArgument("version", f"is {len(req.version.strip())} characters; name a snapshot version "
                                  "like v000002 (`snaprag index stats` lists them), or leave it empty for the newest")
        self.live.begin_job("swap")
        ok, failure = False, "swap cancelled or interrupted (the live index is unchanged)"
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[admin_pb.IndexJobEvent] = asyncio.Queue()

        def progress(stage: str, done: int, total: int) -> None:  # called from the lifecycle thread
            loop.call_soon_threadsafe(queue.put_nowait, progress_event(stage, done, total))

        try:
            candidate = None
            async for item in _relay(self.live.in_lifecycle(self.live.prepare_swap, req.version.strip(),
                                                            req.allow_shrink, progress), queue):
                if isinstance(item, tuple):
                    candidate = item[1]
                else:
                    yield item
            assert candidate is not None
            yield progress_event("promote", 0, 0, f"{candidate.version} passed every gate")
            out = await self.live.in_writer(self.live.commit_swap, candidate)
            ok = True
            yield admin_pb.IndexJobEvent(swap=admin_pb.SwapResult(
                version=out.version, previous=out.previous, passages=out.passages,
                gates=[gate_pb(g) for g in out.gates], reapplied_writes=out.reapplied, swap_s=out.swap_s))
        except Exception as e:
            failure = str(e)
            raise
        finally:
            self.live.end_job("" if ok else failure)

    # ------------------------------------------------------------------ stats
    @grpc_errors
    async def Stats(self, request: Any, context: grpc.aio.ServicerContext) -> admin_pb.IndexStats:
        self.auth.require(context, "read", "Stats")
        _checked(request)
        s = await asyncio.get_running_loop().run_in_executor(None, self.live.stats)
        return admin_pb.IndexStats(
            live_version=s["live_version"], generation=s["generation"], passages=s["passages"],
            snapshot_passages=s["snapshot_passages"], delta_rows=s["delta_rows"], tombstones=s["tombstones"],
            pending_batches=s["pending_batches"], pending_passages=s["pending_passages"],
            snapshots=[admin_pb.SnapshotInfo(version=i["version"], passages=i["passages"], created=i["created"],
                                             live=i["live"], bytes=i["bytes"]) for i in s["snapshots"]],
            last_swap_version=s["last_swap_version"], last_swap_at=s["last_swap_at"],
            last_swap_previous=s["last_swap_previous"], last_swap_gates=[gate_pb(g) for g in s["last_swap_gates"]],
            last_failure=s["last_failure"], running_job=s["running_job"])
