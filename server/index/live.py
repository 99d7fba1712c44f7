"""LiveIndex: the served index, its writes, snapshots and gated swaps (see server/index/__init__.py).

Threads and who does what:
- queries (the server's CPU pool) call `search`: one read of the current view, registered while in use;
- the encoder thread (one, niced) turns upserted passages into vectors: the heavy part of a write,
  so it only gets the CPU queries leave;
- the writer thread (one, normal priority) runs every state change: log + fsync, apply, publish, and
  the last step of a swap, so writes and promotions are serialised without a lock. It is not niced
  because it holds the HNSW write lock for a few inserts at a time: a starved lock holder would stall
  the queries waiting on that lock (priority inversion). Its work per batch is small;
- the lifecycle thread (one) runs a swap: the gates in a separate niced process (gate_process.py: gate
  queries are Python-heavy and would compete with queries for the GIL), then loads the candidate;
- the snapshot builder is a separate process (builder.py), started by the admin service.

Only threads that mostly run native code without the GIL are niced: a niced thread that the OS preempts
while it holds the GIL stalls every query thread until it runs again (priority inversion; measured as
0.5-1 s query stalls on a loaded 2-core box when the gates ran on a niced thread).

Deferred HNSW marks: a row a write hides is filtered per view at once, and handed to hnswlib's
`mark_deleted` only once no query holds a view in which it is still alive (`_reap`), so an in-flight
query never loses a row its view still shows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from server.config import Config, describe
from server.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from server.index.builder import BuildJob, BuildResult
from server.index.gate_process import GateJob, GateProcessFailed, run_gates
from server.index.gates import GateFailed, GateResult, integrity_failed, load_golden_questions
from server.index.generation import Applied, Generation
from server.index.store import Pointer, SnapshotStore, utc_now, version_number
from server.index.view import IndexView
from server.index.wal import WalRecord, WriteAheadLog
from server.knowledge import GoldenQuestion, KnowledgeBaseError, Passage
from server.retrieval.hybrid import FusionMode
from server.retrieval.snapshot import SnapshotError, encoder_identity, index_texts, load_snapshot, write_snapshot
from server.retrieval.sparse import Filters, Hit, passage_index_text
from server.retrieval.text import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")
ProgressFn = Callable[[str, int, int], None]


def niced(nice: int) -> Callable[[], None]:
    """Thread initializer: lower this thread's CPU priority. On Linux niceness is per thread, so only
    the thread (and onnxruntime work it runs inline, with one intra-op thread) is affected. 19 also
    selects SCHED_IDLE: the thread then runs only on a core nothing else wants."""
    def init() -> None:
        if not nice:
            return
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            if nice >= 19 and hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError):  # not Linux: the write path runs at normal priority
            log.debug("could not lower the priority of %s", threading.current_thread().name)
    return init


@dataclass
class UpsertOutcome:
    inserted: int
    replaced: int
    generation: int
    live_passages: int
    elapsed_ms: float


@dataclass
class DeleteOutcome:
    deleted: int
    not_found: list[str]
    generation: int
    live_passages: int


@dataclass
class Candidate:
    version: str
    gen: Generation
    gates: list[GateResult]
    replay_after: int
    applied_upto: int
    reapplied: int
    started: float


@dataclass
class SwapOutcome:
    version: str
    previous: str
    passages: int
    gates: list[GateResult]
    reapplied: int
    swap_s: float


@dataclass
class JobRecord:
    last_failure: str = ""
    last_snapshot: dict[str, Any] = field(default_factory=dict)
    last_gates: list[GateResult] = field(default_factory=list)


class LiveIndex:
    def __init__(self, cfg: Config, tokenizer: Tokenizer, encoder: Any, ingest_encoder: Any, store: SnapshotStore,
                 pointer: Pointer, gen: Generation, golden: list[GoldenQuestion]) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.ingest_encoder = ingest_encoder if ingest_encoder is not None else encoder
        self.store = store
        self.pointer = pointer
        self.gen = gen
        self.golden = golden
        self.wal = WriteAheadLog(store.wal_dir, after=pointer.replay_after)
        self.pending: list[WalRecord] = []
        """Records not in the served snapshot (segments > pointer.replay_after), in write order."""
        self._batch = 0
        self._seq = 0
        self._guard = threading.Lock()
        self._active: dict[int, int] = {}
        self._marks: list[tuple[int, Generation, npt.NDArray[np.int64]]] = []
        self._view = gen.view(self._next_seq())
        self._golden_cache: npt.NDArray[np.float32] | None = None
        ix = cfg.index
        self._encoder = ThreadPoolExecutor(1, "snaprag-ingest", initializer=niced(ix.ingest_nice))
        self._writer = ThreadPoolExecutor(1, "snaprag-writer")
        self._lifecycle = ThreadPoolExecutor(1, "snaprag-lifecycle")
        self.side = ThreadPoolExecutor(2, thread_name_prefix="snaprag-live-dense")
        """Runs the dense half of a query while the caller's thread does BM25 (as HybridRetriever)."""
        self._job_lock = threading.Lock()
        self.job = ""
        self.record = JobRecord()

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: Config, tokenizer: Tokenizer, encoder: Any = None, ingest_encoder: Any = None) -> LiveIndex:
        """Load the served snapshot (seeding the folder from knowledge_base the first time) and replay
        the write-ahead log over it. Errors name the file and the fix."""
        store = SnapshotStore(cfg.resolve_path(cfg.index.root))
        store.ensure()
        removed = store.cleanup()
        if removed:
            log.info("index: removed leftovers of an interrupted write: %s", ", ".join(removed))
        pointer = store.read_current()
        if pointer is None:
            versions = store.versions()
            if versions:  # e.g. `snaprag index build --root`, or a seed that crashed after its rename
                version = versions[-1]
            else:
                version = store.next_version()
                seed(cfg, tokenizer, encoder, store, version)
            pointer = Pointer(version, history=[{"version": version, "previous": "", "at": utc_now()}])
            store.write_current(pointer)
        try:
            snap = load_snapshot(store.path(pointer.version), tokenizer, encoder=encoder)
            gen = Generation(snap, pointer.version, cfg, tokenizer, encoder)
        except (SnapshotError, ValueError, OSError, KnowledgeBaseError) as e:
            raise SnapshotError(f"the served snapshot {pointer.version} (named by {store.current_file}) does not "
                                f"load: {e}. Point CURRENT at a kept version from {store.snapshots} to recover") from e
        golden_dirs = cfg.index.golden_paths or cfg.knowledge_base.paths
        golden = load_golden_questions([cfg.resolve_path(p) for p in golden_dirs], cfg.index.golden_splits)
        live = cls(cfg, tokenizer, encoder, ingest_encoder, store, pointer, gen, golden)
        replayed = 0
        for rec in live.wal.records(after=pointer.replay_after):
            gen.apply(rec)
            live.pending.append(rec)
            live._batch = max(live._batch, rec.batch)
            replayed += 1
        live._view = gen.view(live._next_seq())
        log.info("index: serving %s (%d passages) + %d logged writes from %s", pointer.version, len(live._view),
                 replayed, store.root)
        return live

    def close(self) -> None:
        self._encoder.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._lifecycle.shutdown(wait=False, cancel_futures=True)
        self.side.shutdown(wait=False, cancel_futures=True)
        self.wal.close()

    # -- reading -----------------------------------------------------------------------------------

    @property
    def view(self) -> IndexView:
        """The current view (for a one-off look; queries use `acquire`)."""
        return self._view

    @contextmanager
    def acquire(self) -> Iterator[IndexView]:
        """The current view, registered as in use until the block ends (see `_reap`)."""
        with self._guard:
            v = self._view
            self._active[v.seq] = self._active.get(v.seq, 0) + 1
        try:
            yield v
        finally:
            with self._guard:
                left = self._active[v.seq] - 1
                if left:
                    self._active[v.seq] = left
                else:
                    del self._active[v.seq]

    def search(self, query: str, k: int, filters: Filters | None = None, mode: FusionMode | None = None,
               ) -> list[Hit]:
        with self.acquire() as v:
            return v.search(query, k, filters, mode, side=self.side)

    # -- threads -----------------------------------------------------------------------------------

    async def in_encoder(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._encoder, fn, *args)

    async def in_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def in_lifecycle(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._lifecycle, fn, *args)

    # -- writes (writer thread) --------------------------------------------------------------------

    def encode(self, passages: Sequence[Passage]) -> npt.NDArray[np.float32] | None:
        """Encoder thread: the batch's vectors (None when the index has no dense part)."""
        if self.gen.dense is None:
            return None
        vectors: npt.NDArray[np.float32] = self.ingest_encoder.encode(
            [passage_index_text(p) for p in passages], batch_size=self.cfg.retrieval.dense.batch_size)
        return vectors

    def upsert(self, passages: Sequence[Passage], vectors: npt.NDArray[np.float32] | None = None) -> UpsertOutcome:
        """Apply one validated batch (server/index/batch.py checked it): all of it or, on error, none.
        `vectors` from `encode` (computed here when not given)."""
        t0 = time.perf_counter()
        if self.gen.dense is not None and vectors is None:
            vectors = self.encode(passages)
        if self.gen.dense is None:
            vectors = None  # a swap to a BM25-only snapshot happened since they were encoded
        rec = self.wal.append(WalRecord("upsert", self._next_batch(), tuple(passages), vectors))
        applied = self.gen.apply(rec)
        self.pending.append(rec)
        view = self._publish(applied)
        return UpsertOutcome(applied.inserted, applied.replaced, view.seq, len(view),
                             (time.perf_counter() - t0) * 1000)

    def delete(self, ids: Sequence[str], missing_ok: bool) -> DeleteOutcome:
        uniq = list(dict.fromkeys(ids))
        unknown = [i for i in uniq if i not in self.gen.row_of]
        if unknown and not missing_ok:
            shown = ", ".join(unknown[:20]) + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else "")
            raise NotFound(f"ids not in the index: {shown}; nothing was deleted (send only ids that exist, or set "
                           "missing_ok to delete the others)")
        known = [i for i in uniq if i in self.gen.row_of]
        if not known:
            return DeleteOutcome(0, unknown, self._view.seq, len(self._view))
        rec = self.wal.append(WalRecord("delete", self._next_batch(), ids=tuple(known)))
        applied = self.gen.apply(rec)
        self.pending.append(rec)
        view = self._publish(applied)
        return DeleteOutcome(applied.deleted, unknown, view.seq, len(view))

    def _next_batch(self) -> int:
        self._batch += 1
        return self._batch

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _publish(self, applied: Applied | None) -> IndexView:
        view = self.gen.view(self._next_seq())
        with self._guard:
            self._view = view  # the one reference queries read: the whole batch becomes visible at once
        if applied is not None and applied.died is not None and applied.died.size and self.gen.dense is not None:
            self._marks.append((view.seq, self.gen, applied.died))
        self._reap()
        return view

    def _reap(self) -> None:
        """mark_deleted the rows that died in views no query can still be using an older view than."""
        if not self._marks:
            return
        with self._guard:
            oldest = min(self._active, default=self._view.seq)
        keep = []
        for seq, gen, rows in self._marks:
            if gen is not self.gen or gen.dense is None:
                continue  # a replaced generation's graph is never written again
            if seq <= oldest:
                gen.dense.mark_deleted(rows)
            else:
                keep.append((seq, gen, rows))
        self._marks = keep

    # -- jobs --------------------------------------------------------------------------------------

    def begin_job(self, name: str) -> None:
        with self._job_lock:
            if self.job:
                raise Aborted(f"a {self.job} is already running; wait for it to finish (`snaprag index stats` "
                              "shows it) and retry")
            self.job = name

    def end_job(self, failure: str = "") -> None:
        if failure:
            self.record.last_failure = f"{utc_now()} {failure}"
        with self._job_lock:
            self.job = ""

    def seal(self) -> BuildJob:
        """Writer thread: close the log segment and describe the build of the next version."""
        sealed = self.wal.seal()
        version = self.store.next_version()
        ix = self.cfg.index
        return BuildJob(
            version=version, out=str(self.store.path(version)), base=str(self.gen.path),
            base_version=self.gen.version,
            segments=[str(p) for p in self.wal.segments(self.pointer.replay_after, sealed)],
            wal_through=sealed, retrieval=describe(self.cfg)["retrieval"], nice=ix.builder_nice,
            threads=ix.builder_threads, dense=self.gen.dense is not None)

    def built(self, result: BuildResult) -> None:
        self.record.last_snapshot = {"version": result.version, "at": utc_now(), "build_s": result.build_s,
                                     "passages": result.passages}
        self.store.prune(self.cfg.index.keep, {self.gen.version})  # the new one is the newest: kept

    def prepare_swap(self, version: str, allow_shrink: bool, progress: ProgressFn) -> Candidate:
        """Lifecycle thread: the gate process measures the candidate against the live index; if every gate
        passes, load it here and re-apply the writes it lacks."""
        t0 = time.perf_counter()
        version = self._resolve_version(version)
        cfg = describe(self.cfg)
        vectors = None
        if self.gen.dense is not None and self.golden:
            vectors = self._encoder.submit(self._golden_vectors).result()  # niced; cached after the first swap
        job = GateJob(
            candidate=str(self.store.path(version)), candidate_version=version, live=str(self.gen.path),
            live_version=self.gen.version, segments=[str(p) for p in self.wal.segments(self.pointer.replay_after)],
            replay_after=self.pointer.replay_after, retrieval=cfg["retrieval"], index=cfg["index"],
            allow_shrink=allow_shrink, golden=[{"id": q.id, "question": q.question, "relevant": list(q.relevant)}
                                               for q in self.golden],
            encoder_id=encoder_identity(self.encoder), nice=self.cfg.index.builder_nice)
        try:
            gates = run_gates(job, vectors, progress)
        except GateProcessFailed as e:
            raise Aborted(str(e)) from None
        self.record.last_gates = gates
        if not all(g.passed for g in gates):
            raise GateFailed(version, gates)
        progress("load", 0, 0)
        try:
            snap = load_snapshot(self.store.path(version), self.tokenizer, encoder=self.encoder)
            gen = Generation(snap, version, self.cfg, self.tokenizer, self.encoder)
        except (SnapshotError, ValueError, OSError, KnowledgeBaseError) as e:  # changed since the gates ran
            gates = [integrity_failed(str(e))]
            self.record.last_gates = gates
            raise GateFailed(version, gates) from None
        wal_through = int((snap.manifest.get("lifecycle") or {}).get("wal_through", 0))
        replay_after = max(self.pointer.replay_after, wal_through)
        records = list(self.pending)  # the writer thread may append meanwhile; commit catches up
        todo = [r for r in records if r.segment > replay_after]
        progress("replay", 0, len(todo))
        for i, r in enumerate(todo, 1):
            gen.apply(r)
            if i % 50 == 0:
                progress("replay", i, len(todo))
        return Candidate(version, gen, gates, replay_after, records[-1].batch if records else 0, len(todo), t0)

    def commit_swap(self, cand: Candidate) -> SwapOutcome:
        """Writer thread: catch up on writes since `prepare_swap`, move CURRENT, publish. In-flight queries
        keep the view (and generation) they hold until they finish."""
        for r in self.pending:
            if r.batch > cand.applied_upto and r.segment > cand.replay_after:
                cand.gen.apply(r)
                cand.reapplied += 1
        previous = self.gen.version
        history = [*self.pointer.history, {"version": cand.version, "previous": previous, "at": utc_now()}]
        pointer = Pointer(cand.version, cand.replay_after, history)
        self.store.write_current(pointer)  # the durable decision: a crash before = old, after = new
        self.gen, self.pointer = cand.gen, pointer
        self._marks = []
        view = self._publish(None)
        self.pending = [r for r in self.pending if r.segment > cand.replay_after]
        self.wal.drop_through(cand.replay_after)
        self.store.prune(self.cfg.index.keep, {cand.version})
        log.info("index: swapped %s -> %s (%d passages, %d writes re-applied)", previous, cand.version, len(view),
                 cand.reapplied)
        return SwapOutcome(cand.version, previous, len(view), cand.gates, cand.reapplied,
                           time.perf_counter() - cand.started)

    def previous_version(self) -> str:
        """The version served before the current one (what `rollback` goes back to)."""
        for entry in reversed(self.pointer.history):
            if entry.get("version") == self.gen.version and entry.get("previous"):
                prev = str(entry["previous"])
                if prev in self.store.versions():
                    return prev
                raise NotFound(f"the previous version {prev} was pruned ([index] keep); name a kept version: "
                               f"{', '.join(self.store.versions())}")
        raise FailedPrecondition(f"{self.gen.version} has no previous version to roll back to")

    def _resolve_version(self, version: str) -> str:
        versions = self.store.versions()
        if not version:
            newer = [v for v in versions if version_number(v) > version_number(self.gen.version)]
            if not newer:
                raise FailedPrecondition(f"no snapshot newer than the live {self.gen.version}; build one with "
                                         "`snaprag index snapshot`, or name a version to roll back to")
            return newer[-1]
        try:
            version_number(version)
        except ValueError as e:
            raise InvalidArgument("version", str(e)) from None
        if version == self.gen.version:
            raise FailedPrecondition(f"{version} is already the live snapshot")
        if version not in versions:
            raise NotFound(f"snapshot {version} does not exist in {self.store.snapshots}; kept versions: "
                           f"{', '.join(versions) or 'none'}")
        return version

    def _golden_vectors(self) -> npt.NDArray[np.float32]:
        """Golden questions encoded once per process (row i = self.golden[i]), for the gate process."""
        if self._golden_cache is None:
            enc = self.ingest_encoder
            self._golden_cache = np.stack([enc.encode_query(q.question) for q in self.golden]).astype(np.float32)
        return self._golden_cache

    # -- stats -------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        v = self._view
        infos = [self.store.info(name) for name in reversed(self.store.versions())]
        for info in infos:
            info["live"] = info["version"] == v.version
        last = self.pointer.history[-1] if self.pointer.history else {}
        pending = list(self.pending)
        return {
            "live_version": v.version, "generation": v.seq, "passages": len(v),
            "snapshot_passages": v.gen.base_rows, "delta_rows": v.delta_rows, "tombstones": v.n_dead,
            "pending_batches": len(pending), "pending_passages": sum(r.size for r in pending),
            "snapshots": infos, "last_swap_version": str(last.get("version", "")),
            "last_swap_at": str(last.get("at", "")), "last_swap_previous": str(last.get("previous", "")),
            "last_swap_gates": list(self.record.last_gates), "last_failure": self.record.last_failure,
            "running_job": self.job, "last_snapshot": dict(self.record.last_snapshot),
        }


