"""kernels/bm25 `lucene` variant against the reference, `bm25s.BM25(method="lucene")`, fed the SAME tokens.

bm25s is given our term ids and vocabulary as its `(corpus_token_ids, vocab)` tuple, so both index the
same ids; queries go in as id lists with out-of-vocabulary terms (our -1) left out, as bm25s does
itself. The reference runs with dtype="float64": its default float32 rounds its own idfs and sums, and
we compare against the exact value. Our float32 weights and float32 sums stay within 1e-6 relative: each
matching query term adds at most 2**-24 relative error (kernels/bm25.py docstring), and lucene weights
are all positive, so nothing cancels. Also here: the variant selector, and the dense-row scoring path
both variants share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import numpy.typing as npt
import pytest

from kernels.bm25 import VARIANTS, build, build_lucene, build_okapi, lucene_idf, score
from kernels.topk import top_k
from server.knowledge import load_golden, load_knowledge_base
from server.retrieval.text import Tokenizer
from tests.kernels.test_bm25 import index, query_ids

REPO = Path(__file__).resolve().parents[2]
KB_DIRS = (REPO / "data/kb/voice", REPO / "data/kb/warehouse")
RTOL = 1e-6
TOP = 10


def reference(vocab: dict[str, int], docs: list[list[int]], *, k1: float = 1.5, b: float = 0.75,
              dtype: str = "float64") -> bm25s.BM25:
    ref = bm25s.BM25(method="lucene", k1=k1, b=b, dtype=dtype)
    # A copy: bm25s adds its empty token to the vocabulary it is given.
    ref.index((docs, dict(vocab)), create_empty_token=False, show_progress=False)
    return ref


def reference_scores(ref: bm25s.BM25, ids: Sequence[int], n_docs: int) -> npt.NDArray[np.float64]:
    known = [int(t) for t in ids if t >= 0]
    if not known:  # bm25s rejects an empty query; it would score nothing
        return np.zeros(n_docs)
    return np.asarray(ref.get_scores(known), dtype=np.float64)


def assert_close(ours: npt.NDArray[np.float32], expected: npt.NDArray[np.float64], msg: str = "") -> None:
    # atol 0: a document sharing no query term scores exactly 0 in both.
    np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=0.0, err_msg=msg)


def assert_same_top(ours: npt.NDArray[np.int64], ref_scores: npt.NDArray[np.float64], k: int) -> None:
    """Same documents in the same order as the reference's stable argsort, ties aside."""
    expected = np.argsort(-ref_scores, kind="stable")[:k]
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ref_scores[ours], ref_scores[expected], rtol=RTOL, atol=0.0)
    for pos, doc in enumerate(expected):
        near = np.abs(ref_scores - ref_scores[doc]) <= RTOL * abs(ref_scores[doc])
        if near.sum() == 1:
            assert ours[pos] == doc, f"rank {pos}: expected doc {doc}, got {ours[pos]}"


# ---------------------------------------------------------------------------------------------
# Random corpora


def random_corpus(seed: int, vocab_size: int) -> tuple[list[list[str]], list[list[str]]]:
    rng = np.random.default_rng([seed, vocab_size, 25])
    n_docs = int(rng.integers(20, 300))
    lengths = rng.integers(0, 60, n_docs)
    lengths[int(rng.integers(n_docs))] = 0  # at least one empty document
    # Zipf-distributed term ids: a few terms in almost every document (idf near 0) and a long tail.
    raw = [[f"t{x}" for x in rng.zipf(1.3, int(n)) % vocab_size] for n in lengths]
    vocab = sorted({t for doc in raw for t in doc})
    queries = [[vocab[i] for i in rng.integers(0, len(vocab), int(rng.integers(1, 9)))] for _ in range(30)]
    queries += [
        [vocab[0]] * 3,  # a repeated term adds once per occurrence
        [vocab[-1], "oov-a", vocab[-1], "oov-b"],  # out-of-vocabulary terms add nothing
        ["oov-only"],
        vocab[:16],  # long query
    ]
    return raw, queries


