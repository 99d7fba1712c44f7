"""The snapshot builder: a separate, low-priority process that freezes the live state into a snapshot.

    python -m server.index.builder JOB.json

The job names the served snapshot (the base), the sealed write-ahead-log segments to replay over it,
and the new version's directory. The builder replays the log with the live index's row semantics
(server/index/generation.py), keeps the live rows in row order with the vectors the server already
computed (nothing is re-encoded), and writes a fresh snapshot (one BM25 segment, a new HNSW graph)
through server/retrieval/snapshot.py: temp dir, fsync, rename. It prints one JSON line per step on
stdout ({"stage", "done", "total"}, then {"result": {...}}), which the server relays as progress.

It runs at `os.nice(builder_nice)` with `builder_threads` HNSW threads, so it takes the CPU queries
leave over. It never touches CURRENT, the log or the served snapshot: killing it at any point leaves
the live index as it was (and at worst a temp dir, removed at the next start) or a complete new
version that nothing serves yet.

Test hook: SNAPRAG_INDEX_CRASH_AT=<stage> makes the builder SIGKILL itself right after that stage
(loaded, replayed, bm25, embeddings, hnsw, manifest, renamed), as a crash would stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

CRASH_ENV = "SNAPRAG_INDEX_CRASH_AT"
REPO = Path(__file__).resolve().parents[2]
STAGES = ("loaded", "replayed", "bm25", "embeddings", "hnsw", "manifest", "renamed")


@dataclass
class BuildJob:
    version: str
    out: str
    base: str
    base_version: str
    segments: list[str]
    wal_through: int
    retrieval: dict[str, Any]
    """describe(cfg)["retrieval"]: tokenizer, BM25 and HNSW settings."""
    nice: int = 10
    threads: int = 0
    dense: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildResult:
    version: str
    passages: int
    wal_through: int
    build_s: float
    path: str


class BuildFailed(RuntimeError):
    pass


# -- the compaction both sides agree on ----------------------------------------------------------------

def compact(base_ids: list[str], base_rows: Iterable[Any], records: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """Replay write records over the base rows: returns (passages, vector sources) of the live rows in
    row order. A vector source is an int (a base row) or a float32 vector (from an upsert record)."""
    rows: dict[str, tuple[Any, Any]] = {pid: (p, i) for i, (pid, p) in enumerate(zip(base_ids, base_rows,
                                                                                         strict=True))}
    for rec in records:
        if rec.op == "upsert":
            for i, p in enumerate(rec.passages):
                rows.pop(p.id, None)  # a replaced id moves to the end, as its new row does live
                rows[p.id] = (p, rec.vectors[i] if rec.vectors is not None else None)
        else:
            for pid in rec.ids:
                rows.pop(pid, None)
    passages = [p for p, _ in rows.values()]
    sources = [src for _, src in rows.values()]
    return passages, sources


def _gather_vectors(base: npt.NDArray[np.float32] | None, sources: list[Any]) -> npt.NDArray[np.float32] | None:
    if base is None and not any(isinstance(s, np.ndarray) for s in sources):
        return None
    dim = base.shape[1] if base is not None else next(s for s in sources if isinstance(s, np.ndarray)).shape[0]
    out = np.empty((len(sources), dim), dtype=np.float32)
    base_rows = [(j, s) for j, s in enumerate(sources) if isinstance(s, int)]
    if base_rows and base is not None:
        dst, src = zip(*base_rows, strict=True)
        out[list(dst)] = base[list(src)]
    for j, s in enumerate(sources):
        if isinstance(s, np.ndarray):
            out[j] = s
        elif s is None:
            raise BuildFailed(f"row {j}: no vector (a write logged without dense vectors, and dense is on)")
    return out


# -- the child process -----------------------------------------------------------------------------

def lower_priority(nice: int) -> None:
    """This process's niceness; 19 also selects SCHED_IDLE (only cores nothing else wants)."""
    if nice:
        os.nice(nice)
        if nice >= 19 and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def build(job: BuildJob) -> BuildResult:
    from server.config import config_from_data
    from server.index.wal import read_all
    from server.knowledge import KnowledgeBase
    from server.retrieval.snapshot import load_snapshot, write_snapshot
    from server.retrieval.text import Tokenizer

    crash_at = os.environ.get(CRASH_ENV, "")

    def step(stage: str, done: int = 0, total: int = 0) -> None:
        _emit({"stage": stage, "done": done, "total": total})
        if stage == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    t0 = time.perf_counter()
    cfg = config_from_data({"retrieval": job.retrieval})
    tc = cfg.retrieval.tokenizer
    tokenizer = Tokenizer(lowercase=tc.lowercase, stopwords=tc.stopwords, stem=tc.stem)
    snap = load_snapshot(Path(job.base), tokenizer)  # verifies every checksum of the base
    base_emb = np.load(Path(job.base) / "embeddings.npy", mmap_mode="r") if job.dense else None
    step("loaded", len(snap.kb), len(snap.kb))
    records = list(read_all([Path(s) for s in job.segments]))
    passages, sources = compact([p.id for p in snap.kb.passages], snap.kb.passages, records)
    step("replayed", len(records), len(records))
    kb = KnowledgeBase()
    for p in passages:
        kb.by_id[p.id] = len(kb.passages)
        kb.passages.append(p)
    embeddings = _gather_vectors(np.asarray(base_emb) if base_emb is not None else None, sources) \
        if job.dense else None
    encoder_id = (snap.manifest.get("dense") or {}).get("encoder")
    extra = {"lifecycle": {"version": job.version, "parent": job.base_version, "wal_through": job.wal_through,
                           "records": len(records), **job.extra}}
    write_snapshot(Path(job.out), kb, cfg, tokenizer, embeddings=embeddings, encoder_id=encoder_id, extra=extra,
                   hnsw_threads=job.threads, checkpoint=lambda s: step(s, 1, 1), log=lambda _m: None)
    return BuildResult(job.version, len(kb), job.wal_through, time.perf_counter() - t0, job.out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m server.index.builder JOB.json  (the server writes the job; see the module doc)",
              file=sys.stderr)
        return 2
    job = BuildJob(**json.loads(Path(args[0]).read_text(encoding="utf-8")))
    lower_priority(job.nice)
    try:
        result = build(job)
    except Exception as e:  # reported to the server on stderr, which quotes it
        print(f"snapshot build failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    _emit({"result": asdict(result)})
    return 0


# -- the server side -------------------------------------------------------------------------------

async def run_build(job: BuildJob, on_progress: Callable[[str, int, int], None]) -> BuildResult:
    """Run the builder process for `job`, relaying progress; BuildFailed says how it ended otherwise.
    Cancelling kills the process (its temp dir is removed at the next start or build)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="snaprag-build-", delete=False) as fh:
        json.dump(asdict(job), fh)
        job_path = fh.name
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.index.builder", job_path, cwd=str(REPO),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    result: dict[str, Any] | None = None
    last_stage = "start"
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stderr_task = asyncio.create_task(proc.stderr.read())
        async for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if "result" in msg:
                result = msg["result"]
            else:
                last_stage = str(msg.get("stage", last_stage))
                on_progress(last_stage, int(msg.get("done", 0)), int(msg.get("total", 0)))
        rc = await proc.wait()
        err = (await stderr_task).decode("utf-8", "replace").strip()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    finally:
        os.unlink(job_path)
    if rc != 0 or result is None:
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        tail = err.splitlines()[-1] if err else "no error output"
        raise BuildFailed(f"the snapshot builder for {job.version} stopped after stage '{last_stage}' ({how}: "
                          f"{tail})")
    return BuildResult(**result)


if __name__ == "__main__":
    sys.exit(main())
