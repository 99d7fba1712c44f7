"""Budget-aware rerank: how many fused candidates the cross-encoder can score in the time left, and how
its logits are blended with the fused scores.

Rerank is optional: a request that cannot afford it keeps the fused order (ARCHITECTURE.md, Rerank).
Because a timed-out thread cannot be killed, the stage must not *start* work it cannot finish: it asks
`affordable` for the largest head of the fused list whose predicted cost fits the time left, scores
only that head, and tells `PairCost` what it really cost so the next prediction is better.

    cost = PairCost(prior_pair_ms=cfg.rerank.prior_pair_ms)
    k = affordable(len(hits), budget_ms_left, cost, cfg.rerank.max_candidates)
    if k:
        t0 = time.perf_counter()
        logits = cross_encoder.score(query, [h.text for h in hits[:k]], cfg.rerank.batch_size)
        cost.observe(k, (time.perf_counter() - t0) * 1000)
        order, scores = rerank_scores([h.score for h in hits], logits, cfg.rerank.score_weight)
"""

from __future__ import annotations

import math
import threading

import numpy as np
import numpy.typing as npt

from kernels.fusion import minmax

DEFAULT_OVERHEAD_MS = 0.5
"""Fixed cost of one `score` call besides its pairs: tokenizer dispatch, array set-up, the run's launch."""
DEFAULT_ALPHA = 0.2
"""EMA weight of each new observation: about the last 10 calls matter, so a load change is tracked
within a few requests while one slow outlier (a GC pause, a noisy neighbour) moves the estimate by 20 %."""
MIN_PAIR_MS = 1e-3
"""Floor of the per-pair estimate (1 µs): keeps `affordable` finite however fast the measurements."""
MIN_HEAD = 2
"""A head of one cannot change the order, so it is not worth a model run: `affordable` says 0 instead."""


