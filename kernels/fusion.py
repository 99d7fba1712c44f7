"""Rank fusion of retriever result lists: reciprocal rank fusion, convex combination, confidence weights.

Every function takes and returns explicit `(indices, scores)` arrays: `indices` are int64 document
(row) ids, `scores` float64, best first, ties broken by lower index (the same order contract as
`kernels.topk.top_k`, so a fused answer is deterministic). No I/O, no config objects: the caller maps
`FusionConfig` onto the arguments.

- RRF (Cormack, Clarke & Buettcher, SIGIR 2009, "Reciprocal rank fusion outperforms Condorcet and
  individual rank learning methods"): score(d) = sum_i w_i / (k + rank_i(d)), rank 1-based. Uses only
  ranks, so it needs no score calibration between BM25 and cosine similarity.
- Convex combination of min-max normalised scores (Bruch, Gai & Ingber 2023, "An analysis of fusion
  functions for hybrid retrieval"): uses the score gaps that RRF throws away; weights are the knob.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


def rrf(lists: Sequence[npt.ArrayLike], k: float = 60.0,
        weights: Sequence[float] | None = None) -> tuple[I64, F64]:
    """Reciprocal rank fusion of ranked lists of document indices (each best first).

    score(d) = sum over lists i containing d of weights[i] / (k + rank_i(d)), rank_i 1-based; a
    document missing from a list gets nothing from it. `k` (60 in the paper) damps the head: with a
    large k, rank 1 and rank 5 are worth nearly the same; k = 0 is allowed (rank 1 is then worth 1).
    Returns the union of all documents by fused score descending, ties by lower index.
    """
    if not np.isfinite(k) or k < 0:
        raise ValueError(f"k: must be a finite number >= 0, got {k}")
    w = _weights(weights, len(lists))
    arrays = [_index_list(f"lists[{i}]", lst) for i, lst in enumerate(lists)]
    if not arrays or all(a.size == 0 for a in arrays):
        return np.empty(0, np.int64), np.empty(0, np.float64)
    docs = np.concatenate(arrays)
    contrib = np.concatenate([w[i] / (k + np.arange(1, a.size + 1, dtype=np.float64))
                              for i, a in enumerate(arrays)])
    # bincount adds in input order (list 0 first), so sums are reproducible bit for bit.
    uniq, inverse = np.unique(docs, return_inverse=True)
    fused = np.bincount(inverse, weights=contrib, minlength=uniq.size).astype(np.float64, copy=False)
    return _sorted(uniq, fused)


def minmax(scores: npt.ArrayLike) -> F64:
    """Scores mapped linearly onto [0, 1] over this list: (s - min) / (max - min).

    If every score is equal (including a single candidate) the result is all 1.0, not 0.0 or NaN:
    the retriever put these candidates in its list and expressed no preference among them, so each is
    as good as that list's best. Mapping them to 0 would make the retriever's evidence vanish and rank
    its candidates level with documents it never returned. An empty input gives an empty output.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores: expected a 1-D array, got shape {s.shape}")
    if s.size == 0:
        return s.copy()
    if not np.all(np.isfinite(s)):
        raise ValueError("scores: must be finite (no NaN or inf)")
    lo, hi = float(s.min()), float(s.max())
    if hi == lo:
        return np.ones_like(s)
    return (s - lo) / (hi - lo)


def convex(lists_with_scores: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]],
           weights: Sequence[float]) -> tuple[I64, F64]:
    """Weighted sum of per-list min-max normalised scores over the union of candidates.

    Each list is normalised over its own candidates only (`minmax`). A document missing from a list
    gets 0 from it: the retriever ranked it below its candidate cut-off, so its true normalised score
    is at most that of the list's worst candidate, which is 0 (the usual choice, e.g. Weaviate's
    relative-score fusion; it favours documents that several retrievers agree on). Weights need not
    sum to 1; with FusionConfig they are (1 - dense_weight, dense_weight).
    """
    w = _weights(weights, len(lists_with_scores), name="weights", required=True)
    docs_parts: list[I64] = []
    score_parts: list[F64] = []
    for i, pair in enumerate(lists_with_scores):
        if len(pair) != 2:
            raise ValueError(f"lists_with_scores[{i}]: expected an (indices, scores) pair")
        idx = _index_list(f"lists_with_scores[{i}] indices", pair[0])
        sc = np.asarray(pair[1], dtype=np.float64)
        if sc.shape != idx.shape:
            raise ValueError(f"lists_with_scores[{i}]: {idx.size} indices but scores of shape {sc.shape}")
        docs_parts.append(idx)
        score_parts.append(w[i] * minmax(sc))
    if not docs_parts or all(d.size == 0 for d in docs_parts):
        return np.empty(0, np.int64), np.empty(0, np.float64)
    uniq, inverse = np.unique(np.concatenate(docs_parts), return_inverse=True)
    fused = np.bincount(inverse, weights=np.concatenate(score_parts), minlength=uniq.size).astype(
        np.float64, copy=False)
    return _sorted(uniq, fused)