@pytest.mark.parametrize("vocab_size", [3, 40, 2000])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_corpus_scores_match_reference(seed: int, vocab_size: int) -> None:
    raw, queries = random_corpus(seed, vocab_size)
    vocab, docs = index(raw)
    matrix = build_lucene(docs, len(vocab))
    ref = reference(vocab, docs)
    assert matrix.n_docs == len(raw) and matrix.n_terms == len(vocab)
    for q in queries:
        ids = query_ids(vocab, q)
        ours = score(matrix, ids)
        expected = reference_scores(ref, ids, len(raw))
        assert ours.dtype == np.float32 and ours.shape == (len(raw),)
        assert_close(ours, expected, f"query {q}")
        idx, _ = top_k(ours, TOP)
        assert_same_top(idx, expected, TOP)


@pytest.mark.parametrize(("k1", "b"), [(1.2, 0.75), (0.9, 0.4), (2.0, 0.0), (1.5, 1.0)])
def test_parameters_are_passed_through(k1: float, b: float) -> None:
    raw, queries = random_corpus(11, 40)
    vocab, docs = index(raw)
    default, tuned = build_lucene(docs, len(vocab)), build_lucene(docs, len(vocab), k1=k1, b=b)
    ref = reference(vocab, docs, k1=k1, b=b)
    changed = False
    for q in queries:
        ids = query_ids(vocab, q)
        ours = score(tuned, ids)
        assert np.isfinite(ours).all()  # b = 1: an empty document has norm 0, but no postings either
        assert_close(ours, reference_scores(ref, ids, len(raw)), f"query {q}")
        changed = changed or not np.allclose(ours, score(default, ids))
    assert changed, "the parameters had no effect"


def test_lucene_idf_is_positive_for_every_document_frequency() -> None:
    n_docs = 10
    doc_freq = np.arange(0, n_docs + 1, dtype=np.int64)
    expected = [np.log(1 + (n_docs - df + 0.5) / (df + 0.5)) for df in doc_freq.tolist()]
    idf = lucene_idf(doc_freq, n_docs)
    np.testing.assert_allclose(idf, expected, rtol=1e-12)
    assert (idf > 0).all() and idf[-1] == pytest.approx(np.log1p(0.5 / 10.5), rel=1e-15)


def test_empty_corpus_and_empty_documents() -> None:
    empty = build_lucene([], 0)
    assert empty.n_docs == 0 and empty.n_terms == 0 and score(empty, [-1]).shape == (0,)
    raw = [["a", "b"], [], ["b", "c", "c"]]
    vocab, docs = index(raw)
    ours = score(build_lucene(docs, len(vocab)), query_ids(vocab, ["a", "b", "c"]))
    assert ours[1] == 0.0
    assert_close(ours, reference_scores(reference(vocab, docs), query_ids(vocab, ["a", "b", "c"]), 3))


# ---------------------------------------------------------------------------------------------
# The selector and the shared scoring paths


def test_selector_builds_each_variant() -> None:
    raw, queries = random_corpus(5, 40)
    vocab, docs = index(raw)
    assert VARIANTS == ("okapi", "lucene")
    pairs = [(build("okapi", docs, len(vocab), k1=1.2, b=0.6, epsilon=0.5),
              build_okapi(docs, len(vocab), k1=1.2, b=0.6, epsilon=0.5)),
             (build("lucene", docs, len(vocab), k1=1.2, b=0.6), build_lucene(docs, len(vocab), k1=1.2, b=0.6))]
    for via_selector, direct in pairs:
        np.testing.assert_array_equal(via_selector.weights, direct.weights)
        np.testing.assert_array_equal(via_selector.doc_ids, direct.doc_ids)
    ids = query_ids(vocab, queries[0])
    assert not np.array_equal(score(pairs[0][0], ids), score(pairs[1][0], ids))