def seed(cfg: Config, tokenizer: Tokenizer, encoder: Any, store: SnapshotStore, version: str) -> None:
    """The first snapshot of an empty index folder: knowledge_base.snapshot if set, else its paths."""
    from server.knowledge import load_knowledge_base

    kb_cfg = cfg.knowledge_base
    embeddings = None
    if kb_cfg.snapshot:
        src = load_snapshot(cfg.resolve_path(kb_cfg.snapshot), tokenizer, encoder=encoder)
        kb, embeddings = src.kb, src.embeddings
    else:
        kb = load_knowledge_base([cfg.resolve_path(p) for p in kb_cfg.paths])
    if encoder is not None and embeddings is None:
        from server.retrieval.embed_cache import cached_embeddings
        from server.retrieval.encoder import OnnxEncoder

        texts = index_texts(kb)
        bs = cfg.retrieval.dense.batch_size
        # The on-disk cache is keyed by the ONNX model's hash; a stand-in encoder (tests) just encodes.
        embeddings = (cached_embeddings(encoder, texts, batch_size=bs) if isinstance(encoder, OnnxEncoder)
                      else encoder.encode(texts, batch_size=bs))
    log.info("index: seeding %s with %d passages", store.path(version), len(kb))
    write_snapshot(store.path(version), kb, cfg, tokenizer, encoder=encoder, embeddings=embeddings,
                   extra={"lifecycle": {"version": version, "parent": "", "wal_through": 0, "records": 0}},
                   log=lambda m: log.info("index: %s", m.strip()))


def load_ingest_encoder(cfg: Config) -> Any:
    """A second encoder session for upserts: `ingest_threads` intra-op threads (1 = it runs inline on the
    niced encoder thread), so encoding a batch cannot take the cores queries need."""
    dc = cfg.retrieval.dense
    if not dc.enabled:
        return None
    from server.retrieval.encoder import OnnxEncoder

    return OnnxEncoder.load(cfg.resolve_path(dc.model_dir), max_length=dc.max_length,
                            intra_op_threads=cfg.index.ingest_threads, query_max_length=dc.query_max_length)
