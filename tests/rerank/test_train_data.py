"""The re-ranker's training-data builders (server/rerank/train.py), without torch and without training:
inverse cloze, hard-negative mining, group sampling, the tune split, counts, determinism, and the
interpolated serving score."""

from __future__ import annotations

import random

import numpy as np
import pytest

from server.generate.sentences import split_sentences
from server.knowledge import GoldenQuestion, KnowledgeBase, Passage, knowledge_base_from
from server.rerank.train import (
    TrainQuery,
    best_weight,
    build_train_queries,
    drop_one_sentence,
    group_batches,
    inverse_cloze,
    mine_hard_negatives,
    rerank_order,
    sample_group,
    split_tune,
)

TEXTS = {
    "plug-reset": "To reset the smart plug, hold the button for ten seconds. The light blinks red three times. "
                  "Then pair it again in the Lumo app.",
    "plug-pair": "Pair the smart plug from the Lumo app under Add Device. Keep the phone close to the plug. "
                 "Pairing takes about thirty seconds.",
    "hub-setup": "Plug in the hub and wait until the ring pulses orange. Open the app and follow the steps.",
    "fault-e303": "Fault E303 means the lift motor is overheating. Stop the robot and let the motor cool down. "
                  "Report the fault if it repeats within an hour.",
    "one-liner": "A single sentence passage cannot give a cloze query.",
    "dock-clean": "Clean the charging contacts with a dry cloth every week. Dirty contacts slow charging down.",
}


def _kb() -> KnowledgeBase:
    return knowledge_base_from(Passage(id=pid, text=text, intent="x", domain="d", locale="en-US", confidence=1.0,
                                       source="s") for pid, text in TEXTS.items())


def _overlap_search(kb: KnowledgeBase):
    """A stand-in retriever: passages ranked by shared lower-case words (ties by id), all of them."""

    def search(query: str, k: int) -> list[str]:
        words = set(query.lower().split())
        scored = sorted(kb.passages, key=lambda p: (-len(words & set(p.text.lower().split())), p.id))
        return [p.id for p in scored[:k]]

    return search


GOLDEN = [
    GoldenQuestion("q1", "how do i reset my smart plug", ("plug-reset",)),
    GoldenQuestion("q2", "pair the plug with the app", ("plug-pair", "plug-reset")),
    GoldenQuestion("q3", "what is fault e303", ("fault-e303",)),
]


def test_inverse_cloze_removes_the_sentence_from_its_positive() -> None:
    kb = _kb()
    cloze = inverse_cloze(kb, per_passage=2, seed=1, min_words=3)
    assert cloze
    for c in cloze:
        source = kb.passages[kb.by_id[c.passage_id]].text
        assert c.query in source
        assert c.query not in c.context  # the positive no longer contains the sentence
        assert c.context and len(c.context) < len(source)
    assert "one-liner" not in {c.passage_id for c in cloze}  # one sentence: nothing left as the positive
    per_passage = {pid: sum(c.passage_id == pid for c in cloze) for pid in TEXTS}
    assert max(per_passage.values()) <= 2
    assert len({(c.passage_id, c.query) for c in cloze}) == len(cloze)  # distinct sentences


def test_inverse_cloze_respects_word_bounds_and_limit() -> None:
    kb = _kb()
    for c in inverse_cloze(kb, per_passage=3, seed=0, min_words=6, max_words=9):
        assert 6 <= len(c.query.split()) <= 9
    limited = inverse_cloze(kb, per_passage=1, seed=0, min_words=3, limit=2)
    assert len({c.passage_id for c in limited}) <= 2


def test_hard_negatives_never_include_a_relevant_passage() -> None:
    kb = _kb()
    search = _overlap_search(kb)
    relevant = {"plug-pair", "plug-reset"}
    negatives = mine_hard_negatives(search, "pair the smart plug", relevant, depth=10)
    assert negatives and not relevant & set(negatives)
    assert list(negatives) == [pid for pid in search("pair the smart plug", 10) if pid not in relevant]

    queries, _ = build_train_queries(kb, GOLDEN, inverse_cloze(kb, seed=3, min_words=3), search, depth=5)
    rng = random.Random(0)
    for q in queries:
        assert not q.relevant & set(q.negatives)
        for _ in range(20):  # sampled groups too, including the random top-up beyond a short pool
            _, negs = sample_group(q, 4, sorted(TEXTS), rng)
            assert len(negs) == len(set(negs))
            assert not q.relevant & set(negs)


def test_cloze_query_never_gets_its_source_passage_as_a_negative() -> None:
    kb = _kb()
    cloze = inverse_cloze(kb, seed=5, min_words=3)
    queries, _ = build_train_queries(kb, [], cloze, _overlap_search(kb), depth=len(TEXTS))
    for c, q in zip(cloze, queries, strict=True):
        assert q.kind == "ict" and q.relevant == {c.passage_id}
        assert c.passage_id not in q.negatives
        assert q.positives == (c.context,)


