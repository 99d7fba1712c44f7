"""BM25 retrieval over the knowledge base with metadata pre-filters and confidence weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kernels.bm25 import Bm25Matrix, build_okapi, score
from kernels.topk import top_k
from server.config import Bm25Config
from server.knowledge import FILTER_FIELDS, KnowledgeBase, Passage
from server.retrieval.text import Tokenizer

Filters = Mapping[str, Sequence[str]]


@dataclass(frozen=True, slots=True)
class Hit:
    passage: Passage
    score: float


class SparseRetriever:
    """Builds the CSR BM25 matrix once; `search` is pure numpy and safe to call from worker threads."""

    name = "bm25"

    def __init__(self, kb: KnowledgeBase, tokenizer: Tokenizer, bm25: Bm25Config, *, apply_confidence: bool) -> None:
        self.kb = kb
        self.tokenizer = tokenizer
        self.vocab: dict[str, int] = {}
        docs: list[list[int]] = []
        for p in kb.passages:
            # The fault code and source title are part of what a passage is about.
            tokens = tokenizer(f"{p.text} {p.fault_code} {p.source}")
            docs.append([self.vocab.setdefault(t, len(self.vocab)) for t in tokens])
        self.matrix: Bm25Matrix = build_okapi(docs, len(self.vocab), k1=bm25.k1, b=bm25.b, epsilon=bm25.epsilon)
        self._weight = (np.array([p.confidence for p in kb.passages], dtype=np.float32) if apply_confidence
                        else None)
        self._masks: dict[tuple[str, str], npt.NDArray[np.bool_]] = {}
        for f in FILTER_FIELDS:
            for value in kb.values(f):
                self._masks[(f, value)] = np.array([p.field_value(f) == value for p in kb.passages], dtype=bool)

    def mask(self, filters: Filters) -> npt.NDArray[np.bool_] | None:
        """OR within a field, AND across fields. Unknown values match nothing (validated upstream)."""
        out: npt.NDArray[np.bool_] | None = None
        for f, values in filters.items():
            if not values:
                continue
            m = np.zeros(len(self.kb), dtype=bool)
            for v in values:
                vm = self._masks.get((f, v))
                if vm is not None:
                    m |= vm
            out = m if out is None else (out & m)
        return out

    def query_terms(self, query: str) -> list[int]:
        return [self.vocab.get(t, -1) for t in self.tokenizer(query)]

    def search(self, query: str, k: int, filters: Filters | None = None) -> list[Hit]:
        scores = score(self.matrix, self.query_terms(query))
        if self._weight is not None:
            scores *= self._weight
        idx, vals = top_k(scores, k, mask=self.mask(filters or {}), min_score=0.0)
        return [Hit(self.kb.passages[i], float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
