"""BM25 over a CSR term-document matrix, in two variants that share one builder.

The index is built once: for every term, its posting list (the documents containing it) and, per
posting, the term's whole BM25 contribution to that document (idf * saturated tf, length-normalised).
Scoring a query then touches only the posting lists of the query's terms: one scatter-add per term,
no per-document Python loop. A repeated query term adds again for each occurrence (as the references do).

Both variants share the saturation and length normalisation of Robertson & Zaragoza 2009 (eq. 3.30),
with dl = the document's token count (repeats included) and avgdl = the mean of dl over all documents
(empty ones included), as rank_bm25 and bm25s both compute them:

    weight(t, d) = idf(t) * tf * s / (tf + k1 * (1 - b + b * dl / avgdl))

- `okapi`  = rank_bm25.BM25Okapi, the reference in tests/kernels/test_bm25.py: s = k1 + 1 and
  idf(t) = ln(N - n_t + 0.5) - ln(n_t + 0.5); negative idfs (terms in more than half the documents)
  are replaced by epsilon * mean(idf over the terms that occur) so that very common terms still count a little.
- `lucene` = bm25s.BM25(method="lucene"), the reference in tests/kernels/test_bm25_lucene.py:
  s = 1 (Lucene dropped the constant (k1 + 1) numerator in 8.0, LUCENE-8563: it rescales every score
  equally and changes no ranking) and idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)), which is positive
  for every n_t <= N, so no floor is needed (Kamphuis et al., ECIR 2020, "Which BM25 do you mean?").

Precision: weights are float32 (half the memory of float64) and are accumulated in float32. Each stored
weight is within 2**-24 (6e-8) relative of its float64 value; with positive weights (always for lucene,
and for okapi unless the idf floor is negative) a document matching m query terms gets a relative
error of at most m * 2**-24, i.e. below the 1e-6 the tests promise for up to 16 matching terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]

Variant = Literal["okapi", "lucene"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)

# A term in at least this fraction of the documents also gets a dense row of weights (zeros where
# absent): adding a contiguous row is several times faster than scattering its postings, and the most
# common terms are where a query's time goes (Zipf). Each such row costs 4 * N bytes <= 16 * df bytes,
# so the rows never take more than twice the memory of the CSR arrays (8 bytes a posting).
DENSE_MIN_DOC_FRACTION = 0.25


@dataclass(frozen=True, slots=True)
class Bm25Matrix:
    """Term-major CSR: postings of term t are [indptr[t], indptr[t+1]).

    Constructed from the five CSR fields (by the builders below, or from a snapshot); the dense rows
    of the most common terms are derived from them on construction.
    """

    indptr: I64  # (n_terms + 1,)
    doc_ids: I32  # (nnz,) document of each posting, ascending within a term
    weights: F32  # (nnz,) BM25 contribution of the term to that document
    idf: F64  # (n_terms,)
    n_docs: int
    dense_row: I32 = field(init=False, repr=False, compare=False)
    """(n_terms,) row of `dense` that holds term t's weights, or -1 when t only has its postings."""
    dense: F32 = field(init=False, repr=False, compare=False)
    """(n_dense, n_docs) weights of the terms with a dense row, 0.0 where the term is absent."""

    def __post_init__(self) -> None:
        doc_freq = np.diff(self.indptr)
        heavy = np.flatnonzero(doc_freq >= max(1.0, DENSE_MIN_DOC_FRACTION * self.n_docs))
        dense_row = np.full(doc_freq.shape[0], -1, dtype=np.int32)
        dense_row[heavy] = np.arange(heavy.shape[0], dtype=np.int32)
        dense = np.zeros((heavy.shape[0], self.n_docs), dtype=np.float32)
        for row, t in enumerate(heavy.tolist()):
            lo, hi = self.indptr[t], self.indptr[t + 1]
            dense[row, self.doc_ids[lo:hi]] = self.weights[lo:hi]
        object.__setattr__(self, "dense_row", dense_row)
        object.__setattr__(self, "dense", dense)

    @property
    def n_terms(self) -> int:
        return int(self.indptr.shape[0] - 1)


