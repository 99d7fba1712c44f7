"""Everything a request needs, built once at startup (and replaceable in tests, e.g. a slow stage)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from server.config import Config
from server.fallback import FallbackPlanner
from server.fallback.rules import FaultCode, load_fault_codes
from server.generate.base import Generator
from server.generate.extractive import ExtractiveGenerator, idf_lookup
from server.knowledge import KnowledgeBase, load_knowledge_base
from server.load import CpuPool
from server.retrieval.sparse import Filters, Hit, SparseRetriever
from server.retrieval.text import Tokenizer

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from server.retrieval.encoder import OnnxEncoder
    from server.retrieval.hybrid import HybridRetriever
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
    reranker: Any = None
    """The cross-encoder (server.rerank.cross_encoder.CrossEncoder) when rerank.enabled, else None."""
    rerank_pair_ms: float | None = None
    """What the reranker's warm-up measured per pair on this machine (seeds the stage's cost model)."""
    backends: dict[str, Any] = field(default_factory=dict)
    """Model backends by kind ("vllm", "local"; server.generate.backend.TextBackend), shared by the voice
    and robot policies; started before health reports SERVING, closed on shutdown."""
    robot_backend: Any = None
    """The backend that may adapt robot plans ([generation.robot]); None = RETRIEVED and RULES only."""
    prompts: Any = None
    """server.generate.prompt.PromptBuilder for model tiers (None when no model tier is configured)."""
    robot_model: Any = None
    """server.generate.robot.RobotPlanModel when [generation.robot] names a backend, else None."""
    index: Any = None
    """server.index.live.LiveIndex when [admin] enabled (retriever and kb then follow its live view), else
    None: the index is static, built at startup."""
    faults: Any = None
    """server.faults.FaultSwitch when [faults] enabled (the parts above are then wrapped), else None."""

    async def start_backends(self) -> None:
        for backend in self.backends.values():
            await backend.start()

    async def close_backends(self) -> None:
        for backend in self.backends.values():
            try:
                await backend.close()
            except Exception:  # shutdown goes on; the log says what did not close cleanly
                log.exception("closing the %s backend failed", backend.name)

    def close(self) -> None:
        self.cpu.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.retriever, "close", None)
        if close is not None:
            close()


def make_tokenizer(cfg: Config) -> Tokenizer:
    t = cfg.retrieval.tokenizer
    return Tokenizer(lowercase=t.lowercase, stopwords=t.stopwords, stem=t.stem)


def load_encoder(cfg: Config) -> OnnxEncoder | None:
    """The dense query/passage encoder, when dense retrieval is enabled (errors name the fix)."""
    dc = cfg.retrieval.dense
    if not dc.enabled:
        return None
    from server.retrieval.encoder import OnnxEncoder

    return OnnxEncoder.load(cfg.resolve_path(dc.model_dir), max_length=dc.max_length,
                            intra_op_threads=dc.intra_op_threads, query_max_length=dc.query_max_length)


def build_retriever(kb: KnowledgeBase, cfg: Config, tokenizer: Tokenizer, *, encoder: Any = None,
                    embeddings: npt.NDArray[np.float32] | None = None, prebuilt: Any = None,
                    hnsw_path: Any = None, progress: bool = False) -> HybridRetriever:
    """BM25 always; dense too when an encoder is given (embeddings computed, or loaded with the graph)."""
    from server.retrieval.hybrid import DenseRetriever, HybridRetriever

    sparse = SparseRetriever(kb, tokenizer, cfg.retrieval.bm25, apply_confidence=cfg.retrieval.apply_confidence,
                             confidence_weight=cfg.retrieval.confidence_weight, prebuilt=prebuilt)
    dense = None
    if encoder is not None:
        from server.retrieval.dense import HnswIndex
        from server.retrieval.embed_cache import cached_embeddings
        from server.retrieval.snapshot import index_texts

        dc = cfg.retrieval.dense
        if embeddings is None:
            embeddings = cached_embeddings(encoder, index_texts(kb), batch_size=dc.batch_size, progress=progress)
        if hnsw_path is not None:
            index = HnswIndex.load(hnsw_path, dim=embeddings.shape[1], ef=dc.hnsw_ef)
        else:
            index = HnswIndex.build(embeddings, m=dc.hnsw_m, ef_construction=dc.hnsw_ef_construction, ef=dc.hnsw_ef)
        dense = DenseRetriever(encoder, index)
    return HybridRetriever(kb, sparse, dense, cfg.retrieval.fusion, apply_confidence=cfg.retrieval.apply_confidence)


def load_reranker(cfg: Config) -> tuple[Any, float | None]:
    """The cross-encoder when rerank is enabled, loaded and warmed (a bad model stops startup here)."""
    rc = cfg.rerank
    if not rc.enabled:
        return None, None
    from server.rerank.cross_encoder import CrossEncoder

    reranker = CrossEncoder.load(cfg.resolve_path(rc.model_dir), model_file=rc.model_file,
                                 tokenizer_file=rc.tokenizer_file, max_length=rc.max_length,
                                 intra_op_threads=rc.intra_op_threads)
    return reranker, reranker.warm_up(batch_size=rc.batch_size)


def build_backends(cfg: Config) -> dict[str, Any]:
    """One backend per kind the policies name (imports only what is used: no torch for vllm-only)."""
    kinds = {cfg.generation.voice.backend, cfg.generation.robot.backend} & {"vllm", "local"}
    backends: dict[str, Any] = {}
    if "vllm" in kinds:
        from server.generate.vllm import VllmBackend

        backends["vllm"] = VllmBackend(cfg.generation.vllm)
    if "local" in kinds:
        from server.generate.local import LocalBackend

        backends["local"] = LocalBackend(cfg.generation.local, cfg.resolve_path)
    return backends


def build_voice_generator(cfg: Config, extractive: ExtractiveGenerator, backends: Mapping[str, Any],
                          tokenizer: Tokenizer, encoder: Any, cpu: ThreadPoolExecutor) -> tuple[Generator, Any]:
    """The voice policy's generator, and the prompt builder model tiers share (None without one)."""
    from server.generate.grounding import GroundingChecker
    from server.generate.policy import PolicyGenerator
    from server.generate.prompt import PromptBuilder, approx_tokens

    g = cfg.generation
    if not backends:
        return PolicyGenerator(g.voice, g, extractive=extractive), None
    # Prompt sizes are counted with the model's own tokenizer when the backend has one in process,
    # else with MiniLM's WordPiece (close to a BPE count for English), else by characters.
    counter = next((b.count_tokens for b in backends.values() if hasattr(b, "count_tokens")), None)
    if counter is None:
        counter = encoder.count_tokens if encoder is not None else approx_tokens
    prompts = PromptBuilder(g.prompt, counter)
    grounding = GroundingChecker(g.grounding, tokenizer, encoder)
    return PolicyGenerator(g.voice, g, extractive=extractive, backend=backends.get(g.voice.backend),
                           prompts=prompts, grounding=grounding, cpu=cpu), prompts


