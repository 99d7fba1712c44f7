"""kernels/fusion against hand-computed examples and slow pure-Python references."""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest

from kernels.fusion import apply_confidence, convex, minmax, rrf


def rrf_reference(lists: list[list[int]], k: float, weights: list[float] | None) -> tuple[list[int], list[float]]:
    """Cormack et al. 2009 read literally: a dict of sums, then a full sort (score desc, index asc)."""
    w = weights if weights is not None else [1.0] * len(lists)
    fused: dict[int, float] = {}
    for wi, lst in zip(w, lists, strict=True):
        for rank, doc in enumerate(lst, start=1):
            fused[doc] = fused.get(doc, 0.0) + wi / (k + rank)
    order = sorted(fused, key=lambda d: (-fused[d], d))
    return order, [fused[d] for d in order]


def convex_reference(lists: list[tuple[list[int], list[float]]], weights: list[float]) -> tuple[list[int], list[float]]:
    fused: dict[int, float] = {}
    for wi, (docs, scores) in zip(weights, lists, strict=True):
        if not docs:
            continue
        lo, hi = min(scores), max(scores)
        for d, s in zip(docs, scores, strict=True):
            norm = 1.0 if hi == lo else (s - lo) / (hi - lo)
            fused[d] = fused.get(d, 0.0) + wi * norm
    order = sorted(fused, key=lambda d: (-fused[d], d))
    return order, [fused[d] for d in order]


# -- RRF ----------------------------------------------------------------------------------------------

def test_rrf_hand_computed() -> None:
    # doc 1: ranks 1 and 2; doc 3: ranks 3 and 1; doc 2: rank 2 in list 0 only; doc 4: rank 3 in list 1 only.
    idx, scores = rrf([np.array([1, 2, 3]), np.array([3, 1, 4])], k=60)
    expected = {1: Fraction(1, 61) + Fraction(1, 62), 3: Fraction(1, 63) + Fraction(1, 61),
                2: Fraction(1, 62), 4: Fraction(1, 63)}
    assert idx.tolist() == [1, 3, 2, 4]
    assert idx.dtype == np.int64 and scores.dtype == np.float64
    np.testing.assert_allclose(scores, [float(expected[d]) for d in idx.tolist()], rtol=1e-15)


def test_rrf_weights_and_ties() -> None:
    # Doc 7 is first in list 0, doc 5 first in list 1: equal scores, lower index first.
    idx, scores = rrf([np.array([7]), np.array([5])], k=0)
    assert idx.tolist() == [5, 7]
    np.testing.assert_array_equal(scores, [1.0, 1.0])
    # Weight list 0 twice as much: doc 7 now wins.
    idx, scores = rrf([np.array([7]), np.array([5])], k=0, weights=[2.0, 1.0])
    assert idx.tolist() == [7, 5]
    np.testing.assert_array_equal(scores, [2.0, 1.0])
    # A zero weight silences a list's ranking (its documents stay, at score 0).
    idx, scores = rrf([np.array([1, 2]), np.array([2, 1])], k=1, weights=[0.0, 1.0])
    assert idx.tolist() == [2, 1]
    np.testing.assert_allclose(scores, [1 / 2, 1 / 3])


@pytest.mark.parametrize("seed", range(20))
def test_rrf_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_lists = int(rng.integers(1, 5))
    lists = [rng.permutation(60)[: int(rng.integers(0, 40))].tolist() for _ in range(n_lists)]
    k = float(rng.choice([0.0, 1.0, 60.0, 7.5]))
    weights = None if seed % 2 else rng.uniform(0, 2, n_lists).round(1).tolist()
    idx, scores = rrf([np.array(x, dtype=np.int64) for x in lists], k=k, weights=weights)
    ref_idx, ref_scores = rrf_reference(lists, k, weights)
    assert idx.tolist() == ref_idx
    np.testing.assert_array_equal(scores, ref_scores)  # same additions in the same order: bit-identical


def test_rrf_empty() -> None:
    for lists in ([], [np.array([], dtype=np.int64)], [np.array([], dtype=np.int64)] * 3):
        idx, scores = rrf(lists)
        assert idx.shape == (0,) and idx.dtype == np.int64 and scores.dtype == np.float64
    idx, _ = rrf([np.array([], dtype=np.int64), np.array([4, 2])])
    assert idx.tolist() == [4, 2]


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"lists": [np.array([1])], "k": -1.0}, "k"),
    ({"lists": [np.array([1])], "k": float("nan")}, "k"),
    ({"lists": [np.array([1]), np.array([2])], "weights": [1.0]}, "weights"),
    ({"lists": [np.array([1])], "weights": [-0.5]}, "weights"),
    ({"lists": [np.array([1])], "weights": [float("inf")]}, "weights"),
    ({"lists": [np.array([[1, 2]])]}, "lists[0]"),
    ({"lists": [np.array([1]), np.array([0.5])]}, "lists[1]"),
    ({"lists": [np.array([-1])]}, "lists[0]"),
    ({"lists": [np.array([3, 1, 3])]}, "lists[0]"),
])
def test_rrf_validation(kwargs: dict, name: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=r"^" + re.escape(name) + ":"):
        rrf(**kwargs)


# -- min-max and convex -------------------------------------------------------------------------------

