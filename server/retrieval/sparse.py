"""BM25 retrieval over the knowledge base with metadata pre-filters and confidence weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kernels import bm25
from kernels.topk import top_k
from server.config import Bm25Config
from server.knowledge import FILTER_FIELDS, KnowledgeBase, Passage
from server.retrieval.text import Tokenizer

Filters = Mapping[str, Sequence[str]]


@dataclass(frozen=True, slots=True)
class Hit:
    passage: Passage
    score: float


def passage_index_text(p: Passage) -> str:
    """What BM25 indexes for a passage: the fault code and source title are part of what it is about."""
    return f"{p.text} {p.fault_code} {p.source}"


def tokenize_passages(passages: Sequence[Passage], tokenizer: Tokenizer,
                      vocab: dict[str, int] | None = None) -> tuple[dict[str, int], list[list[int]]]:
    """Term ids of each passage's index text; new terms are added to `vocab` (a fresh one if None)."""
    vocab = {} if vocab is None else vocab
    docs = [[vocab.setdefault(t, len(vocab)) for t in tokenizer(passage_index_text(p))] for p in passages]
    return vocab, docs


def build_bm25(kb: KnowledgeBase, tokenizer: Tokenizer, cfg: Bm25Config) -> tuple[dict[str, int], bm25.Bm25Matrix]:
    vocab, docs = tokenize_passages(kb.passages, tokenizer)
    return vocab, bm25_matrix(docs, len(vocab), cfg)


def bm25_matrix(docs: Sequence[Sequence[int]], n_terms: int, cfg: Bm25Config) -> bm25.Bm25Matrix:
    if cfg.variant == "okapi":
        return bm25.build_okapi(docs, n_terms, k1=cfg.k1, b=cfg.b, epsilon=cfg.epsilon)
    return bm25.build(cfg.variant, docs, n_terms, k1=cfg.k1, b=cfg.b)


class FilterMasks:
    """Boolean masks per (field, value), precomputed: a filter costs a few vector ORs/ANDs."""

    def __init__(self, kb: KnowledgeBase) -> None:
        self.n = len(kb)
        self._masks: dict[tuple[str, str], npt.NDArray[np.bool_]] = {}
        for f in FILTER_FIELDS:
            for value in kb.values(f):
                self._masks[(f, value)] = np.array([p.field_value(f) == value for p in kb.passages], dtype=bool)

    def __call__(self, filters: Filters | None) -> npt.NDArray[np.bool_] | None:
        """OR within a field, AND across fields; None when nothing is filtered. Unknown values match nothing."""
        out: npt.NDArray[np.bool_] | None = None
        for f, values in (filters or {}).items():
            if not values:
                continue
            m = np.zeros(self.n, dtype=bool)
            for v in values:
                vm = self._masks.get((f, v))
                if vm is not None:
                    m |= vm
            out = m if out is None else (out & m)
        return out


class SparseRetriever:
    """BM25 over the CSR matrix; `scores`/`search` are pure numpy and safe to call from worker threads."""

    name = "bm25"

    def __init__(self, kb: KnowledgeBase, tokenizer: Tokenizer, bm25_cfg: Bm25Config, *, apply_confidence: bool,
                 confidence_weight: float = 1.0, prebuilt: tuple[dict[str, int], bm25.Bm25Matrix] | None = None,
                 masks: FilterMasks | None = None) -> None:
        self.kb = kb
        self.tokenizer = tokenizer
        self.vocab, self.matrix = prebuilt if prebuilt is not None else build_bm25(kb, tokenizer, bm25_cfg)
        self.confidence = np.array([p.confidence for p in kb.passages], dtype=np.float32)
        # Score multiplier per passage: 1 - w + w * confidence, in [1 - w, 1] (w = confidence_weight).
        self.weight_factor = ((1.0 - confidence_weight) + confidence_weight * self.confidence
                              if apply_confidence and confidence_weight > 0 else None)
        self.masks = masks if masks is not None else FilterMasks(kb)

    def mask(self, filters: Filters) -> npt.NDArray[np.bool_] | None:
        return self.masks(filters)

    def query_terms(self, query: str) -> list[int]:
        return [self.vocab.get(t, -1) for t in self.tokenizer(query)]

    def candidates(self, query: str, k: int, mask: npt.NDArray[np.bool_] | None,
                   ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]]:
        """Raw BM25 top-k (indices, scores), no confidence weighting: the input to fusion."""
        scores = bm25.score(self.matrix, self.query_terms(query))
        return top_k(scores, k, mask=mask, min_score=0.0)

    def search(self, query: str, k: int, filters: Filters | None = None) -> list[Hit]:
        scores = bm25.score(self.matrix, self.query_terms(query))
        if self.weight_factor is not None:
            scores *= self.weight_factor
        idx, vals = top_k(scores, k, mask=self.mask(filters or {}), min_score=0.0)
        return [Hit(self.kb.passages[i], float(v)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
