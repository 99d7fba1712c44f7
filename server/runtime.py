"""Everything a request needs, built once at startup (and replaceable in tests, e.g. a slow stage)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from server.config import Config
from server.fallback import FallbackPlanner
from server.fallback.rules import FaultCode, load_fault_codes
from server.generate.base import Generator
from server.generate.extractive import ExtractiveGenerator, idf_lookup
from server.knowledge import KnowledgeBase, load_knowledge_base
from server.retrieval.sparse import Filters, Hit, SparseRetriever
from server.retrieval.text import Tokenizer
from server.robot_plan import ActionVocabulary

log = logging.getLogger(__name__)


class Retriever(Protocol):
    name: str

    def search(self, query: str, k: int, filters: Filters | None = None) -> list[Hit]:
        """Blocking; called from the CPU pool, never on the event loop."""
        ...


@dataclass
class Runtime:
    cfg: Config
    kb: KnowledgeBase
    tokenizer: Tokenizer
    retriever: Retriever
    generator: Generator
    planner: FallbackPlanner
    vocabulary: ActionVocabulary
    fault_codes: Mapping[str, FaultCode]
    cpu: ThreadPoolExecutor
    load_s: float = 0.0
    stats: dict[str, float] = field(default_factory=dict)

    def close(self) -> None:
        self.cpu.shutdown(wait=False, cancel_futures=True)


def build_runtime(cfg: Config) -> Runtime:
    t0 = time.perf_counter()
    kb = load_knowledge_base([cfg.resolve_path(p) for p in cfg.knowledge_base.paths])
    tok_cfg = cfg.retrieval.tokenizer
    tokenizer = Tokenizer(lowercase=tok_cfg.lowercase, stopwords=tok_cfg.stopwords, stem=tok_cfg.stem)
    sparse = SparseRetriever(kb, tokenizer, cfg.retrieval.bm25, apply_confidence=cfg.retrieval.apply_confidence)
    generator = ExtractiveGenerator(tokenizer, idf_lookup(sparse.vocab, sparse.matrix.idf.tolist()),
                                    max_passages=cfg.generation.max_passages, min_support=cfg.generation.min_support)
    vocabulary = ActionVocabulary.load(cfg.resolve_path(cfg.fallback.actions_path))
    fault_codes_path = cfg.resolve_path(cfg.fallback.fault_codes_path)
    planner = FallbackPlanner.load(cfg.resolve_path(cfg.fallback.rules_path), vocabulary, fault_codes_path)
    rt = Runtime(cfg=cfg, kb=kb, tokenizer=tokenizer, retriever=sparse, generator=generator, planner=planner,
                 vocabulary=vocabulary, fault_codes=load_fault_codes(fault_codes_path),
                 cpu=ThreadPoolExecutor(max_workers=cfg.server.cpu_workers, thread_name_prefix="snaprag-cpu"))
    rt.load_s = time.perf_counter() - t0
    log.info("loaded %d passages (%d terms) and %d fallback rules in %.0f ms", len(kb), len(sparse.vocab),
             len(planner.rulebook.fault_rules), rt.load_s * 1000)
    return rt