def test_minmax() -> None:
    np.testing.assert_array_equal(minmax([2.0, 4.0, 6.0]), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(minmax(np.array([-1.0, 0.0, 3.0], dtype=np.float32)), [0.0, 0.25, 1.0])
    assert minmax([]).shape == (0,)
    np.testing.assert_array_equal(minmax([0.3]), [1.0])  # a lone candidate is its list's best
    np.testing.assert_array_equal(minmax([5.0, 5.0, 5.0]), [1.0, 1.0, 1.0])  # no preference: all best
    assert minmax([1, 2]).dtype == np.float64
    for bad in ([1.0, float("nan")], [float("inf"), 0.0]):
        with pytest.raises(ValueError, match=r"^scores:"):
            minmax(bad)
    with pytest.raises(ValueError, match=r"^scores:"):
        minmax(np.ones((2, 2)))


def test_convex_hand_computed() -> None:
    sparse = (np.array([10, 11, 12]), np.array([9.0, 5.0, 1.0]))  # -> 1, 0.5, 0
    dense = (np.array([12, 13]), np.array([0.8, 0.6]))  # -> 1, 0
    idx, scores = convex([sparse, dense], weights=[0.5, 0.5])
    # 10: 0.5; 11: 0.25; 12: 0 + 0.5 = 0.5 (tie with 10, higher index); 13: 0.
    assert idx.tolist() == [10, 12, 11, 13]
    np.testing.assert_allclose(scores, [0.5, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("seed", range(20))
def test_convex_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lists = []
    for _ in range(int(rng.integers(1, 4))):
        m = int(rng.integers(0, 30))
        docs = rng.permutation(50)[:m].tolist()
        # Rounded scores make ties (within and across lists) likely.
        scores = sorted(rng.normal(size=m).round(1).tolist(), reverse=True)
        lists.append((docs, scores))
    weights = rng.uniform(0, 1, len(lists)).tolist()
    idx, fused = convex([(np.array(d, dtype=np.int64), np.array(s)) for d, s in lists], weights)
    ref_idx, ref_scores = convex_reference(lists, weights)
    np.testing.assert_allclose(fused, ref_scores, rtol=1e-12, atol=1e-15)
    assert sorted(idx.tolist()) == sorted(ref_idx)
    # Order: descending, ties by lower index (checked on our own scores, free of rounding noise).
    np.testing.assert_array_equal(np.lexsort((idx, -fused)), np.arange(idx.size))


def test_convex_validation() -> None:
    pair = (np.array([1, 2]), np.array([0.5, 0.1]))
    with pytest.raises(ValueError, match=r"^weights:"):
        convex([pair, pair], weights=[1.0])
    with pytest.raises(ValueError, match=r"^weights:"):
        convex([pair], weights=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^weights:"):
        convex([pair], weights=[-1.0])
    with pytest.raises(ValueError, match=r"^lists_with_scores\[0\]:"):
        convex([(np.array([1, 2]), np.array([0.5]))], weights=[1.0])
    with pytest.raises(ValueError, match=r"^lists_with_scores\[1\] indices:"):
        convex([pair, (np.array([4, 4]), np.array([1.0, 0.0]))], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"^scores:"):
        convex([(np.array([1, 2]), np.array([0.5, np.nan]))], weights=[1.0])
    assert convex([], weights=[])[0].shape == (0,)


# -- confidence ---------------------------------------------------------------------------------------

def test_apply_confidence() -> None:
    confidence = np.array([1.0, 0.5, 0.9, 0.0, 1.0])
    idx, scores = apply_confidence(np.array([1, 2, 4, 3]), np.array([0.8, 0.5, 0.45, 0.3]), confidence)
    # 1: 0.4; 2: 0.45; 4: 0.45 (tie: lower index first); 3: 0.
    assert idx.tolist() == [2, 4, 1, 3]
    np.testing.assert_allclose(scores, [0.45, 0.45, 0.4, 0.0])
    assert idx.dtype == np.int64 and scores.dtype == np.float64
    empty_idx, empty_scores = apply_confidence(np.array([], dtype=np.int64), np.array([]), confidence)
    assert empty_idx.shape == empty_scores.shape == (0,)


def test_apply_confidence_on_rrf_scale() -> None:
    # The docstring's note: with k = 60 a confidence of 0.9 moves a rank-1 document below rank ~7.
    ranked = np.arange(20)
    idx, scores = rrf([ranked], k=60)
    confidence = np.ones(20)
    confidence[0] = 0.9
    idx, _ = apply_confidence(idx, scores, confidence)
    assert int(np.flatnonzero(idx == 0)[0]) == 6  # 0.9 / 61 lies between 1 / 67 and 1 / 68


def test_apply_confidence_validation() -> None:
    conf = np.array([1.0, 0.5])
    with pytest.raises(ValueError, match=r"^scores:"):
        apply_confidence(np.array([0, 1]), np.array([1.0]), conf)
    with pytest.raises(ValueError, match=r"^indices:"):
        apply_confidence(np.array([2]), np.array([1.0]), conf)
    with pytest.raises(ValueError, match=r"^scores:"):
        apply_confidence(np.array([0]), np.array([-0.1]), conf)
    with pytest.raises(ValueError, match=r"^confidence:"):
        apply_confidence(np.array([0]), np.array([1.0]), np.array([1.5]))
    with pytest.raises(ValueError, match=r"^confidence:"):
        apply_confidence(np.array([0]), np.array([1.0]), np.ones((1, 1)))
