"""The gates a snapshot passes before it is served (seed 002: count >= 99 %, golden recall within 5 %).

    integrity   the manifest reads, every file's sha256 matches, tokenizer and encoder match the server's,
                and it has dense vectors when the server runs dense retrieval
    doc_count   candidate passages >= min_doc_ratio x live passages (skipped with allow_shrink)
    recall@k    candidate golden-set Recall@k >= (1 - max_recall_drop) x the live index's

The candidate is measured as it would be served: the snapshot plus the writes it lacks, re-applied.
"Live" is the view queries get right now. A failed gate raises `GateFailed`, which names each failed
gate and its margin (FAILED_PRECONDITION at the API), and nothing is promoted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.errors import FailedPrecondition
from server.evaluation import recall
from server.knowledge import GoldenQuestion, load_golden


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    candidate: float = 0.0
    live: float = 0.0
    limit: float = 0.0
    detail: str = ""


class GateFailed(FailedPrecondition):
    def __init__(self, version: str, gates: Sequence[GateResult]) -> None:
        failed = [g for g in gates if not g.passed]
        reasons = "; ".join(f"gate {g.name} failed: {g.detail}" for g in failed)
        super().__init__(f"swap to {version} refused, the live index is unchanged: {reasons}")
        self.gates = list(gates)


def integrity_ok(detail: str) -> GateResult:
    return GateResult("integrity", True, detail=detail)


def integrity_failed(error: str) -> GateResult:
    return GateResult("integrity", False, detail=f"{error}")


def doc_count_gate(candidate: int, live: int, min_ratio: float, allow_shrink: bool) -> GateResult:
    ratio = candidate / live if live else 1.0
    if allow_shrink:
        return GateResult("doc_count", True, candidate, live, min_ratio,
                          f"{candidate} vs {live} passages ({ratio:.1%}); not checked (allow_shrink)")
    ok = candidate >= min_ratio * live
    detail = (f"{candidate} passages vs {live} live ({ratio:.1%}, the minimum is {min_ratio:.0%}"
              + ("" if ok else f", {live - candidate} missing; pass --allow-shrink if the shrink is deliberate")
              + ")")
    return GateResult("doc_count", ok, candidate, live, min_ratio, detail)


def recall_gate(candidate: float, live: float, max_drop: float, k: int, questions: int) -> GateResult:
    name = f"recall@{k}"
    if questions == 0:
        return GateResult(name, True, detail="not evaluated: no golden questions ([index] golden_paths)")
    change = (candidate - live) / live if live > 0 else 0.0
    ok = candidate >= (1.0 - max_drop) * live
    detail = (f"candidate {candidate:.3f} vs live {live:.3f} ({change:+.1%}, the limit is {-max_drop:+.1%}) "
              f"over {questions} golden questions")
    return GateResult(name, ok, candidate, live, 1.0 - max_drop, detail)


def golden_recall(search: Callable[[GoldenQuestion], Sequence[str]], questions: Sequence[GoldenQuestion],
                  k: int) -> float:
    """Mean Recall@k (share of each question's relevant passages in its top k) over the questions."""
    if not questions:
        return 0.0
    total = 0.0
    for q in questions:
        total += recall(list(search(q)), {pid: 1 for pid in q.relevant}, k)
    return total / len(questions)


def load_golden_questions(folders: Sequence[Path], splits: Sequence[str]) -> list[GoldenQuestion]:
    out: list[GoldenQuestion] = []
    for folder in folders:
        for split in splits:
            out.extend(q for q in load_golden(folder, split) if q.relevant)
    return out
