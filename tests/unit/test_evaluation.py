"""Retrieval metrics against hand-computed values, and BEIR file loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from server.evaluation import hit, load_beir, mrr, ndcg, recall, score_run


def test_ndcg_hand_computed() -> None:
    rels = {"a": 1, "b": 2}
    ranked = ["x", "b", "a"]
    dcg = 2 / math.log2(3) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg(ranked, rels) == pytest.approx(dcg / idcg)
    assert ndcg(["b", "a"], rels) == pytest.approx(1.0)
    assert ndcg(["x"] * 10 + ["a"], rels) == 0.0  # beyond the cut-off


def test_mrr_recall_hit() -> None:
    rels = {"a": 1, "c": 1}
    assert mrr(["x", "y", "a"], rels) == pytest.approx(1 / 3)
    assert mrr(["x"], rels) == 0.0
    assert recall(["a", "x"], rels) == 0.5 and recall(["a", "c"], rels) == 1.0
    assert hit(["x", "x", "x", "x", "c"], rels) == 1.0 and hit(["x"] * 5 + ["a"], rels) == 0.0


def test_score_run_averages_over_judged_queries() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"z": 0}}  # q3 has no relevant doc: not counted
    run = {"q1": ["a"], "q2": ["x", "b"]}
    out = score_run(run, qrels)
    assert out["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert out["hit@5"] == 1.0


def test_load_beir_skips_header_and_unjudged_queries(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "one"}\n'
                                           '{"_id": "d2", "title": "", "text": "two"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "1", "text": "first"}\n{"_id": "2", "text": "second"}\n')
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n1\td2\t1\n")
    col = load_beir(tmp_path / "corpus.jsonl", tmp_path / "queries.jsonl", tmp_path / "qrels.tsv")
    assert len(col.kb) == 2 and col.queries == {"1": "first"} and col.qrels == {"1": {"d2": 1}}