@pytest.mark.parametrize("variant", ["bm25+", "Lucene", "", "robertson"])
def test_selector_rejects_unknown_variants_naming_the_valid_ones(variant: str) -> None:
    with pytest.raises(ValueError, match=r"unknown BM25 variant .*'okapi', 'lucene'"):
        build(variant, [[0]], 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("builder", [build_okapi, build_lucene])
def test_dense_rows_score_exactly_as_the_postings(builder) -> None:  # type: ignore[no-untyped-def]
    """Common terms also get a dense row; adding it must give the same floats as scattering the postings."""
    raw, queries = random_corpus(3, 40)
    vocab, docs = index(raw)
    matrix = builder(docs, len(vocab))
    heavy = np.flatnonzero(matrix.dense_row >= 0).tolist()
    assert heavy and len(heavy) < matrix.n_terms  # both paths are exercised
    for ids in [*(query_ids(vocab, q) for q in queries), heavy, heavy[::-1] * 2]:
        expected = np.zeros(matrix.n_docs, dtype=np.float32)
        for t in ids:
            if t >= 0:
                lo, hi = matrix.indptr[t], matrix.indptr[t + 1]
                np.add.at(expected, matrix.doc_ids[lo:hi], matrix.weights[lo:hi])
        np.testing.assert_array_equal(score(matrix, ids), expected)


def test_out_buffer_is_reset_and_reused() -> None:
    raw, _ = random_corpus(9, 40)
    vocab, docs = index(raw)
    matrix = build_lucene(docs, len(vocab))
    buf = np.full(matrix.n_docs, 123.0, dtype=np.float32)
    got = score(matrix, [0, 1, 2], out=buf)
    assert got is buf
    np.testing.assert_array_equal(got, score(matrix, [0, 1, 2]))


# ---------------------------------------------------------------------------------------------
# The real knowledge bases


def golden_questions() -> list[str]:
    return [q.question for folder in KB_DIRS for split in ("train", "dev") for q in load_golden(folder, split)]


@pytest.fixture(scope="module")
def kb_index():  # type: ignore[no-untyped-def]
    kb = load_knowledge_base(list(KB_DIRS))
    tokenizer = Tokenizer()
    # The text SparseRetriever indexes: passage text, fault code and source title.
    raw = [tokenizer(f"{p.text} {p.fault_code} {p.source}") for p in kb.passages]
    vocab, docs = index(raw)
    return tokenizer, vocab, docs, build_lucene(docs, len(vocab)), reference(vocab, docs)


def test_knowledge_base_scores_match_reference(kb_index) -> None:  # type: ignore[no-untyped-def]
    tokenizer, vocab, docs, matrix, ref = kb_index
    questions = golden_questions()
    assert len(questions) >= 100
    for question in questions:
        ids = query_ids(vocab, tokenizer(question))
        expected = reference_scores(ref, ids, len(docs))
        ours = score(matrix, ids)
        assert_close(ours, expected, question)
        idx, _ = top_k(ours, TOP, min_score=0.0)
        assert_same_top(idx, expected, min(TOP, int(np.count_nonzero(expected > 0))))


def test_knowledge_base_matches_bm25s_defaults_to_float32_precision(kb_index) -> None:  # type: ignore[no-untyped-def]
    """Out of the box bm25s works in float32 too (its idfs, weights and sums): agreement is float32-sized."""
    tokenizer, vocab, docs, matrix, _ = kb_index
    ref32 = reference(vocab, docs, dtype="float32")
    for question in golden_questions()[::4]:
        ids = query_ids(vocab, tokenizer(question))
        np.testing.assert_allclose(score(matrix, ids), reference_scores(ref32, ids, len(docs)), rtol=1e-5, atol=0.0,
                                   err_msg=question)
