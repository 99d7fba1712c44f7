"""BM25 for rows written since the snapshot: small immutable segments that score on the snapshot's scale.

The snapshot's (main) segment stores finished weights, idf included. A delta segment stores idf-free
weights, tf * s / (tf + k1 * (1 - b + b * dl / avgdl)), and gets its idfs per query, so a row written
now scores the way it would in one index over everything, up to these approximations, which all end at
the next snapshot (a fresh index over exactly the live rows):

- every row, snapshot or delta, is scored with the idf over N = snapshot rows + delta rows and df = df in
  the snapshot + df in the delta segments: delta rows get it directly, and the snapshot segment's
  finished weights are rescaled per query term by idf_now / idf_at_snapshot (exact, since a weight is
  idf x an idf-free part);
- the length normalisation keeps the snapshot's avgdl, and deleted or replaced rows still count in N
  and df until the next snapshot.

Without the rescaling, a delta that outgrows the snapshot (the index bench streams 5x its size in)
left the snapshot's rows on stale idfs and moved golden-set recall by 7 % against a rebuild, which the
swap's recall gate then (rightly) refused. With it, rankings match a rebuild up to avgdl
(tests/index/test_live.py compares scores with a rebuild: within 2 %).

Segments are immutable (each published view holds a tuple of them) and merged like a binary counter:
a new batch's segment is merged with the previous one while that one is not more than twice its size,
so a view holds O(log n) segments and each row is rebuilt O(log n) times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kernels import bm25

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class MainStats:
    """What delta scoring needs from the snapshot's BM25 segment."""

    variant: bm25.Variant
    k1: float
    b: float
    n_docs: int
    avgdl: float
    doc_freq: I64
    """Per main term id."""
    okapi_floor: float
    """rank_bm25's floor for negative okapi idfs: epsilon x mean raw idf over the snapshot's terms."""

    @classmethod
    def of(cls, matrix: bm25.Bm25Matrix, *, variant: bm25.Variant, k1: float, b: float, epsilon: float,
           avgdl: float) -> MainStats:
        df = np.diff(matrix.indptr).astype(np.int64)
        occurring = df > 0
        raw = np.log(matrix.n_docs - df[occurring] + 0.5) - np.log(df[occurring] + 0.5)
        floor = float(epsilon * raw.mean()) if raw.size else 0.0
        return cls(variant, k1, b, matrix.n_docs, avgdl if avgdl > 0 else 1.0, df, floor)

    @property
    def n_terms(self) -> int:
        return int(self.doc_freq.shape[0])

    def idf(self, doc_freq: F64, n_docs: int) -> F64:
        if self.variant == "lucene":
            return np.log1p((n_docs - doc_freq + 0.5) / (doc_freq + 0.5))
        raw = np.log(n_docs - doc_freq + 0.5) - np.log(doc_freq + 0.5)
        return np.where(raw < 0, self.okapi_floor, raw)


@dataclass(frozen=True)
class DeltaSegment:
    row0: int
    """Row number (in the live row space) of the segment's first row."""
    matrix: bm25.Bm25Matrix
    """idf-free weights; term ids in the live term space (snapshot terms, then new ones)."""
    doc_freq: I64
    docs: tuple[tuple[int, ...], ...]
    """Each row's term ids, kept for merges."""

    @property
    def n_rows(self) -> int:
        return len(self.docs)


def make_segment(row0: int, docs: Sequence[Sequence[int]], n_terms: int, stats: MainStats) -> DeltaSegment:
    docs_t = tuple(tuple(d) for d in docs)
    matrix = bm25.build_with_stats(stats.variant, docs_t, np.ones(n_terms, dtype=np.float64), avgdl=stats.avgdl,
                                   k1=stats.k1, b=stats.b)
    return DeltaSegment(row0, matrix, np.diff(matrix.indptr).astype(np.int64), docs_t)


def add_segment(segments: tuple[DeltaSegment, ...], new: DeltaSegment, n_terms: int,
                stats: MainStats) -> tuple[DeltaSegment, ...]:
    """The segments after appending `new`, merged binary-counter style (see the module docstring)."""
    out = [*segments, new]
    while len(out) >= 2 and out[-2].n_rows <= 2 * out[-1].n_rows:
        b, a = out.pop(), out.pop()
        out.append(make_segment(a.row0, a.docs + b.docs, n_terms, stats))
    return tuple(out)


def query_idf(terms: Sequence[int], segments: Sequence[DeltaSegment], n_docs: int, stats: MainStats) -> F64:
    """Per query term: its idf over snapshot + delta (N = n_docs), 0 for -1 (unknown everywhere)."""
    df = np.zeros(len(terms), dtype=np.float64)
    for i, t in enumerate(terms):
        if t < 0:
            continue
        d = int(stats.doc_freq[t]) if t < stats.n_terms else 0
        for seg in segments:
            if t < seg.doc_freq.shape[0]:
                d += int(seg.doc_freq[t])
        df[i] = d
    idf = stats.idf(df, n_docs)
    idf[np.asarray(terms) < 0] = 0.0
    return idf


def main_scales(main_terms: Sequence[int], idf: F64, main_idf: F64) -> list[float]:
    """Per query term: idf_now / idf_at_snapshot, the factor that moves a snapshot-segment weight to the
    current statistics (0 for terms the snapshot does not have)."""
    out = []
    for t, now in zip(main_terms, idf.tolist(), strict=True):
        was = float(main_idf[t]) if t >= 0 else 0.0
        out.append(now / was if was > 0 else 0.0)
    return out


def score_segments(terms: Sequence[int], segments: Sequence[DeltaSegment], idf: F64, base_row: int,
                   n_rows: int) -> F32:
    """BM25 scores of rows [base_row, base_row + n_rows) (the delta rows a view can see), with `idf` per
    query term (query_idf)."""
    out = np.zeros(n_rows, dtype=np.float32)
    if not segments or not any(t >= 0 for t in terms):
        return out
    for seg in segments:
        lo = seg.row0 - base_row
        bm25.score_scaled(seg.matrix, terms, idf.tolist(), out[lo:lo + seg.n_rows])
    return out
