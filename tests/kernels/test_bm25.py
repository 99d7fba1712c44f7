"""kernels/bm25 against the reference, `rank_bm25.BM25Okapi`, fed the SAME tokens.

Our weights are float32 (rank_bm25 works in float64); 1e-6 relative is what we promise. Measured on
these corpora the worst error uses about 15 % of that tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from rank_bm25 import BM25Okapi

from kernels.bm25 import build_okapi, okapi_idf, score
from kernels.topk import top_k
from server.config import Bm25Config
from server.knowledge import load_golden, load_knowledge_base
from server.retrieval.sparse import SparseRetriever
from server.retrieval.text import Tokenizer

REPO = Path(__file__).resolve().parents[2]
KB_DIRS = (REPO / "data/kb/voice", REPO / "data/kb/warehouse")
RTOL = ATOL = 1e-6
TOP = 10


def index(raw_docs: Sequence[Sequence[str]]) -> tuple[dict[str, int], list[list[int]]]:
    """Term ids in order of first appearance, as SparseRetriever assigns them."""
    vocab: dict[str, int] = {}
    docs = [[vocab.setdefault(t, len(vocab)) for t in doc] for doc in raw_docs]
    return vocab, docs


def query_ids(vocab: dict[str, int], tokens: Sequence[str]) -> list[int]:
    return [vocab.get(t, -1) for t in tokens]


def assert_same_top(ours: npt.NDArray[np.int64], ref_scores: npt.NDArray[np.float64], k: int) -> None:
    """Same documents in the same order as the reference's argsort, ties aside."""
    expected = np.argsort(-ref_scores, kind="stable")[:k]
    assert ours.shape == expected.shape
    # Equally good documents position by position (a tie may swap two of them) ...
    np.testing.assert_allclose(ref_scores[ours], ref_scores[expected], rtol=RTOL, atol=ATOL)
    # ... and wherever a document's score is not tied with another one, exactly that document.
    for pos, doc in enumerate(expected):
        near = np.abs(ref_scores - ref_scores[doc]) <= ATOL + RTOL * abs(ref_scores[doc])
        if near.sum() == 1:
            assert ours[pos] == doc, f"rank {pos}: expected doc {doc}, got {ours[pos]}"


# ---------------------------------------------------------------------------------------------
# Random corpora


def random_corpus(seed: int, vocab_size: int) -> tuple[list[list[str]], list[list[str]]]:
    rng = np.random.default_rng([seed, vocab_size])
    n_docs = int(rng.integers(20, 250))
    lengths = rng.integers(0, 60, n_docs)
    lengths[int(rng.integers(n_docs))] = 0  # at least one empty document
    # Zipf-distributed term ids: a few very common terms (negative idf, floored) and a long tail.
    raw = [[f"t{x}" for x in rng.zipf(1.3, int(n)) % vocab_size] for n in lengths]
    vocab = sorted({t for doc in raw for t in doc})
    queries: list[list[str]] = []
    for _ in range(25):
        q = [vocab[i] for i in rng.integers(0, len(vocab), int(rng.integers(1, 8)))]
        queries.append(q)
    queries += [
        [vocab[0]] * 3,  # a repeated term adds once per occurrence
        [vocab[-1], "oov-a", vocab[-1], "oov-b"],  # out-of-vocabulary terms (-1 for ours) add nothing
        ["oov-only"],
        vocab[:40],  # long query
    ]
    return raw, queries


@pytest.mark.parametrize("vocab_size", [3, 40, 2000])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_corpus_scores_match_reference(seed: int, vocab_size: int) -> None:
    raw, queries = random_corpus(seed, vocab_size)
    assert any(not doc for doc in raw)
    vocab, docs = index(raw)
    matrix = build_okapi(docs, len(vocab))
    ref = BM25Okapi(raw)

    assert matrix.n_docs == len(raw) and matrix.n_terms == len(vocab)
    np.testing.assert_allclose(matrix.idf, [ref.idf[t] for t in vocab], rtol=1e-12, atol=1e-12)
    for q in queries:
        ours = score(matrix, query_ids(vocab, q))
        expected = ref.get_scores(q)
        assert ours.dtype == np.float32 and ours.shape == (len(raw),)
        np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL, err_msg=f"query {q}")
        idx, _ = top_k(ours, TOP)
        assert_same_top(idx, expected, TOP)