def build_robot_model(cfg: Config, backends: Mapping[str, Any], vocabulary: ActionVocabulary,
                      prompts: Any) -> Any:
    backend = backends.get(cfg.generation.robot.backend)
    if backend is None:
        return None
    from server.generate.robot import RobotPlanModel

    return RobotPlanModel(cfg.generation.robot, cfg.generation, backend, vocabulary, prompts.count)


def build_runtime(cfg: Config) -> Runtime:
    t0 = time.perf_counter()
    reranker, pair_ms = load_reranker(cfg)
    tokenizer = make_tokenizer(cfg)
    encoder = load_encoder(cfg)
    live = None
    kb: Any
    retriever: Any
    if cfg.admin.enabled:
        # The live index (IndexAdmin writes, gated swaps): retriever and kb follow its current view.
        from server.index.live import LiveIndex, load_ingest_encoder
        from server.index.serving import LiveKnowledge, LiveRetriever, live_idf_lookup

        live = LiveIndex.open(cfg, tokenizer, encoder, load_ingest_encoder(cfg))
        kb, retriever, idf = LiveKnowledge(live), LiveRetriever(live), live_idf_lookup(live)
        terms = len(live.view.gen.main_vocab)
    else:
        if cfg.knowledge_base.snapshot:
            from server.retrieval.snapshot import load_snapshot

            snap = load_snapshot(cfg.resolve_path(cfg.knowledge_base.snapshot), tokenizer, encoder=encoder)
            kb = snap.kb
            retriever = build_retriever(kb, cfg, tokenizer, encoder=encoder, embeddings=snap.embeddings,
                                        prebuilt=(snap.vocab, snap.matrix), hnsw_path=snap.hnsw_path)
        else:
            kb = load_knowledge_base([cfg.resolve_path(p) for p in cfg.knowledge_base.paths])
            retriever = build_retriever(kb, cfg, tokenizer, encoder=encoder)
        sparse = retriever.sparse
        idf = idf_lookup(sparse.vocab, sparse.matrix.idf.tolist())
        terms = len(sparse.vocab)
    extractive = ExtractiveGenerator(tokenizer, idf, max_passages=cfg.generation.max_passages,
                                     min_support=cfg.generation.min_support)
    # CpuPool: a ThreadPoolExecutor that measures its own queue, for admission control (server/load.py).
    cpu = CpuPool(max_workers=cfg.server.cpu_workers, thread_name_prefix="snaprag-cpu", nice=cfg.server.cpu_nice)
    backends = build_backends(cfg)
    faults = None
    if cfg.faults.enabled:  # fault injection (tests, bench): wrappers installed here, nowhere else
        from server.faults import FaultSwitch

        faults = FaultSwitch.from_config(cfg.faults)
        backends = {kind: faults.wrap_backend(b) for kind, b in backends.items()}
        retriever, reranker = faults.wrap_retriever(retriever), faults.wrap_reranker(reranker)
    generator, prompts = build_voice_generator(cfg, extractive, backends, tokenizer, encoder, cpu)
    vocabulary = ActionVocabulary.load(cfg.resolve_path(cfg.fallback.actions_path))
    fault_codes_path = cfg.resolve_path(cfg.fallback.fault_codes_path)
    planner = FallbackPlanner.load(cfg.resolve_path(cfg.fallback.rules_path), vocabulary, fault_codes_path)
    rt = Runtime(cfg=cfg, kb=kb, tokenizer=tokenizer, retriever=retriever, generator=generator, planner=planner,
                 vocabulary=vocabulary, fault_codes=load_fault_codes(fault_codes_path),
                 cpu=cpu, reranker=reranker, rerank_pair_ms=pair_ms, backends=backends,
                 robot_backend=backends.get(cfg.generation.robot.backend), prompts=prompts,
                 robot_model=build_robot_model(cfg, backends, vocabulary, prompts), index=live, faults=faults)
    if faults is not None:
        rt.generator = faults.wrap_generator(generator)
    rt.load_s = time.perf_counter() - t0
    log.info("loaded %d passages (%d terms, dense %s%s) and %d fallback rules in %.0f ms", len(kb), terms,
             "on" if retriever.dense is not None else "off", ", live index" if live is not None else "",
             len(planner.rulebook.fault_rules), rt.load_s * 1000)
    return rt