class PairCost:
    """The predicted cost of scoring n pairs: `overhead_ms + n * per_pair_ms`.

    `per_pair_ms` starts at the configured prior (`RerankConfig.prior_pair_ms`) and follows an
    exponential moving average of measured `(elapsed_ms - overhead_ms) / n` per call; the overhead stays
    fixed (n is nearly always `max_candidates`, so a fit of both from the calls would be ill-posed).
    Thread-safe: the stage calls `observe` from worker threads and `estimate_ms` from the event loop.
    """

    def __init__(self, prior_pair_ms: float, *, overhead_ms: float = DEFAULT_OVERHEAD_MS,
                 alpha: float = DEFAULT_ALPHA) -> None:
        if not (math.isfinite(prior_pair_ms) and prior_pair_ms > 0):
            raise ValueError(f"prior_pair_ms must be a positive number of ms, got {prior_pair_ms}")
        if not (math.isfinite(overhead_ms) and overhead_ms >= 0):
            raise ValueError(f"overhead_ms must be >= 0, got {overhead_ms}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._per_pair_ms = float(prior_pair_ms)
        self._overhead_ms = float(overhead_ms)
        self._alpha = float(alpha)
        self._observations = 0
        self._lock = threading.Lock()

    @property
    def per_pair_ms(self) -> float:
        """Current estimate of the marginal cost of one pair (ms)."""
        with self._lock:
            return self._per_pair_ms

    @property
    def overhead_ms(self) -> float:
        return self._overhead_ms

    @property
    def observations(self) -> int:
        """How many measured calls the estimate has absorbed (0 = still the prior)."""
        with self._lock:
            return self._observations

    def observe(self, n_pairs: int, elapsed_ms: float) -> None:
        """Record that scoring `n_pairs` took `elapsed_ms` (wall time of the whole call). Calls with no
        pairs or a non-finite or negative time carry no information and are ignored."""
        if n_pairs <= 0 or not math.isfinite(elapsed_ms) or elapsed_ms < 0:
            return
        # A call faster than the assumed overhead still cost something per pair: floor at 10 % of the
        # per-pair share, so the estimate never collapses to 0 and makes every head look affordable.
        sample = max(elapsed_ms - self._overhead_ms, 0.1 * elapsed_ms) / n_pairs
        with self._lock:
            self._per_pair_ms = max(MIN_PAIR_MS, self._per_pair_ms + self._alpha * (sample - self._per_pair_ms))
            self._observations += 1

    def estimate_ms(self, n_pairs: int) -> float:
        """Predicted ms to score `n_pairs` in one call (0 for none: no call is made)."""
        if n_pairs <= 0:
            return 0.0
        return self._overhead_ms + n_pairs * self.per_pair_ms


def affordable(n_candidates: int, time_left_ms: float, cost: PairCost, max_candidates: int) -> int:
    """How many of the top fused candidates the cross-encoder can score within `time_left_ms`.

    The largest k <= min(n_candidates, max_candidates) with `cost.estimate_ms(k) <= time_left_ms`, or 0
    (skip the stage) when that is under MIN_HEAD, when nothing fits, or when there is no time left.
    """
    if max_candidates < 0:
        raise ValueError(f"max_candidates must be >= 0, got {max_candidates}")
    n = min(n_candidates, max_candidates)
    if n < MIN_HEAD or not time_left_ms > cost.overhead_ms:  # also catches NaN
        return 0
    if math.isinf(time_left_ms):
        return n
    k = min(n, math.floor((time_left_ms - cost.overhead_ms) / cost.per_pair_ms))
    return k if k >= MIN_HEAD else 0


def sigmoid(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Logistic function, float64, without overflow warnings for large |x| (tanh saturates cleanly)."""
    a = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def rerank_scores(fused_scores: npt.ArrayLike, ce_logits: npt.ArrayLike,
                  weight: float) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """Blend the cross-encoder's logits for the head of a fused list into a new order.

    fused_scores: all n candidates' fused scores, in fused order (best first).
    ce_logits: the cross-encoder's logits for the first k = len(ce_logits) <= n of them.
    weight: `RerankConfig.score_weight`, in [0, 1].

    Returns `(order, scores)`, both of length n: `order` is a permutation of range(n) (indices into
    the input) best first, `scores[j]` the final score of candidate `order[j]` (non-increasing when
    `fused_scores` is sorted, as a fused list is).
    - the head: final = w * sigmoid(logit) + (1 - w) * minmax(fused head), sorted descending; ties keep
      fused order. Head scores lie in [0, 1]. w = 1 is the cross-encoder alone, w = 0 the fused order.
    - the tail (never scored) keeps its fused order below the head: score = lowest head score *
      minmax(all fused scores), so it never outranks a scored candidate. With k = 0 nothing was
      reranked: the fused order and the fused scores come back unchanged.
    Raises ValueError on shapes that do not fit, a weight outside [0, 1], or non-finite values.
    """
    fused = np.asarray(fused_scores, dtype=np.float64)
    logits = np.asarray(ce_logits, dtype=np.float64)
    if fused.ndim != 1 or logits.ndim != 1:
        raise ValueError(f"expected 1-D scores, got shapes {fused.shape} and {logits.shape}")
    n, k = fused.size, logits.size
    if k > n:
        raise ValueError(f"{k} cross-encoder logits for {n} candidates: the head cannot exceed the list")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if not (np.all(np.isfinite(fused)) and np.all(np.isfinite(logits))):
        raise ValueError("scores must be finite (no NaN or inf)")
    if k == 0:
        return np.arange(n, dtype=np.intp), fused.copy()

    head = weight * sigmoid(logits) + (1.0 - weight) * minmax(fused[:k])
    head_order = np.argsort(-head, kind="stable")
    tail = head.min() * minmax(fused)[k:]
    # minmax over all n keeps the tail within [0, 1], so the product stays below the lowest head score;
    # clip anyway so an unsorted input cannot break the "tail below head" promise.
    tail = np.minimum(tail, head.min())
    order = np.concatenate([head_order, np.arange(k, n)]).astype(np.intp)
    scores = np.concatenate([head[head_order], tail])
    return order, scores