def test_repeated_query_term_adds_once_per_occurrence() -> None:
    raw, _ = random_corpus(7, 40)
    vocab, docs = index(raw)
    matrix = build_okapi(docs, len(vocab))
    once = score(matrix, [0])
    assert once.max() > 0
    np.testing.assert_allclose(score(matrix, [0, 0, 0]), 3 * once, rtol=RTOL, atol=ATOL)


def test_out_of_vocabulary_terms_score_nothing() -> None:
    raw, _ = random_corpus(8, 40)
    vocab, docs = index(raw)
    matrix = build_okapi(docs, len(vocab))
    assert not score(matrix, [-1, -1]).any()
    np.testing.assert_array_equal(score(matrix, [-1, 2, -1]), score(matrix, [2]))


def test_empty_document_scores_zero() -> None:
    raw = [["a", "b"], [], ["b", "c", "c"]]
    vocab, docs = index(raw)
    ours = score(build_okapi(docs, len(vocab)), query_ids(vocab, ["a", "b", "c"]))
    assert ours[1] == 0.0
    np.testing.assert_allclose(ours, BM25Okapi(raw).get_scores(["a", "b", "c"]), rtol=RTOL, atol=ATOL)


def test_out_buffer_is_reset_and_reused() -> None:
    raw, _ = random_corpus(9, 40)
    vocab, docs = index(raw)
    matrix = build_okapi(docs, len(vocab))
    buf = np.full(matrix.n_docs, 123.0, dtype=np.float32)
    got = score(matrix, [1, 2], out=buf)
    assert got is buf
    np.testing.assert_array_equal(got, score(matrix, [1, 2]))


def test_empty_corpus() -> None:
    matrix = build_okapi([], 0)
    assert matrix.n_docs == 0 and matrix.n_terms == 0
    assert score(matrix, [-1]).shape == (0,)


