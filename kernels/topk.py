"""Top-k selection with a partial sort (O(n + k log k)), optionally restricted by a mask."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def top_k(scores: npt.NDArray[np.floating], k: int, *, mask: npt.NDArray[np.bool_] | None = None,
          min_score: float | None = None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]]:
    """Indices and scores of the k best entries, best first; ties broken by lower index.

    `mask` keeps only True entries (metadata pre-filters apply before selection, not after);
    `min_score` drops entries at or below it (e.g. 0.0: documents sharing no query term).
    """
    if k <= 0 or scores.size == 0:
        return np.empty(0, np.int64), scores[:0]
    candidates = np.arange(scores.shape[0], dtype=np.int64)
    if mask is not None:
        candidates = candidates[mask]
    if min_score is not None:
        candidates = candidates[scores[candidates] > min_score]
    if candidates.size == 0:
        return candidates, scores[:0]
    vals = scores[candidates]
    if candidates.size > k:
        part = np.argpartition(-vals, k - 1)[:k]
        candidates, vals = candidates[part], vals[part]
    # Stable order: score descending, then index ascending (deterministic answers for equal scores).
    order = np.lexsort((candidates, -vals))
    return candidates[order], vals[order]
