"""BM25 over a CSR term-document matrix.

The index is built once: for every term, its posting list (the documents containing it) and, per
posting, the term's whole BM25 contribution to that document (idf * saturated tf, length-normalised).
Scoring a query then touches only the posting lists of the query's terms: one gather-add per term,
no per-document Python loop. Scores equal `rank_bm25.BM25Okapi.get_scores` for the same tokens
(the reference in tests/kernels), including its IDF epsilon floor and its treatment of repeated query
terms (each occurrence adds again).

Okapi BM25 (Robertson & Zaragoza 2009, eq. 3.30) with rank_bm25's IDF:
    idf(t) = ln(N - n_t + 0.5) - ln(n_t + 0.5), and negative idfs are replaced by
    epsilon * mean(idf over the vocabulary) so that very common terms still count a little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]


@dataclass(frozen=True, slots=True)
class Bm25Matrix:
    """Term-major CSR: postings of term t are [indptr[t], indptr[t+1])."""

    indptr: npt.NDArray[np.int64]  # (n_terms + 1,)
    doc_ids: I32  # (nnz,) document of each posting, ascending within a term
    weights: F32  # (nnz,) BM25 contribution of the term to that document
    idf: npt.NDArray[np.float64]  # (n_terms,)
    n_docs: int

    @property
    def n_terms(self) -> int:
        return int(self.indptr.shape[0] - 1)


def okapi_idf(doc_freq: npt.NDArray[np.int64], n_docs: int, epsilon: float) -> npt.NDArray[np.float64]:
    idf = np.log(n_docs - doc_freq + 0.5) - np.log(doc_freq + 0.5)
    if idf.size:
        # rank_bm25 floors negative idfs at epsilon * the mean of all idfs (negatives included).
        floor = epsilon * (idf.sum() / idf.size)
        idf = np.where(idf < 0, floor, idf)
    return idf


def build_okapi(docs: Sequence[Sequence[int]], n_terms: int, *, k1: float = 1.5, b: float = 0.75,
                epsilon: float = 0.25) -> Bm25Matrix:
    """Index documents given as term-id sequences (ids in [0, n_terms))."""
    n_docs = len(docs)
    doc_len = np.fromiter((len(d) for d in docs), dtype=np.float64, count=n_docs)
    avgdl = float(doc_len.mean()) if n_docs else 0.0
    # Term frequencies from one sort of the flat token stream keyed by (doc, term).
    flat_t = (np.concatenate([np.asarray(t, dtype=np.int64) for t in docs]) if n_docs
              else np.empty(0, np.int64))
    flat_d = np.repeat(np.arange(n_docs, dtype=np.int64), doc_len.astype(np.int64))
    pair, tf = np.unique(flat_d * n_terms + flat_t, return_counts=True)
    doc, term = np.divmod(pair, n_terms)
    order = np.lexsort((doc, term))  # term-major, doc ascending within a term
    term, doc, tf = term[order], doc[order], tf[order]
    doc_freq = np.bincount(term, minlength=n_terms).astype(np.int64)
    idf = okapi_idf(doc_freq, n_docs, epsilon)
    norm = k1 * (1.0 - b + b * doc_len[doc] / avgdl) if n_docs else np.empty(0)
    weights = (idf[term] * (tf * (k1 + 1.0)) / (tf + norm)).astype(np.float32)
    indptr = np.zeros(n_terms + 1, dtype=np.int64)
    np.cumsum(doc_freq, out=indptr[1:])
    return Bm25Matrix(indptr=indptr, doc_ids=doc.astype(np.int32), weights=weights, idf=idf, n_docs=n_docs)


def score(matrix: Bm25Matrix, query_terms: Sequence[int], out: F32 | None = None) -> F32:
    """Scores of every document for a query given as term ids (-1 = out of vocabulary, ignored).

    A repeated query term adds its contribution once per occurrence, as rank_bm25 does.
    """
    scores = out if out is not None else np.zeros(matrix.n_docs, dtype=np.float32)
    if out is not None:
        scores.fill(0.0)
    indptr, doc_ids, weights = matrix.indptr, matrix.doc_ids, matrix.weights
    for t in query_terms:
        if t < 0:
            continue
        lo, hi = indptr[t], indptr[t + 1]
        # doc_ids are unique within one posting list, so a fancy-indexed add is exact.
        scores[doc_ids[lo:hi]] += weights[lo:hi]
    return scores
