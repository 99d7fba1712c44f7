"""bench.histogram: HDR percentiles against numpy on the same samples, merging, encoding, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.histogram import REPORTED, LatencyHistogram

# 3 significant digits: a recorded value sits in a bucket at most 0.1 % wide; +1 µs for the rounding to µs.
REL = 1e-3
ABS_MS = 1e-3


def _hist(values: np.ndarray) -> LatencyHistogram:
    h = LatencyHistogram()
    h.record_many_ms(values.tolist())
    return h


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= want * REL + ABS_MS


@pytest.mark.parametrize("dist", ["lognormal", "bimodal", "uniform"])
def test_percentiles_match_numpy(dist: str) -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    if dist == "lognormal":  # a latency-shaped tail
        x = rng.lognormal(mean=2.0, sigma=1.0, size=n)
    elif dist == "bimodal":  # fast path + slow path (e.g. a fallback after a miss)
        x = np.where(rng.random(n) < 0.9, rng.normal(3.0, 0.3, n).clip(0.1), rng.normal(120.0, 10.0, n).clip(1))
    else:
        x = rng.uniform(0.05, 900.0, n)
    h = _hist(x)
    s = np.sort(x)
    assert h.count == n
    for p in (*REPORTED, 10.0, 75.0, 99.99):
        got = h.percentile_ms(p)
        ref = float(np.percentile(x, p, method="inverted_cdf"))
        # HDR takes rank round(p/100 * n), numpy's inverted_cdf ceil(p/100 * n), and p/100 * n is not
        # always exact in floating point: allow the neighbouring order statistic, never more.
        k = int(np.searchsorted(s, ref))
        neighbours = s[max(k - 1, 0):k + 2]
        assert any(_close(got, float(v)) for v in neighbours), (p, got, ref)
    assert _close(h.max_ms, float(x.max()))
    assert _close(h.min_ms, float(x.min()))
    assert h.mean_ms == pytest.approx(float(x.mean()), rel=REL)


def test_vectorised_queries_agree_with_the_hdrhistogram_package() -> None:
    h = _hist(np.random.default_rng(11).lognormal(1.5, 1.2, 5000))
    ref = h._h  # the package's own (slow, pure-Python) queries
    for p in (0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        assert h.percentile_ms(p) * 1000 == ref.get_value_at_percentile(p), p
    assert h.mean_ms * 1000 == pytest.approx(ref.get_mean_value(), rel=1e-12)
    xs, ys = h.cdf()
    # (the package's iterator reuses one item object: read each value as it comes)
    ref_cdf = [(ref.get_highest_equivalent_value(i.value_iterated_to), i.total_count_to_this_value / h.count)
               for i in ref.get_recorded_iterator()]
    assert [round(x * 1000) for x in xs] == [v for v, _ in ref_cdf]
    assert ys == pytest.approx([c for _, c in ref_cdf])


def test_exact_ranks_on_whole_milliseconds() -> None:
    h = _hist(np.arange(1, 101, dtype=float))  # 1 .. 100 ms
    assert h.percentile_ms(50) == pytest.approx(50, rel=REL)
    assert h.percentile_ms(99) == pytest.approx(99, rel=REL)
    assert h.percentile_ms(100) == pytest.approx(100, rel=REL)
    assert h.percentiles_ms([50.0, 95.0]) == {50.0: h.percentile_ms(50), 95.0: h.percentile_ms(95)}


def test_merge_equals_recording_everything_in_one() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(1, 1, 3000), rng.lognormal(3, 0.5, 1000)
    merged = LatencyHistogram.merged([_hist(a), _hist(b)])
    whole = _hist(np.concatenate([a, b]))
    assert merged.count == 4000
    for p in REPORTED:
        assert merged.percentile_ms(p) == whole.percentile_ms(p)
    assert merged.max_ms == whole.max_ms


def test_encode_decode_round_trip() -> None:
    h = _hist(np.random.default_rng(2).lognormal(2, 1, 5000))
    back = LatencyHistogram.decode(h.encode())
    assert back.count == h.count
    assert back.summary() == h.summary()


def test_cdf_is_monotone_and_ends_at_one() -> None:
    h = _hist(np.random.default_rng(3).exponential(10.0, 2000))
    xs, ys = h.cdf()
    assert xs == sorted(xs) and ys == sorted(ys)
    assert ys[-1] == pytest.approx(1.0)
    # the CDF at the median value is about one half
    i = int(np.searchsorted(xs, h.percentile_ms(50)))
    assert ys[i] == pytest.approx(0.5, abs=0.01)


def test_empty_and_out_of_range() -> None:
    h = LatencyHistogram()
    assert h.count == 0 and math.isnan(h.percentile_ms(99)) and h.summary() == {"count": 0}
    with pytest.raises(ValueError, match=r"0\.\.100"):
        h.percentile_ms(101)
    h.record_ms(5e6)  # 83 minutes: clamped to the 1 h ceiling and flagged, not dropped
    h.record_ms(-0.01)  # clock noise counts as 0
    assert h.count == 2 and h.clamped == 1 and h.summary()["clamped"] == 1
    assert h.min_ms == 0.0
