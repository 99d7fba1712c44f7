"""The serving HNSW graph, added to while queries run.

One graph per served snapshot (a generation), shared by every view of it. Rows are only ever appended
(label = row number), so an older view stays correct by ignoring labels at or past its own row count,
and rows it sees as deleted (its tombstone mask). hnswlib cannot search while it inserts or grows, so
inserts and `mark_deleted` take the write side of a reader/writer lock, a few rows per hold
([index] hnsw_add_chunk): queries wait at most one chunk's insert time.

`mark_deleted` hides rows from the graph walk itself, so the common unfiltered query stays on
hnswlib's fast path. It is deferred (LiveIndex decides when) until no query holds a view in which the
row is still alive: until then the row is filtered per view instead.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from server.index.rwlock import ReadWriteLock
from server.retrieval.dense import HnswIndex

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]

OVERFETCH_MAX = 256
"""An unfiltered query over-fetches by the number of rows its view may not return (tombstones not yet
marked in the graph, rows added after the view) and drops them, while that number is at most this;
past it, the graph walk filters by mask instead (slower per node, but never short of k)."""


class LiveDense:
    def __init__(self, index: HnswIndex, *, add_chunk: int = 4) -> None:
        self.index = index
        self.lock = ReadWriteLock()
        self.add_chunk = max(1, add_chunk)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dim(self) -> int:
        return self.index.dim

    def add(self, vectors: F32) -> I64:
        """Append rows in chunks, each under the write lock; returns their labels (row numbers)."""
        labels = []
        for lo in range(0, vectors.shape[0], self.add_chunk):
            with self.lock.write():
                labels.append(self.index.add(vectors[lo:lo + self.add_chunk], threads=1))
        return np.concatenate(labels) if labels else np.empty(0, np.int64)

    def mark_deleted(self, rows: I64) -> None:
        for lo in range(0, rows.shape[0], 64):  # a mark is cheap; still, keep holds short
            with self.lock.write():
                self.index.mark_deleted(rows[lo:lo + 64])

    def search(self, query: F32, k: int, *, n_view: int, allowed: Mask | None, blocked: int,
               filtered: bool) -> tuple[I64, F32]:
        """Top-k rows of a view with `n_view` rows, among `allowed` (None = all of them).

        `blocked` = rows of the view `allowed` excludes for liveness only (its tombstones), `filtered` =
        `allowed` also carries metadata filters. Returns (rows, cosine similarities), best first.
        """
        if k <= 0 or n_view == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        with self.lock.read():
            n_now = len(self.index)
            if not filtered:
                marked = self.index.deleted
                extra = max(0, blocked - marked) + (n_now - n_view)
                if extra <= OVERFETCH_MAX:
                    want = min(k + extra, n_now - marked)
                    labels, sims = self.index.search(query, want)
                    keep = labels < n_view
                    if allowed is not None:
                        keep[keep] &= allowed[labels[keep]]
                    labels, sims = labels[keep][:k], sims[keep][:k]
                    n_allowed = n_view - blocked
                    if labels.shape[0] >= min(k, n_allowed):
                        return labels, sims
                    # The marks counted above include rows past this view: fell short, filter instead.
            mask = np.zeros(n_now, dtype=bool)
            if allowed is None:
                mask[:n_view] = True
            else:
                mask[:n_view] = allowed
            return self.index.search(query, k, mask=mask)