def test_cloze_negatives_lose_a_sentence_too() -> None:
    """Cloze negatives get the same one-sentence cut as their positive, so length gives nothing away."""
    rng = random.Random(4)
    original = split_sentences(TEXTS["fault-e303"])
    for _ in range(5):
        cut = split_sentences(drop_one_sentence(TEXTS["fault-e303"], rng))
        assert len(cut) == len(original) - 1 and set(cut) < set(original)
    assert drop_one_sentence(TEXTS["one-liner"], rng) == TEXTS["one-liner"]


def test_counts() -> None:
    kb = _kb()
    cloze = inverse_cloze(kb, seed=2, min_words=3)
    golden = [*GOLDEN, GoldenQuestion("q4", "unknown passage", ("no-such-passage",))]
    queries, counts = build_train_queries(kb, golden, cloze, _overlap_search(kb), depth=3)
    assert counts["golden_questions"] == 3  # q4 has no known relevant passage: dropped, and counted
    assert counts["unknown_relevant_ids"] == 1
    assert counts["golden_positive_pairs"] == 1 + 2 + 1
    assert counts["ict_queries"] == counts["ict_positive_pairs"] == len(cloze)
    assert counts["hard_negative_pairs"] == sum(len(q.negatives) for q in queries)
    assert all(len(q.negatives) <= 3 for q in queries)
    assert len(queries) == counts["golden_questions"] + counts["ict_queries"]


def test_same_seed_same_data_other_seed_other_data() -> None:
    kb = _kb()
    a = inverse_cloze(kb, per_passage=1, seed=11, min_words=3)
    b = inverse_cloze(kb, per_passage=1, seed=11, min_words=3)
    assert a == b
    assert any(inverse_cloze(kb, per_passage=1, seed=s, min_words=3) != a for s in range(12, 20))

    queries, _ = build_train_queries(kb, GOLDEN, a, _overlap_search(kb), depth=4)

    def draws(seed: int) -> list[tuple[str, str, tuple[str, ...]]]:
        batches = group_batches(queries, groups_per_batch=2, golden_share=0.5, seed=seed)
        rng = random.Random(seed)
        out = []
        for _ in range(10):
            for q in next(batches):
                pos, negs = sample_group(q, 2, sorted(TEXTS), rng)
                out.append((q.query, pos, tuple(negs)))
        return out

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert split_tune(GOLDEN, 0.34, 3) == split_tune(GOLDEN, 0.34, 3)


def test_batches_mix_golden_and_cloze() -> None:
    q = [TrainQuery(f"g{i}", ("p",), frozenset(), (), "golden") for i in range(3)]
    q += [TrainQuery(f"c{i}", ("p",), frozenset(), (), "ict") for i in range(5)]
    batches = group_batches(q, groups_per_batch=4, golden_share=0.5, seed=0)
    seen = set()
    for _ in range(6):
        batch = next(batches)
        assert [x.kind for x in batch] == ["golden", "golden", "ict", "ict"]
        seen |= {x.query for x in batch}
    assert seen == {x.query for x in q}  # every query drawn once the streams wrap
    only_cloze = group_batches(q[3:], groups_per_batch=4, golden_share=0.5, seed=0)
    assert all(x.kind == "ict" for x in next(only_cloze))


def test_tune_split_is_disjoint_and_sized() -> None:
    golden = [GoldenQuestion(f"q{i}", f"question {i}", ("p",)) for i in range(50)]
    fit, tune = split_tune(golden, 0.2, 13)
    assert len(tune) == 10 and len(fit) == 40
    assert not {g.id for g in fit} & {g.id for g in tune}
    assert split_tune(golden, 0.0, 13) == (golden, [])


def test_rerank_order_interpolates_and_keeps_the_tail() -> None:
    ids = ["a", "b", "c", "d"]
    fused = np.array([0.9, 0.8, 0.1, 0.05])
    logits = np.array([-4.0, -4.0, 4.0])  # the cross-encoder prefers c; d is beyond the re-ranked window
    assert rerank_order(ids, fused, logits, 1.0) == ["c", "a", "b", "d"]
    assert rerank_order(ids, fused, logits, 0.25) == ["a", "b", "c", "d"]  # a weak weight keeps the fused order
    assert rerank_order(ids, fused, np.zeros(3), 1.0) == ["a", "b", "c", "d"]  # ties keep the fused order


def test_best_weight_prefers_higher_ndcg_then_smaller_w() -> None:
    row = {"ndcg@10": 0.5, "mrr@10": 0.5}
    table = {"w=0.25": row, "w=0.5": {"ndcg@10": 0.6, "mrr@10": 0.5}, "w=0.75": {"ndcg@10": 0.6, "mrr@10": 0.5},
             "w=1": row}
    assert best_weight(table) == 0.5
    with pytest.raises(KeyError):
        best_weight({})