def test_term_ids_absent_from_every_document_do_not_shift_the_idf_floor() -> None:
    # 'b' is in every document (negative idf, floored); ids 3..9 are in the id space but in no document.
    raw = [["a", "b", "b"], ["b", "c"], ["b", "a"], ["b"]]
    vocab, docs = index(raw)
    matrix = build_okapi(docs, n_terms=len(vocab) + 7)
    q = ["b", "a"]
    np.testing.assert_allclose(score(matrix, query_ids(vocab, q)), BM25Okapi(raw).get_scores(q),
                               rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# IDF and parameters


def test_okapi_idf_floors_terms_in_more_than_half_the_docs() -> None:
    n_docs, eps = 10, 0.25
    doc_freq = np.array([1, 3, 5, 6, 9], dtype=np.int64)
    raw = [math.log(n_docs - df + 0.5) - math.log(df + 0.5) for df in doc_freq.tolist()]
    floor = eps * sum(raw) / len(raw)
    idf = okapi_idf(doc_freq, n_docs, eps)
    assert raw[3] < 0 and raw[4] < 0  # in 6 and 9 of 10 documents
    np.testing.assert_allclose(idf, [raw[0], raw[1], 0.0, floor, floor], rtol=1e-12, atol=1e-12)
    # In exactly half the documents the idf is 0: not negative, so not floored.
    assert idf[2] == 0.0
    assert okapi_idf(np.empty(0, np.int64), 0, eps).shape == (0,)


def test_okapi_idf_floor_equals_reference() -> None:
    raw = [["common", "x"], ["common"], ["common", "y"], ["z"], ["common", "x", "z"]]
    ref = BM25Okapi(raw)
    vocab, docs = index(raw)
    matrix = build_okapi(docs, len(vocab))
    common = vocab["common"]
    assert ref.idf["common"] == pytest.approx(ref.epsilon * ref.average_idf)
    assert matrix.idf[common] == pytest.approx(ref.idf["common"], rel=1e-12)
    assert matrix.idf[common] > 0  # floored to a positive share of the (positive) mean


@pytest.mark.parametrize(("k1", "b", "epsilon"),
                         [(1.2, 0.75, 0.25), (2.0, 0.0, 0.5), (0.5, 0.95, 0.1), (1.5, 0.3, 1.0)])
def test_parameters_are_passed_through(k1: float, b: float, epsilon: float) -> None:
    raw, queries = random_corpus(11, 3)  # three terms: every one is common, so epsilon matters
    vocab, docs = index(raw)
    default = build_okapi(docs, len(vocab))
    tuned = build_okapi(docs, len(vocab), k1=k1, b=b, epsilon=epsilon)
    ref = BM25Okapi(raw, k1=k1, b=b, epsilon=epsilon)
    changed = False
    for q in queries:
        ids = query_ids(vocab, q)
        ours = score(tuned, ids)
        np.testing.assert_allclose(ours, ref.get_scores(q), rtol=RTOL, atol=ATOL, err_msg=f"query {q}")
        changed = changed or not np.allclose(ours, score(default, ids))
    assert changed, "the parameters had no effect"


def test_full_length_normalisation_keeps_empty_documents_finite() -> None:
    # b = 1 makes an empty document's norm 0; rank_bm25 computes 0/0 = NaN for it, we score it 0.
    raw = [["a", "b"], [], ["a"]]
    vocab, docs = index(raw)
    ours = score(build_okapi(docs, len(vocab), b=1.0), query_ids(vocab, ["a"]))
    assert np.isfinite(ours).all() and ours[1] == 0.0
    with np.errstate(invalid="ignore"):
        expected = BM25Okapi(raw, b=1.0).get_scores(["a"])
    np.testing.assert_allclose(ours[[0, 2]], expected[[0, 2]], rtol=RTOL, atol=ATOL)


def test_config_defaults_are_rank_bm25_defaults() -> None:
    cfg = Bm25Config()
    ref = BM25Okapi([["a"]])
    assert (cfg.k1, cfg.b, cfg.epsilon) == (ref.k1, ref.b, ref.epsilon)


# ---------------------------------------------------------------------------------------------
# The real knowledge bases


def golden_queries() -> list[str]:
    questions = [q.question for folder in KB_DIRS for split in ("train", "dev") for q in load_golden(folder, split)]
    return questions[::8]  # ~50, spread over both KBs and both splits


@pytest.fixture(scope="module")
def kb_index():  # type: ignore[no-untyped-def]
    kb = load_knowledge_base(list(KB_DIRS))
    tokenizer = Tokenizer()
    # The text SparseRetriever indexes: passage text, fault code and source title.
    raw = [tokenizer(f"{p.text} {p.fault_code} {p.source}") for p in kb.passages]
    vocab, docs = index(raw)
    retriever = SparseRetriever(kb, tokenizer, Bm25Config(variant="okapi"), apply_confidence=False)
    return tokenizer, vocab, build_okapi(docs, len(vocab)), BM25Okapi(raw), retriever


def test_golden_query_sample_size() -> None:
    assert 45 <= len(golden_queries()) <= 60


@pytest.mark.parametrize("question", golden_queries())
def test_knowledge_base_scores_match_reference(kb_index, question: str) -> None:  # type: ignore[no-untyped-def]
    tokenizer, vocab, matrix, ref, retriever = kb_index
    tokens = tokenizer(question)
    expected = ref.get_scores(tokens)
    ours = score(matrix, query_ids(vocab, tokens))
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL, err_msg=question)
    idx, _ = top_k(ours, TOP)
    assert_same_top(idx, expected, TOP)
    # The retriever builds the same index: its hits carry the reference's scores, best first.
    hits = retriever.search(question, TOP)
    assert hits
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1][: len(hits)], rtol=RTOL, atol=ATOL)
