"""The optional rerank stage: the cross-encoder scores as much of the fused list's head as fits.

The stage knows its cost per pair (learned online from its own runs, seeded by the warm-up
measurement) and asks `affordable` how many candidates fit in min(rerank budget, time left). None
fit: it is skipped and says why. It misses or fails: the fused order stands and the answer is marked
DEGRADED. Either way the request goes on; rerank is never worth a fallback.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from server.config import RerankConfig
from server.observability.metrics import RERANK_CANDIDATES
from server.pipeline.budget import Budget
from server.pipeline.stage import Trace, run_stage
from server.rerank.budget import PairCost, affordable, rerank_scores
from server.retrieval.sparse import Hit

if TYPE_CHECKING:
    from server.rerank.cross_encoder import CrossEncoder


class RerankStage:
    name = "rerank"

    def __init__(self, cfg: RerankConfig, reranker: CrossEncoder | None, cpu: ThreadPoolExecutor,
                 *, measured_pair_ms: float | None = None) -> None:
        self.cfg = cfg
        self.reranker = reranker
        self.cpu = cpu
        # Seed with what warm-up measured on this machine when it is dearer than the configured prior:
        # an optimistic prior would let the first requests start work they cannot finish.
        self.cost = PairCost(max(cfg.prior_pair_ms, measured_pair_ms or 0.0))

    def fetch_k(self, k: int) -> int:
        """How many fused candidates to retrieve so the stage has a head to rerank."""
        return max(k, self.cfg.max_candidates) if self.reranker is not None else k

    def _score(self, query: str, texts: list[str]) -> npt.NDArray[np.float32]:
        assert self.reranker is not None
        t0 = time.perf_counter()
        logits = self.reranker.score(query, texts, batch_size=self.cfg.batch_size)
        self.cost.observe(len(texts), (time.perf_counter() - t0) * 1000)
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (len(texts),) or not np.isfinite(logits).all():
            # garbage from the model (NaN, wrong length) fails the stage: the fused order stands
            raise ValueError(f"reranker returned invalid scores (shape {logits.shape}, "
                             f"{int(np.isfinite(logits).sum())} finite) for {len(texts)} candidates")
        return logits

    async def run(self, query: str, hits: list[Hit], k: int, *, budget: Budget, stage_budget_s: float,
                  trace: Trace) -> list[Hit]:
        if self.reranker is None:
            trace.skipped(self.name, "disabled in config (rerank.enabled = false)")
            return hits[:k]
        time_left_ms = budget.for_stage(stage_budget_s) * 1000
        n = affordable(len(hits), time_left_ms, self.cost, self.cfg.max_candidates)
        if n == 0:
            trace.skipped(self.name, f"no candidate fits: {time_left_ms:.0f} ms left at "
                                     f"~{self.cost.per_pair_ms:.1f} ms per pair")
            return hits[:k]
        RERANK_CANDIDATES.observe(n)
        texts = [h.passage.text for h in hits[:n]]
        loop = asyncio.get_running_loop()
        logits = await run_stage(self.name, lambda: loop.run_in_executor(self.cpu, self._score, query, texts),
                                 budget=budget, stage_budget_s=stage_budget_s, trace=trace, mandatory=False,
                                 ok_detail=f"scored {n} of {len(hits)} candidates")
        if logits is None:  # missed or failed: recorded in the trace; keep the fused order
            return hits[:k]
        order, scores = rerank_scores([h.score for h in hits], logits, self.cfg.score_weight)
        return [Hit(hits[i].passage, float(s)) for i, s in zip(order[:k].tolist(), scores[:k].tolist(), strict=True)]
