"""Offline retrieval evaluation: BEIR-layout collections and our knowledge bases' golden sets.

Metrics follow trec_eval / BEIR conventions: nDCG@10 with linear gains (the qrels grade), MRR@10,
Recall@100 (share of the relevant documents found in the top 100) and Hit@5 (at least one relevant
document in the top 5), each averaged over queries that have at least one relevant document.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.knowledge import KnowledgeBase, KnowledgeBaseError, knowledge_base_from, load_corpus_records

Qrels = Mapping[str, Mapping[str, int]]
METRICS = ("ndcg@10", "mrr@10", "recall@100", "hit@5")


@dataclass
class Collection:
    kb: KnowledgeBase
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def load_beir(corpus: Path, queries: Path, qrels: Path) -> Collection:
    kb = knowledge_base_from(load_corpus_records(corpus))
    qs: dict[str, str] = {}
    with queries.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                    qs[str(obj["_id"])] = str(obj["text"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise KnowledgeBaseError(f"{queries}:{lineno}: expected {{\"_id\", \"text\"}} ({e})") from e
    judged: dict[str, dict[str, int]] = {}
    with qrels.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for lineno, row in enumerate(reader, 1):
            if not row or (lineno == 1 and not row[-1].strip().lstrip("-").isdigit()):
                continue  # the header line ("query-id corpus-id score")
            if len(row) < 3:
                raise KnowledgeBaseError(f"{qrels}:{lineno}: expected query-id, corpus-id, score")
            judged.setdefault(row[0], {})[row[1]] = int(row[2])
    judged = {q: r for q, r in judged.items() if q in qs}
    return Collection(kb, {q: qs[q] for q in judged}, judged)


def ndcg(ranked: Sequence[str], rels: Mapping[str, int], k: int = 10) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr(ranked: Sequence[str], rels: Mapping[str, int], k: int = 10) -> float:
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall(ranked: Sequence[str], rels: Mapping[str, int], k: int = 100) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def hit(ranked: Sequence[str], rels: Mapping[str, int], k: int = 5) -> float:
    return 1.0 if any(rels.get(d, 0) > 0 for d in ranked[:k]) else 0.0


def score_run(run: Mapping[str, Sequence[str]], qrels: Qrels) -> dict[str, float]:
    per = {m: 0.0 for m in METRICS}
    n = 0
    for q, rels in qrels.items():
        if not any(r > 0 for r in rels.values()):
            continue
        ranked = run.get(q, [])
        per["ndcg@10"] += ndcg(ranked, rels)
        per["mrr@10"] += mrr(ranked, rels)
        per["recall@100"] += recall(ranked, rels)
        per["hit@5"] += hit(ranked, rels)
        n += 1
    return {m: v / n if n else 0.0 for m, v in per.items()}


def run_method(search: Callable[[str], list[str]], queries: Mapping[str, str], *, label: str,
               progress: bool = True) -> tuple[dict[str, list[str]], float]:
    """Run every query; returns the run and the mean milliseconds per query."""
    run: dict[str, list[str]] = {}
    t0 = time.perf_counter()
    for i, (q, text) in enumerate(queries.items(), 1):
        run[q] = search(text)
        if progress and (i % 100 == 0 or i == len(queries)):
            print(f"\r  {label}: {i}/{len(queries)} queries", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return run, (time.perf_counter() - t0) * 1000 / max(len(queries), 1)


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    head = "| method | nDCG@10 | MRR@10 | Recall@100 | Hit@5 | ms/query |\n|---|---|---|---|---|---|\n"
    rows = [f"| {name} | {r['ndcg@10']:.3f} | {r['mrr@10']:.3f} | {r['recall@100']:.3f} | {r['hit@5']:.3f} | "
            f"{r.get('ms_per_query', float('nan')):.2f} |" for name, r in results.items()]
    return head + "\n".join(rows)