def apply_confidence(indices: npt.ArrayLike, scores: npt.ArrayLike,
                     confidence: npt.NDArray[np.floating]) -> tuple[I64, F64]:
    """Multiply each document's score by its confidence weight (in [0, 1]) and re-sort.

    `confidence` is indexed by document id (one entry per passage). Scores must be >= 0 (RRF, convex
    and BM25 scores are): with a negative score a low confidence would move the document *up*; min-max
    normalise raw cosine scores first.

    On scale: the product is relative, so its effect on order does not depend on the absolute size of
    the scores, but it does depend on how fast scores fall with rank. RRF scores fall slowly (1/(k + r)
    and 1/(k + r + 1) differ by about 1/(k + r)^2): with k = 60, a document ranked first by one list
    drops to 7th among that list's documents at confidence 0.9 (0.9/61 lies between 1/67 and 1/68) and
    to ~62nd at 0.5, i.e. past a 50-candidate list. Convex scores spread over [0, 1] per list, where the
    same confidence moves a document far fewer places. Both are intended: low confidence is rare.
    """
    idx = _index_list("indices", indices, unique=False)
    sc = np.asarray(scores, dtype=np.float64)
    if sc.shape != idx.shape:
        raise ValueError(f"scores: expected shape {idx.shape} to match indices, got {sc.shape}")
    conf = np.asarray(confidence)
    if conf.ndim != 1:
        raise ValueError(f"confidence: expected a 1-D array (one weight per document), got shape {conf.shape}")
    if idx.size and int(idx.max()) >= conf.shape[0]:
        raise ValueError(f"indices: document {int(idx.max())} is out of range for {conf.shape[0]} confidence weights")
    if sc.size and not (np.all(np.isfinite(sc)) and float(sc.min()) >= 0.0):
        raise ValueError("scores: must be finite and >= 0 to be weighted by confidence")
    c = conf[idx].astype(np.float64)
    if c.size and not (np.all(np.isfinite(c)) and float(c.min()) >= 0.0 and float(c.max()) <= 1.0):
        raise ValueError("confidence: weights of the given documents must lie in [0, 1]")
    return _sorted(idx, sc * c)


def _index_list(name: str, values: npt.ArrayLike, *, unique: bool = True) -> I64:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of document indices, got shape {a.shape}")
    if a.size == 0:
        return np.empty(0, np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: document indices must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if int(a.min()) < 0:
        raise ValueError(f"{name}: document indices must be >= 0, got {int(a.min())}")
    if unique and np.unique(a).size != a.size:
        # A ranked list names each document once; a repeat means the caller merged lists by mistake.
        raise ValueError(f"{name}: a document appears more than once")
    return a


def _weights(weights: Sequence[float] | None, n: int, *, name: str = "weights", required: bool = False) -> F64:
    if weights is None:
        if required:
            raise ValueError(f"{name}: required, one per list")
        return np.ones(n, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"{name}: expected {n} weights (one per list), got {w.size}")
    if not np.all(np.isfinite(w)) or (w.size and float(w.min()) < 0):
        raise ValueError(f"{name}: must be finite and >= 0, got {w.tolist()}")
    return w


def _sorted(indices: I64, scores: F64) -> tuple[I64, F64]:
    # Score descending, then index ascending: deterministic answers for equal scores.
    order = np.lexsort((indices, -scores))
    return indices[order], scores[order]
