"""kernels/topk.top_k against a full stable sort (score descending, then index ascending)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from kernels.topk import top_k


def reference(scores: npt.NDArray[np.floating], k: int, mask: npt.NDArray[np.bool_] | None = None,
              min_score: float | None = None) -> npt.NDArray[np.int64]:
    keep = np.ones(scores.shape[0], dtype=bool) if mask is None else mask.copy()
    if min_score is not None:
        keep &= scores > min_score
    idx = np.flatnonzero(keep)
    order = np.lexsort((idx, -scores[idx]))  # full sort: score descending, lower index first
    return idx[order][: max(k, 0)].astype(np.int64)


def check(scores: npt.NDArray[np.floating], k: int, **kw) -> None:  # type: ignore[no-untyped-def]
    before = scores.copy()
    idx, vals = top_k(scores, k, **kw)
    expected = reference(scores, k, **kw)
    assert idx.dtype == np.int64
    assert vals.dtype == scores.dtype
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(vals, scores[expected])
    np.testing.assert_array_equal(scores, before)  # the input is not reordered in place


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 100, 5000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_full_sort(seed: int, n: int, dtype: type) -> None:
    scores: npt.NDArray[np.floating] = np.random.default_rng([seed, n]).normal(size=n).astype(dtype)
    for k in (1, 3, n // 2, n - 1, n, n + 5):
        check(scores, k)


def test_k_larger_than_n_returns_everything_sorted() -> None:
    scores = np.array([0.5, 2.0, -1.0, 1.0], dtype=np.float32)
    idx, vals = top_k(scores, 100)
    assert idx.tolist() == [1, 3, 0, 2]
    assert vals.tolist() == [2.0, 1.0, 0.5, -1.0]


@pytest.mark.parametrize("k", [0, -1])
def test_k_zero_or_negative_is_empty(k: int) -> None:
    idx, vals = top_k(np.arange(5, dtype=np.float32), k)
    assert idx.shape == (0,) and idx.dtype == np.int64
    assert vals.shape == (0,) and vals.dtype == np.float32


def test_empty_input() -> None:
    idx, vals = top_k(np.empty(0, dtype=np.float32), 5)
    assert idx.shape == vals.shape == (0,)
    idx, vals = top_k(np.empty(0, dtype=np.float32), 5, mask=np.empty(0, dtype=bool), min_score=0.0)
    assert idx.shape == vals.shape == (0,)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mask_applies_before_selection(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=300).astype(np.float32)
    mask = rng.random(300) < 0.3
    for k in (1, 5, 50, 300):
        check(scores, k, mask=mask)
    # The best entries overall are masked out, yet k entries still come back.
    mask = np.ones(300, dtype=bool)
    mask[np.argsort(-scores)[:10]] = False
    idx, _ = top_k(scores, 10, mask=mask)
    assert len(idx) == 10 and mask[idx].all()


def test_mask_all_false_is_empty() -> None:
    idx, vals = top_k(np.ones(10, dtype=np.float32), 3, mask=np.zeros(10, dtype=bool))
    assert idx.shape == vals.shape == (0,)


def test_min_score_drops_entries_at_or_below_it() -> None:
    scores = np.array([0.0, 2.0, -1.0, 0.5, 0.0, 3.0], dtype=np.float32)
    idx, vals = top_k(scores, 10, min_score=0.0)
    assert idx.tolist() == [5, 1, 3]
    assert vals.tolist() == [3.0, 2.0, 0.5]
    idx, _ = top_k(scores, 10, min_score=2.0)
    assert idx.tolist() == [5]  # 2.0 itself is dropped
    assert top_k(scores, 10, min_score=5.0)[0].shape == (0,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_and_min_score_together(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=500)
    mask = rng.random(500) < 0.5
    for k in (1, 10, 500):
        check(scores, k, mask=mask, min_score=0.25)


def test_ties_inside_the_selection_are_broken_by_lower_index() -> None:
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0], dtype=np.float32)
    assert top_k(scores, 5)[0].tolist() == [1, 2, 4, 3, 0]
    # The three 3.0s are exactly the top 3: no tie straddles the cut.
    assert top_k(scores, 3)[0].tolist() == [1, 2, 4]
    assert top_k(np.zeros(6, dtype=np.float32), 6)[0].tolist() == [0, 1, 2, 3, 4, 5]


def test_ties_at_the_cut_keep_the_lower_indices() -> None:
    for seed in range(10):
        scores = np.random.default_rng(seed).integers(0, 4, 200).astype(np.float32)  # ties at every cut
        for k in (1, 5, 37, 120):
            check(scores, k)
