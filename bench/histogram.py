"""Latency histograms: HDR (High Dynamic Range) buckets from the `hdrhistogram` package, in milliseconds.

Why HDR rather than a list of samples: constant memory whatever the run length, percentiles to a fixed
relative precision (3 significant digits: a recorded value is off by at most 0.1 %), histograms from
several phases or processes merge exactly, and one can be stored compactly in the JSON (`encoded`) and
re-read later for other percentiles.

Values are recorded as integer microseconds (1 µs .. 1 h). A percentile p is the smallest recorded value
such that round(p/100 * count) values are at or below it (HdrHistogram's definition; numpy's
`inverted_cdf` whenever p/100 * count is a whole number), reported at the top of its bucket.

The package stores, merges and encodes; the queries (percentiles, mean, CDF) are done here with numpy over
its counts array, because the package's pure-Python iterators walk all ~23k buckets per query (a mean
took ~0.2 s; a report asks for hundreds). tests/bench/test_histogram.py checks both agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: anything longer is a hung call, clamped and flagged by `clamped`
SIGNIFICANT_DIGITS = 3
# The percentiles every summary reports (the p50 / p95 / p99 / p99.9, plus p90).
REPORTED = (50.0, 90.0, 95.0, 99.0, 99.9)


def pct_key(p: float) -> str:
    """50.0 -> "p50", 99.9 -> "p99.9"."""
    return f"p{p:g}"


@cache
def _bucket_values() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(lowest, highest, median) value of every counts index of our histogram layout, vectorised from
    HdrHistogram's index arithmetic (get_value_from_index / get_highest_equivalent_value)."""
    h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
    idx = np.arange(h.counts_len, dtype=np.int64)
    bucket = (idx >> h.sub_bucket_half_count_magnitude) - 1
    sub = (idx & (h.sub_bucket_half_count - 1)) + h.sub_bucket_half_count
    first = bucket < 0
    sub[first] -= h.sub_bucket_half_count
    bucket[first] = 0
    lowest = sub << (bucket + h.unit_magnitude)
    size = np.left_shift(1, h.unit_magnitude + bucket)
    return lowest, lowest + size - 1, lowest + (size >> 1)


class LatencyHistogram:
    """Millisecond latencies in an HDR histogram (µs resolution, 0.1 % relative precision)."""

    __slots__ = ("_h", "clamped")

    def __init__(self) -> None:
        self._h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self.clamped = 0

    def record_ms(self, value_ms: float, count: int = 1) -> None:
        us = round(value_ms * 1000.0)
        if us > HIGHEST_US:
            self.clamped += count
            us = HIGHEST_US
        # 0 is a legal HDR value (sub-microsecond work, e.g. a cached stage); negatives are clock noise.
        self._h.record_value(max(us, 0), count)

    def record_many_ms(self, values_ms: Iterable[float]) -> None:
        for v in values_ms:
            self.record_ms(v)

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def __len__(self) -> int:
        return self.count

    def _counts(self) -> npt.NDArray[np.uint64]:
        return np.ctypeslib.as_array(self._h.counts)

    def percentile_ms(self, p: float) -> float:
        return self.percentiles_ms([p])[p]

    def percentiles_ms(self, ps: Sequence[float]) -> dict[float, float]:
        for p in ps:
            if not 0.0 <= p <= 100.0:
                raise ValueError(f"percentile must be in 0..100, got {p}")
        total = self.count
        if total == 0:
            return {p: float("nan") for p in ps}
        cum = np.cumsum(self._counts(), dtype=np.int64)
        lowest, highest, _ = _bucket_values()
        out = {}
        for p in ps:
            target = max(int(p * total / 100.0 + 0.5), 1)  # HdrHistogram's rank rule
            i = int(np.searchsorted(cum, target, side="left"))
            out[p] = float(highest[i] if p > 0 else lowest[i]) / 1000.0
        return out

    @property
    def max_ms(self) -> float:
        return self._h.get_max_value() / 1000.0 if self.count else float("nan")

    @property
    def min_ms(self) -> float:
        return self._h.get_min_value() / 1000.0 if self.count else float("nan")

    @property
    def mean_ms(self) -> float:
        """Mean of the bucket midpoints (HdrHistogram's definition)."""
        if not self.count:
            return float("nan")
        _, _, median = _bucket_values()
        return float(np.dot(self._counts().astype(np.float64), median.astype(np.float64))) / self.count / 1000.0

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """Add `other`'s counts into this one (exact: same bucket layout)."""
        if other.count:
            self._h.add(other._h)
        self.clamped += other.clamped
        return self

    @classmethod
    def merged(cls, parts: Iterable[LatencyHistogram]) -> LatencyHistogram:
        out = cls()
        for p in parts:
            out.merge(p)
        return out

    def cdf(self) -> tuple[list[float], list[float]]:
        """(latency ms, cumulative fraction) at every recorded bucket, for plotting."""
        total = self.count
        if not total:
            return [], []
        counts = self._counts()
        nz = np.flatnonzero(counts)
        _, highest, _ = _bucket_values()
        cum = np.cumsum(counts[nz], dtype=np.int64)
        return (highest[nz] / 1000.0).tolist(), (cum / total).tolist()

    def encode(self) -> str:
        """Compressed, base64 HdrHistogram V2 encoding (what `HdrHistogram.decode` and other HDR tools read)."""
        raw = self._h.encode()
        return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)

    @classmethod
    def decode(cls, encoded: str) -> LatencyHistogram:
        out = cls()
        if encoded:
            out._h.decode_and_add(encoded)
        return out

    def summary(self, *, encoded: bool = False) -> dict[str, Any]:
        """count, min, mean, p50 .. p99.9, max (ms); `encoded` adds the histogram itself."""
        out: dict[str, Any] = {"count": self.count}
        if self.count:
            out["min"] = round(self.min_ms, 3)
            out["mean"] = round(self.mean_ms, 3)
            for p, v in self.percentiles_ms(REPORTED).items():
                out[pct_key(p)] = round(v, 3)
            out["max"] = round(self.max_ms, 3)
        if self.clamped:
            out["clamped"] = self.clamped
        if encoded and self.count:
            out["hdr"] = self.encode()
        return out
