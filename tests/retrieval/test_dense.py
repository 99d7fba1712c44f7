"""server/retrieval/dense.HnswIndex against exact (numpy brute-force) search.

The corpus is bench.dense.synthetic_corpus (the benchmark's generator): 20k clustered 384-d unit
vectors with held-out queries. The graph is built once per module at the DenseConfig defaults on 2
threads (about 5-10 s on a 2-core machine; 1 thread takes ~2-3x longer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bench.dense import recall_at, synthetic_corpus
from server.config import DenseConfig
from server.retrieval.dense import HnswIndex, exact_search

N, DIM, N_QUERIES = 20_000, 384, 200


@pytest.fixture(scope="module")
def corpus() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    return synthetic_corpus(N, N_QUERIES, dim=DIM, seed=7)


@pytest.fixture(scope="module")
def index(corpus: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]) -> HnswIndex:
    cfg = DenseConfig()
    return HnswIndex.build(corpus[0], m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction, ef=cfg.hnsw_ef,
                           threads=2, seed=7)


@pytest.fixture
def small() -> HnswIndex:
    """300 rows with the exact-search shortcut off, so filtered searches take the graph path."""
    x, _ = synthetic_corpus(300, 1, dim=32, seed=3)
    idx = HnswIndex.build(x, m=8, ef_construction=50, ef=16, threads=1)
    idx.exact_max_rows, idx.exact_max_fraction = 0, 0.0
    return idx


def exact_truth(matrix: npt.NDArray[np.float32], queries: npt.NDArray[np.float32], k: int,
                mask: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.int64]:
    return np.stack([exact_search(matrix, q, k, mask)[0] for q in queries])


def test_recall_at_default_config(index: HnswIndex, corpus: tuple[np.ndarray, np.ndarray]) -> None:
    queries = corpus[1]
    assert len(index) == N and index.dim == DIM and index.ef == DenseConfig().hnsw_ef
    found, _ = index.search_batch(queries, 10)
    recall = recall_at(found, exact_truth(index.vectors, queries, 10))
    assert recall >= 0.98, f"recall@10 {recall:.4f} at the DenseConfig defaults"
    # The single-query path (one thread, as the server calls it) walks the same graph.
    for q, row in zip(queries[:20], found[:20], strict=True):
        np.testing.assert_array_equal(index.search(q, 10)[0], row)


def test_scores_are_inner_products(index: HnswIndex, corpus: tuple[np.ndarray, np.ndarray]) -> None:
    raw_rows, queries = corpus
    for q in queries[:10]:
        scaled = q * 3.0  # queries are normalised inside: scale does not change the answer
        idx, scores = index.search(scaled, 10)
        assert idx.dtype == np.int64 and scores.dtype == np.float32
        unit = raw_rows[idx] / np.linalg.norm(raw_rows[idx], axis=1, keepdims=True)
        np.testing.assert_allclose(scores, unit @ (q / np.linalg.norm(q)), atol=1e-5)
        assert np.all(np.diff(scores) <= 1e-6)  # best first
    batch_idx, batch_scores = index.search_batch(queries[:10], 10)
    expected = np.einsum("qkd,qd->qk", index.vectors[batch_idx], queries[:10])
    np.testing.assert_allclose(batch_scores, expected, atol=1e-5)


def test_filtered_moderate_selectivity_uses_the_graph(index: HnswIndex, corpus: tuple[np.ndarray, np.ndarray]) -> None:
    mask = np.random.default_rng(1).random(N) < 0.3
    allowed = int(mask.sum())
    assert allowed > index.exact_max_rows and allowed > index.exact_max_fraction * N  # graph path
    queries = corpus[1][:100]
    found = []
    for q in queries:
        idx, scores = index.search(q, 10, mask=mask)
        assert idx.shape == (10,) and mask[idx].all()
        np.testing.assert_allclose(scores, index.vectors[idx] @ q, atol=1e-5)
        found.append(idx)
    recall = recall_at(np.stack(found), exact_truth(index.vectors, queries, 10, mask))
    assert recall >= 0.95, f"filtered recall@10 {recall:.4f} at 30% selectivity"


def test_filtered_high_selectivity_is_exact(index: HnswIndex, corpus: tuple[np.ndarray, np.ndarray]) -> None:
    mask = np.random.default_rng(2).random(N) < 0.01  # ~200 rows: exact search over them
    for q in corpus[1][:50]:
        idx, scores = index.search(q, 10, mask=mask)
        ref_idx, ref_scores = exact_search(index.vectors, q, 10, mask)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


def test_k_larger_than_allowed(index: HnswIndex, corpus: tuple[np.ndarray, np.ndarray], small: HnswIndex) -> None:
    q = corpus[1][0]
    mask = np.zeros(N, dtype=bool)
    mask[[5, 17, 4000, 19999]] = True
    idx, _ = index.search(q, 10, mask=mask)
    assert sorted(idx.tolist()) == [5, 17, 4000, 19999]
    np.testing.assert_array_equal(idx, exact_search(index.vectors, q, 10, mask)[0])
    # Graph path (shortcut off): k is clamped to the allowed count before hnswlib sees it.
    m = np.zeros(len(small), dtype=bool)
    m[::50] = True
    qs = small.vectors[7]
    idx, _ = small.search(qs, 50, mask=m)
    assert sorted(idx.tolist()) == list(range(0, len(small), 50))
    # Unfiltered: k beyond the index size returns every row once.
    idx, _ = small.search(qs, 1000)
    assert sorted(idx.tolist()) == list(range(len(small)))
    assert small.search_batch(small.vectors[:3], 1000)[0].shape == (3, len(small))


def test_empty_and_full_masks(index: HnswIndex, corpus: tuple[np.ndarray, np.ndarray]) -> None:
    q = corpus[1][3]
    idx, scores = index.search(q, 10, mask=np.zeros(N, dtype=bool))
    assert idx.shape == scores.shape == (0,) and idx.dtype == np.int64 and scores.dtype == np.float32
    full_idx, full_scores = index.search(q, 10, mask=np.ones(N, dtype=bool))
    plain_idx, plain_scores = index.search(q, 10)
    np.testing.assert_array_equal(full_idx, plain_idx)
    np.testing.assert_array_equal(full_scores, plain_scores)
    assert index.search(q, 0)[0].shape == (0,)


def test_graph_filter_falls_back_when_the_walk_comes_up_short(small: HnswIndex) -> None:
    # ef=1 and a sparse mask: hnswlib cannot collect k allowed rows and raises; we answer exactly.
    small.ef = 1
    m = np.zeros(len(small), dtype=bool)
    m[[3, 150, 299]] = True
    q = small.vectors[0]
    idx, scores = small.search(q, 3, mask=m)
    ref_idx, ref_scores = exact_search(small.vectors, q, 3, m)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


def test_save_load_round_trip(index: HnswIndex, corpus: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path = tmp_path / "dense.hnsw"
    index.save(path)
    loaded = HnswIndex.load(path, dim=DIM, ef=index.ef)
    assert len(loaded) == len(index) and loaded.dim == index.dim and loaded.ef == index.ef
    np.testing.assert_array_equal(loaded.vectors, index.vectors)
    queries = corpus[1][:50]
    for a, b in zip(index.search_batch(queries, 10), loaded.search_batch(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    mask = np.random.default_rng(3).random(N) < 0.3
    for q in queries[:10]:
        for a, b in zip(index.search(q, 10, mask=mask), loaded.search(q, 10, mask=mask), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds 384-d vectors, cannot load with dim=128"):
        HnswIndex.load(path, dim=128, ef=64)
    (tmp_path / "junk.hnsw").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="too short"):
        HnswIndex.load(tmp_path / "junk.hnsw", dim=DIM, ef=64)
    with pytest.raises(FileNotFoundError):
        HnswIndex.load(tmp_path / "missing.hnsw", dim=DIM, ef=64)


def test_single_thread_build_is_deterministic() -> None:
    x, q = synthetic_corpus(2000, 20, dim=64, seed=11)
    a = HnswIndex.build(x, m=16, ef_construction=100, ef=32, threads=1, seed=5)
    b = HnswIndex.build(x, m=16, ef_construction=100, ef=32, threads=1, seed=5)
    for ra, rb in zip(a.search_batch(q, 10), b.search_batch(q, 10), strict=True):
        np.testing.assert_array_equal(ra, rb)


def test_add_grows_past_capacity(small: HnswIndex) -> None:
    n = len(small)
    extra, _ = synthetic_corpus(200, 1, dim=small.dim, seed=99)  # more than the 25 % headroom
    labels = small.add(extra)
    np.testing.assert_array_equal(labels, np.arange(n, n + 200))
    assert len(small) == n + 200
    for row in (0, 123, 199):
        idx, scores = small.search(extra[row], 1)
        assert idx.tolist() == [n + row] and scores[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"^vectors:"):
        small.add(np.ones((2, small.dim + 1), np.float32))


def test_exact_search_matches_full_sort() -> None:
    rng = np.random.default_rng(0)
    # Small integers: every dot product is exact in float32, so equal scores are real ties.
    matrix = rng.integers(-3, 4, size=(500, 16)).astype(np.float32)
    query = rng.integers(-2, 3, size=16).astype(np.float32)
    sims = matrix @ query
    for mask in (None, rng.random(500) < 0.1, rng.random(500) < 0.7):
        keep = np.arange(500) if mask is None else np.flatnonzero(mask)
        ref = keep[np.lexsort((keep, -sims[keep]))][:25]
        idx, scores = exact_search(matrix, query, 25, mask)
        np.testing.assert_array_equal(idx, ref)
        np.testing.assert_allclose(scores, sims[ref], atol=1e-5)


def test_input_validation(small: HnswIndex) -> None:
    q = small.vectors[0]
    with pytest.raises(ValueError, match=r"^query:"):
        small.search(q[:-1], 5)
    with pytest.raises(ValueError, match=r"^query:"):
        small.search(np.zeros_like(q), 5)
    with pytest.raises(ValueError, match=r"^k:"):
        small.search(q, -1)
    with pytest.raises(ValueError, match=r"^mask:"):
        small.search(q, 5, mask=np.ones(len(small) - 1, dtype=bool))
    with pytest.raises(ValueError, match=r"^mask:"):
        small.search(q, 5, mask=np.ones(len(small), dtype=np.int8))
    with pytest.raises(ValueError, match=r"^vectors:"):
        HnswIndex.build(np.zeros((3, 8), np.float32), m=8, ef_construction=20, ef=10)
    with pytest.raises(ValueError, match=r"^vectors:"):
        HnswIndex.build(np.ones(8, np.float32), m=8, ef_construction=20, ef=10)
    with pytest.raises(ValueError, match=r"^ef:"):
        small.ef = 0
