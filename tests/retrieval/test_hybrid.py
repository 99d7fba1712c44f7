"""The hybrid retriever the server runs: modes, pre-filters in both halves, confidence, quality floor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.config import REPO_ROOT, Config
from server.knowledge import load_golden
from server.retrieval.hybrid import HybridRetriever
from server.runtime import Runtime


@pytest.fixture(scope="module")
def hybrid(runtime: Runtime) -> HybridRetriever:
    r = runtime.retriever
    if not isinstance(r, HybridRetriever) or r.dense is None:
        pytest.fail("the default config must serve hybrid retrieval (retrieval.dense.enabled = true)")
    return r


def test_default_is_convex_hybrid(hybrid: HybridRetriever, config: Config) -> None:
    assert hybrid.default_mode == config.retrieval.fusion.mode == "convex"
    assert set(hybrid.modes()) == {"rrf", "convex", "sparse", "dense"}


@pytest.mark.parametrize("mode", ["rrf", "convex", "sparse", "dense"])
def test_filters_apply_inside_both_retrievers(hybrid: HybridRetriever, mode: str) -> None:
    hits = hybrid.search("battery is too hot", 10, {"domain": ["smart_home"], "intent": ["climate"]}, mode)
    assert hits, "a filtered query still finds its best matches"
    assert all(h.passage.domain == "smart_home" and h.passage.intent == "climate" for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_highly_selective_filter_returns_exactly_the_allowed(hybrid: HybridRetriever) -> None:
    hits = hybrid.search("anything about locks", 50, {"locale": ["en-GB"], "domain": ["warehouse"]}, "dense")
    allowed = [p for p in hybrid.kb.passages if p.locale == "en-GB" and p.domain == "warehouse"]
    assert 0 < len(hits) <= len(allowed) and all(h.passage in allowed for h in hits)


def test_fusion_draws_on_both_halves(hybrid: HybridRetriever) -> None:
    # A paraphrase with little word overlap: dense finds what BM25 misses, and fusion keeps it.
    q = "my lights switch themselves on in the middle of the night"
    sparse = {h.passage.id for h in hybrid.search(q, 5, None, "sparse")}
    dense = {h.passage.id for h in hybrid.search(q, 5, None, "dense")}
    fused = {h.passage.id for h in hybrid.search(q, 10, None, "convex")}
    assert fused & (dense - sparse) and fused & sparse


def test_confidence_weights_scale_scores(hybrid: HybridRetriever, runtime: Runtime) -> None:
    q = "how do i reset my smart plug"
    raw_idx, raw_scores = hybrid.sparse.candidates(q, 50, None)
    raw = {runtime.kb.passages[i].id: s for i, s in zip(raw_idx.tolist(), raw_scores.tolist(), strict=True)}
    w = runtime.cfg.retrieval.confidence_weight
    assert 0 < w <= 1
    conf = {p.id: 1 - w + w * p.confidence for p in runtime.kb.passages}
    weighted = hybrid.search(q, 10, None, "sparse")
    for h in weighted:
        assert h.score == pytest.approx(raw[h.passage.id] * conf[h.passage.id], rel=1e-5)
    expected = sorted(raw, key=lambda pid: -raw[pid] * conf[pid])[:10]
    assert [h.passage.id for h in weighted] == expected


def _recall_at(hybrid: HybridRetriever, mode: str, split: str, k: int = 5) -> float:
    found = total = 0
    for kb in ("voice", "warehouse"):
        for g in load_golden(REPO_ROOT / "data" / "kb" / kb, split):
            ids = {h.passage.id for h in hybrid.search(g.question, k, None, mode)}
            found += bool(ids & set(g.relevant))
            total += 1
    return found / total


def test_hybrid_beats_each_half_on_the_train_questions(hybrid: HybridRetriever) -> None:
    """Quality floor on the KB golden *train* set (dev stays the yardstick, reported in bench/)."""
    fused = _recall_at(hybrid, "convex", "train")
    assert fused >= _recall_at(hybrid, "sparse", "train")
    assert fused >= _recall_at(hybrid, "dense", "train")
    assert fused >= 0.9


def test_unknown_mode_is_rejected(hybrid: HybridRetriever) -> None:
    with pytest.raises((ValueError, KeyError)):
        hybrid.search("plug", 5, None, "magic")  # type: ignore[arg-type]


def test_snapshot_with_dense_round_trips(tmp_path: Path, runtime: Runtime, config: Config,
                                         hybrid: HybridRetriever) -> None:
    from server.retrieval.embed_cache import cached_embeddings
    from server.retrieval.snapshot import index_texts, load_snapshot, write_snapshot
    from server.runtime import build_retriever

    enc = hybrid.dense.encoder  # type: ignore[union-attr]
    emb = cached_embeddings(enc, index_texts(runtime.kb))
    write_snapshot(tmp_path / "s", runtime.kb, config, runtime.tokenizer, encoder=enc, embeddings=emb,
                   log=lambda _m: None)
    snap = load_snapshot(tmp_path / "s", runtime.tokenizer, encoder=enc)
    assert snap.manifest["dense"]["dim"] == 384 and snap.hnsw_path is not None
    loaded = build_retriever(snap.kb, config, runtime.tokenizer, encoder=enc, embeddings=snap.embeddings,
                             prebuilt=(snap.vocab, snap.matrix), hnsw_path=snap.hnsw_path)
    try:
        for q in ("thermostat has no power", "forklift pallet shifted e202"):
            a = [h.passage.id for h in loaded.search(q, 10)]
            b = [h.passage.id for h in hybrid.search(q, 10)]
            assert a == b
    finally:
        loaded.close()
    np.testing.assert_allclose(snap.embeddings, emb)
