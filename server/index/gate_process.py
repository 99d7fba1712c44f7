"""The gate evaluation process: a swap candidate measured against the live index, off the server's CPU.

    python -m server.index.gate_process JOB.json

Gate queries are Python-heavy (tokenising, fusion), so inside the server they would compete with
queries for the GIL; and lowering a thread's priority does not help there (a niced thread preempted
while it holds the GIL stalls every query thread). So, like the snapshot builder, this runs as a separate
process at `os.nice(builder_nice)`. It rebuilds both sides from disk exactly as the server has them:

    live       the served snapshot + every logged write after CURRENT's replay_after
    candidate  the candidate snapshot + the logged writes it lacks (after max(replay_after, its wal_through))

and runs the gates of gates.py on them: integrity (load_snapshot verifies every sha256, the tokenizer and
encoder identity), doc_count, and golden Recall@k with query vectors the server encoded (this process
loads no model: vectors come with the job). It prints progress lines, then {"result": {"gates": [...]}}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.index.builder import lower_priority
from server.index.gates import GateResult

REPO = Path(__file__).resolve().parents[2]


@dataclass
class GateJob:
    candidate: str
    candidate_version: str
    live: str
    live_version: str
    segments: list[str]
    """Log segments after CURRENT's replay_after: the writes the live view holds beyond its snapshot."""
    replay_after: int
    retrieval: dict[str, Any]
    index: dict[str, Any]
    allow_shrink: bool
    golden: list[dict[str, Any]] = field(default_factory=list)
    """{"id", "question", "relevant"} per golden question."""
    vectors: str = ""
    """.npy of the golden questions' query vectors, row i for golden[i]; empty = BM25 only."""
    encoder_id: dict[str, Any] | None = None
    nice: int = 10


class _VectorsOnly:
    """Stands in for the encoder: its identity (checked against each snapshot), never its model."""

    def __init__(self, identity: dict[str, Any]) -> None:
        self.model_id = identity.get("model_id")
        self.fingerprint = identity.get("fingerprint")
        self.max_length = identity.get("max_length")

    def encode_query(self, text: str) -> Any:
        raise RuntimeError("the gate process has no encoder; query vectors come with the job")


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def evaluate(job: GateJob) -> list[GateResult]:
    from server.config import config_from_data
    from server.index.gates import doc_count_gate, golden_recall, integrity_failed, integrity_ok, recall_gate
    from server.index.generation import Generation
    from server.index.wal import read_all
    from server.knowledge import GoldenQuestion, KnowledgeBaseError
    from server.retrieval.snapshot import SnapshotError, load_snapshot
    from server.retrieval.text import Tokenizer

    cfg = config_from_data({"retrieval": job.retrieval, "index": job.index})
    tc = cfg.retrieval.tokenizer
    tok = Tokenizer(lowercase=tc.lowercase, stopwords=tc.stopwords, stem=tc.stem)
    enc = _VectorsOnly(job.encoder_id) if job.encoder_id else None
    records = list(read_all([Path(s) for s in job.segments]))
    _emit({"stage": "gates: live", "done": 0, "total": 0})
    live = Generation(load_snapshot(Path(job.live), tok, encoder=enc), job.live_version, cfg, tok, enc)
    for r in records:
        live.apply(r)
    _emit({"stage": "gates: candidate", "done": 0, "total": 0})
    try:
        snap = load_snapshot(Path(job.candidate), tok, encoder=enc)
        cand = Generation(snap, job.candidate_version, cfg, tok, enc)
    except (SnapshotError, ValueError, OSError, KnowledgeBaseError) as e:
        return [integrity_failed(str(e))]
    gates = [integrity_ok(f"manifest and {len(snap.manifest.get('files', {}))} files verified (sha256)")]
    replay_after = max(job.replay_after, int((snap.manifest.get("lifecycle") or {}).get("wal_through", 0)))
    for r in records:
        if r.segment > replay_after:
            cand.apply(r)
    cv, lv = cand.view(0), live.view(0)
    ix = cfg.index
    gates.append(doc_count_gate(len(cv), len(lv), ix.min_doc_ratio, job.allow_shrink))
    questions = [GoldenQuestion(id=g["id"], question=g["question"], relevant=tuple(g["relevant"]))
                 for g in job.golden]
    vectors = np.load(job.vectors) if job.vectors else None
    vec_of = {q.question: vectors[i] for i, q in enumerate(questions)} if vectors is not None else {}
    if (cand.dense is None) != (live.dense is None):
        vec_of = {}
    total = 2 * len(questions)
    done = [0]

    def searcher(view: Any) -> Callable[[GoldenQuestion], list[str]]:
        mode = None if vec_of else "sparse"

        def search(q: GoldenQuestion) -> list[str]:
            done[0] += 1
            if done[0] % 50 == 0 or done[0] == total:
                _emit({"stage": "gates: recall", "done": done[0], "total": total})
            return [h.passage.id for h in view.search(q.question, ix.recall_k, mode=mode,
                                                      query_vector=vec_of.get(q.question))]
        return search

    c_recall = golden_recall(searcher(cv), questions, ix.recall_k)
    l_recall = golden_recall(searcher(lv), questions, ix.recall_k)
    gates.append(recall_gate(c_recall, l_recall, ix.max_recall_drop, ix.recall_k, len(questions)))
    return gates


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m server.index.gate_process JOB.json  (the server writes the job)", file=sys.stderr)
        return 2
    job = GateJob(**json.loads(Path(args[0]).read_text(encoding="utf-8")))
    lower_priority(job.nice)
    try:
        gates = evaluate(job)
    except Exception as e:  # quoted by the server
        print(f"gate evaluation failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    _emit({"result": {"gates": [asdict(g) for g in gates]}})
    return 0


class GateProcessFailed(RuntimeError):
    pass


def run_gates(job: GateJob, vectors: np.ndarray | None, progress: Callable[[str, int, int], None],
              ) -> list[GateResult]:
    """Run the gate process for `job` (blocking: the server calls it from its lifecycle thread)."""
    with tempfile.TemporaryDirectory(prefix="snaprag-gates-") as tmp:
        if vectors is not None:
            job.vectors = str(Path(tmp) / "golden.npy")
            np.save(job.vectors, vectors)
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(asdict(job)), encoding="utf-8")
        err_path = Path(tmp) / "stderr.txt"
        with err_path.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "server.index.gate_process", str(job_path)], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            result = None
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    try:
                        msg = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if "result" in msg:
                        result = msg["result"]
                    else:
                        progress(str(msg.get("stage", "gates")), int(msg.get("done", 0)), int(msg.get("total", 0)))
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if rc != 0 or result is None:
            tail = (err_path.read_text(errors="replace").strip().splitlines() or ["no error output"])[-1]
            raise GateProcessFailed(f"the gate evaluation for {job.candidate_version} did not finish (exit {rc}: "
                                    f"{tail}); the live index is unchanged")
    return [GateResult(**g) for g in result["gates"]]


if __name__ == "__main__":
    sys.exit(main())