def okapi_idf(doc_freq: I64, n_docs: int, epsilon: float) -> F64:
    idf = np.log(n_docs - doc_freq + 0.5) - np.log(doc_freq + 0.5)
    occurring = doc_freq > 0
    if occurring.any():
        # rank_bm25 floors negative idfs at epsilon * the mean idf of the terms that occur (negatives
        # included); ids no document contains are not part of its vocabulary, so not of the mean.
        floor = epsilon * float(idf[occurring].mean())
        idf = np.where(idf < 0, floor, idf)
    return idf


def lucene_idf(doc_freq: I64, n_docs: int) -> F64:
    # log1p: for a term in every document the argument is 0.5 / (N + 0.5), where log(1 + x) loses digits.
    return np.log1p((n_docs - doc_freq + 0.5) / (doc_freq + 0.5))


def _postings(docs: Sequence[Sequence[int]]) -> tuple[I64, I64, I64, I64]:
    """(term, doc, tf) of every posting in CSR order, and each document's length."""
    n_docs = len(docs)
    doc_len = np.fromiter((len(d) for d in docs), dtype=np.int64, count=n_docs)
    flat_t = (np.concatenate([np.asarray(t, dtype=np.int64) for t in docs]) if n_docs
              else np.empty(0, np.int64))
    flat_d = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len)
    # One sort of the token stream keyed term-major gives the postings in CSR order (term, then doc
    # ascending) and, as run lengths, the term frequencies.
    key, tf = np.unique(flat_t * max(n_docs, 1) + flat_d, return_counts=True)
    term, doc = np.divmod(key, max(n_docs, 1))
    return term, doc, tf.astype(np.int64), doc_len


def _assemble(term: I64, doc: I64, tf: I64, doc_len: I64, n_terms: int, n_docs: int, idf: F64, avgdl: float, *,
              k1: float, b: float, tf_scale: float) -> Bm25Matrix:
    doc_freq = np.bincount(term, minlength=n_terms).astype(np.int64)
    norm = k1 * (1.0 - b + b * doc_len[doc] / avgdl) if n_docs else np.empty(0)
    weights = (idf[term] * (tf * tf_scale) / (tf + norm)).astype(np.float32)
    indptr = np.zeros(n_terms + 1, dtype=np.int64)
    np.cumsum(doc_freq, out=indptr[1:])
    return Bm25Matrix(indptr=indptr, doc_ids=doc.astype(np.int32), weights=weights, idf=idf, n_docs=n_docs)


def _build(docs: Sequence[Sequence[int]], n_terms: int, idf_of: Callable[[I64, int], F64], *, k1: float, b: float,
           tf_scale: float) -> Bm25Matrix:
    """The CSR construction both variants share; `idf_of(doc_freq, n_docs)` and `tf_scale` make the variant."""
    n_docs = len(docs)
    term, doc, tf, doc_len = _postings(docs)
    idf = idf_of(np.bincount(term, minlength=n_terms).astype(np.int64), n_docs)
    avgdl = float(doc_len.mean()) if n_docs else 0.0
    return _assemble(term, doc, tf, doc_len, n_terms, n_docs, idf, avgdl, k1=k1, b=b, tf_scale=tf_scale)


