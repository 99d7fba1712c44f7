"""Hybrid retrieval: BM25 and dense search run concurrently, then fuse (RRF or convex).

Metadata pre-filters become one boolean mask applied inside both retrievers before their top-k (a
filtered query never loses its best matches to documents it would throw away). Confidence weights
scale the fused score once, by 1 - w + w * confidence (`retrieval.confidence_weight` = w): a full
multiply (w = 1) would swamp RRF, whose scores differ by a few percent between neighbouring ranks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from kernels import fusion
from kernels.topk import top_k
from server.config import FusionConfig
from server.knowledge import KnowledgeBase
from server.retrieval.sparse import Filters, Hit, SparseRetriever

if TYPE_CHECKING:
    from server.retrieval.dense import HnswIndex
    from server.retrieval.encoder import OnnxEncoder

FusionMode = Literal["rrf", "convex", "sparse", "dense"]
FUSION_MODES: tuple[FusionMode, ...] = ("rrf", "convex", "sparse", "dense")


class DenseRetriever:
    """Query encoding (ONNX) + HNSW search. Both release the GIL, so this overlaps BM25 on another core."""

    name = "dense"

    def __init__(self, encoder: OnnxEncoder, index: HnswIndex) -> None:
        self.encoder = encoder
        self.index = index

    def candidates(self, query: str, k: int, mask: npt.NDArray[np.bool_] | None,
                   ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]]:
        vec = self.encoder.encode_query(query)
        idx, cos = self.index.search(vec, k, mask=mask)
        # Cosine in [-1, 1] -> [0, 1]: same order, and non-negative so confidence weights scale it
        # the way they scale BM25 scores.
        return idx, (1.0 + cos.astype(np.float64)) / 2.0


class HybridRetriever:
    name = "hybrid"

    def __init__(self, kb: KnowledgeBase, sparse: SparseRetriever, dense: DenseRetriever | None, cfg: FusionConfig,
                 *, apply_confidence: bool) -> None:
        self.kb = kb
        self.sparse = sparse
        self.dense = dense
        self.cfg = cfg
        self.tokenizer = sparse.tokenizer
        self._factor = sparse.weight_factor if apply_confidence else None
        # One extra thread: the dense half of a query runs there while the caller's thread does BM25.
        self._side = ThreadPoolExecutor(max_workers=2, thread_name_prefix="snaprag-dense")

    @property
    def default_mode(self) -> FusionMode:
        return self.cfg.mode if self.dense is not None else "sparse"

    def modes(self) -> tuple[FusionMode, ...]:
        return FUSION_MODES if self.dense is not None else ("sparse",)

    def search(self, query: str, k: int, filters: Filters | None = None, mode: FusionMode | None = None,
               ) -> list[Hit]:
        mode = mode or self.default_mode
        if mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {mode!r}; valid modes: {', '.join(FUSION_MODES)}")
        if mode != "sparse" and self.dense is None:
            raise ValueError(f"fusion mode {mode!r} needs the dense retriever, which is not loaded")
        mask = self.sparse.mask(filters or {})
        n = max(k, self.cfg.candidates)
        if mode == "sparse":
            idx, scores = self.sparse.candidates(query, n, mask)
        elif mode == "dense":
            assert self.dense is not None
            idx, scores = self.dense.candidates(query, n, mask)
        else:
            assert self.dense is not None
            pending = self._side.submit(self.dense.candidates, query, n, mask)
            s_idx, s_scores = self.sparse.candidates(query, n, mask)
            d_idx, d_scores = pending.result()
            if mode == "rrf":
                idx, scores = fusion.rrf([s_idx, d_idx], k=self.cfg.rrf_k)
            else:
                w = self.cfg.dense_weight
                idx, scores = fusion.convex([(s_idx, s_scores), (d_idx, d_scores)], weights=[1.0 - w, w])
        idx, scores = self._weighted(idx, scores)
        sel, vals = top_k(np.asarray(scores, dtype=np.float64), k)
        idx = np.asarray(idx)[sel]
        return [Hit(self.kb.passages[i], float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]

    def _weighted(self, idx: npt.NDArray[np.int64], scores: npt.NDArray[np.floating],
                  ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]]:
        if self._factor is None or not len(idx):
            return idx, scores
        return fusion.apply_confidence(idx, scores, self._factor)

    def close(self) -> None:
        self._side.shutdown(wait=False, cancel_futures=True)
