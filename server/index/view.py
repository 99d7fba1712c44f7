"""One consistent, immutable view of the live index: what a query searches from start to finish.

A view is the snapshot's segments plus the rows written up to one batch: a row count `n` (rows are
appended, never changed), a tombstone mask, the delta BM25 segments and the metadata masks of those
rows. Its search mirrors HybridRetriever.search (same candidates, fusion and confidence weighting), so
a view over a fresh snapshot ranks exactly as the static retriever does (tests/index/test_live.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from kernels import bm25, fusion
from kernels.topk import top_k
from server.index.delta import DeltaSegment, main_scales, query_idf, score_segments
from server.knowledge import FILTER_FIELDS, Passage
from server.retrieval.hybrid import FUSION_MODES, FusionMode
from server.retrieval.sparse import Filters, Hit

if TYPE_CHECKING:
    from server.index.generation import Generation

Mask = npt.NDArray[np.bool_]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class IndexView:
    gen: Generation
    seq: int
    """Publish number (the API's `generation`): increases with every applied write or swap."""
    n: int
    """Rows visible: the snapshot's, then the ones written up to this view."""
    alive: Mask | None
    """Rows not deleted or replaced; None when all of them are."""
    n_dead: int
    segments: tuple[DeltaSegment, ...]
    masks: Mapping[tuple[str, str], Mask]
    """(field, value) -> bool per row; arrays at least `n` long (only [:n] is this view's)."""
    factor: npt.NDArray[np.float32] | None
    """Confidence multiplier per row (at least `n` long), None when confidence is not applied."""

    # -- what it holds -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.n - self.n_dead

    @property
    def version(self) -> str:
        return self.gen.version

    @property
    def delta_rows(self) -> int:
        return self.n - self.gen.base_rows

    def values(self, name: str) -> set[str]:
        """Distinct values of a filter field (for request validation, so computed once per view)."""
        return self._values.get(name, set())

    @cached_property
    def _values(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for (f, v), m in self.masks.items():
            if m[: self.n].any():
                out.setdefault(f, set()).add(v)
        return out

    def passages(self) -> Iterator[Passage]:
        rows = self.gen.rows
        for i in range(self.n):
            if self.alive is None or self.alive[i]:
                yield rows[i]

    def filter_mask(self, filters: Filters | None) -> Mask | None:
        """OR within a field, AND across fields; None when nothing is filtered. Unknown values match nothing."""
        out: Mask | None = None
        for f, values in (filters or {}).items():
            if not values:
                continue
            m = np.zeros(self.n, dtype=bool)
            for v in values:
                vm = self.masks.get((f, v))
                if vm is not None:
                    m |= vm[: self.n]
            out = m if out is None else (out & m)
        return out

    # -- search ------------------------------------------------------------------------------------

    @property
    def default_mode(self) -> FusionMode:
        return self.gen.fusion.mode if self.gen.dense is not None else "sparse"

    def modes(self) -> tuple[FusionMode, ...]:
        return FUSION_MODES if self.gen.dense is not None else ("sparse",)

    def search(self, query: str, k: int, filters: Filters | None = None, mode: FusionMode | None = None, *,
               side: Executor | None = None, query_vector: npt.NDArray[np.float32] | None = None) -> list[Hit]:
        """Hybrid top-k over this view. `side` runs the dense half concurrently with BM25 (as
        HybridRetriever does); `query_vector` skips query encoding (gate evaluation pre-encodes)."""
        gen = self.gen
        mode = mode or self.default_mode
        if mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {mode!r}; valid modes: {', '.join(FUSION_MODES)}")
        if mode != "sparse" and gen.dense is None:
            raise ValueError(f"fusion mode {mode!r} needs the dense retriever, which is not loaded")
        fmask = self.filter_mask(filters)
        allowed = fmask if self.alive is None else (self.alive[: self.n] if fmask is None else fmask & self.alive)
        n_cand = max(k, gen.fusion.candidates)
        if mode == "sparse":
            idx, scores = self._sparse(query, n_cand, allowed)
        elif mode == "dense":
            idx, scores = self._dense(query, n_cand, allowed, fmask is not None, query_vector)
        else:
            pending = side.submit(self._dense, query, n_cand, allowed, fmask is not None, query_vector) \
                if side is not None else None
            s_idx, s_scores = self._sparse(query, n_cand, allowed)
            d_idx, d_scores = pending.result() if pending is not None else \
                self._dense(query, n_cand, allowed, fmask is not None, query_vector)
            if mode == "rrf":
                idx, scores = fusion.rrf([s_idx, d_idx], k=gen.fusion.rrf_k)
            else:
                w = gen.fusion.dense_weight
                idx, scores = fusion.convex([(s_idx, s_scores), (d_idx, d_scores)], weights=[1.0 - w, w])
        if self.factor is not None and len(idx):
            idx, scores = fusion.apply_confidence(idx, scores, self.factor)
        sel, vals = top_k(np.asarray(scores, dtype=np.float64), k)
        rows = gen.rows
        return [Hit(rows[i], float(v)) for i, v in zip(np.asarray(idx)[sel].tolist(), vals.tolist(), strict=True)]

    def _sparse(self, query: str, k: int, allowed: Mask | None) -> tuple[I64, npt.NDArray[np.floating]]:
        gen = self.gen
        tokens = gen.tokenizer(query)
        main_ids = [gen.main_vocab.get(t, -1) for t in tokens]
        if self.n == gen.base_rows:  # no rows written since the snapshot: its weights are exact
            scores = bm25.score(gen.main, main_ids)
        else:
            delta_vocab = gen.delta_vocab
            ids = [i if i >= 0 else delta_vocab.get(t, -1) for i, t in zip(main_ids, tokens, strict=True)]
            idf = query_idf(ids, self.segments, self.n, gen.stats)  # over snapshot + delta (delta.py)
            main = np.zeros(gen.base_rows, dtype=np.float32)
            bm25.score_scaled(gen.main, main_ids, main_scales(main_ids, idf, gen.main.idf), main)
            delta = score_segments(ids, self.segments, idf, gen.base_rows, self.n - gen.base_rows)
            scores = np.concatenate([main, delta])
        return top_k(scores, k, mask=allowed, min_score=0.0)

    def _dense(self, query: str, k: int, allowed: Mask | None, filtered: bool,
               query_vector: npt.NDArray[np.float32] | None) -> tuple[I64, npt.NDArray[np.floating]]:
        gen = self.gen
        assert gen.dense is not None and gen.encoder is not None
        vec = query_vector if query_vector is not None else gen.encoder.encode_query(query)
        blocked = self.n_dead if allowed is not None and not filtered else 0
        idx, cos = gen.dense.search(vec, k, n_view=self.n, allowed=allowed, blocked=blocked, filtered=filtered)
        # Cosine in [-1, 1] -> [0, 1], as DenseRetriever does.
        return idx, (1.0 + cos.astype(np.float64)) / 2.0


def field_values(p: Passage) -> list[tuple[str, str]]:
    return [(f, p.field_value(f)) for f in FILTER_FIELDS]