def build_with_stats(variant: Variant, docs: Sequence[Sequence[int]], idf: F64, *, avgdl: float, k1: float = 1.5,
                     b: float = 0.75) -> Bm25Matrix:
    """A segment whose weights use collection statistics given from outside: `idf` (one per term id, so
    `len(idf)` is the vocabulary size) and `avgdl`. The live index scores its small delta segment this
    way, with the main segment's avgdl and idfs over main + delta, so the two segments' scores add up to
    one ranking (server/index/delta.py); with the segment's own statistics it equals `build`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown BM25 variant {variant!r}: choose one of {', '.join(map(repr, VARIANTS))}")
    if avgdl <= 0 and len(docs):
        raise ValueError(f"avgdl: must be > 0, got {avgdl}")
    term, doc, tf, doc_len = _postings(docs)
    return _assemble(term, doc, tf, doc_len, int(idf.shape[0]), len(docs), np.asarray(idf, dtype=np.float64),
                     avgdl, k1=k1, b=b, tf_scale=k1 + 1.0 if variant == "okapi" else 1.0)


def build_okapi(docs: Sequence[Sequence[int]], n_terms: int, *, k1: float = 1.5, b: float = 0.75,
                epsilon: float = 0.25) -> Bm25Matrix:
    """Index documents given as term-id sequences (ids in [0, n_terms)); scores = rank_bm25.BM25Okapi."""
    return _build(docs, n_terms, lambda df, n: okapi_idf(df, n, epsilon), k1=k1, b=b, tf_scale=k1 + 1.0)


def build_lucene(docs: Sequence[Sequence[int]], n_terms: int, *, k1: float = 1.5, b: float = 0.75) -> Bm25Matrix:
    """Index documents given as term-id sequences (ids in [0, n_terms)); scores = bm25s method="lucene"."""
    return _build(docs, n_terms, lucene_idf, k1=k1, b=b, tf_scale=1.0)


def build(variant: Variant, docs: Sequence[Sequence[int]], n_terms: int, *, k1: float = 1.5, b: float = 0.75,
          epsilon: float = 0.25) -> Bm25Matrix:
    """The builder for `variant`; `epsilon` (the okapi idf floor) is ignored by lucene, whose idf is positive."""
    if variant == "okapi":
        return build_okapi(docs, n_terms, k1=k1, b=b, epsilon=epsilon)
    if variant == "lucene":
        return build_lucene(docs, n_terms, k1=k1, b=b)
    raise ValueError(f"unknown BM25 variant {variant!r}: choose one of {', '.join(map(repr, VARIANTS))}")


def score(matrix: Bm25Matrix, query_terms: Sequence[int], out: F32 | None = None) -> F32:
    """Scores of every document for a query given as term ids (-1 = out of vocabulary, ignored).

    A repeated query term adds its contribution once per occurrence, as rank_bm25 does. `out`, if
    given, is overwritten and returned (a reused buffer saves the allocation on a hot path).
    """
    scores = out if out is not None else np.empty(matrix.n_docs, dtype=np.float32)
    scores.fill(0.0)
    indptr, doc_ids, weights = matrix.indptr, matrix.doc_ids, matrix.weights
    dense_row, dense = matrix.dense_row, matrix.dense
    for t in query_terms:
        if t < 0:
            continue
        row = dense_row[t]
        if row >= 0:
            np.add(scores, dense[row], out=scores)
        else:
            lo, hi = indptr[t], indptr[t + 1]
            # Measured on 100k documents (bench/retrieval.py): np.add.at beats a fancy-indexed `+=`, a
            # concatenate + np.bincount and float64 accumulation; float32 keeps it exact (module docstring).
            np.add.at(scores, doc_ids[lo:hi], weights[lo:hi])
    return scores


def score_scaled(matrix: Bm25Matrix, query_terms: Sequence[int], scales: Sequence[float], out: F32) -> F32:
    """Adds each query term's postings times its scale into `out` (not cleared): for segments that store
    idf-free weights and get their idfs at query time (the live index's delta segments). Term ids at or
    past the matrix's vocabulary, and -1, are skipped."""
    indptr, doc_ids, weights = matrix.indptr, matrix.doc_ids, matrix.weights
    dense_row, dense = matrix.dense_row, matrix.dense
    n_terms = matrix.n_terms
    for t, s in zip(query_terms, scales, strict=True):
        if t < 0 or t >= n_terms:
            continue
        row = dense_row[t]
        if row >= 0:
            out += np.float32(s) * dense[row]
        else:
            lo, hi = indptr[t], indptr[t + 1]
            if hi > lo:
                np.add.at(out, doc_ids[lo:hi], np.float32(s) * weights[lo:hi])
    return out

