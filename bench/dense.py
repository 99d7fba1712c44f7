"""Dense retrieval benchmark: HNSW build time, query latency and recall against exact search.

    python -m bench.dense [--n 100000] [--queries 1000] [--threads 0] [--append-results]

On `n` synthetic 384-d unit vectors (`synthetic_corpus`, the same generator as
tests/retrieval/test_dense.py), at the DenseConfig defaults (m, ef_construction):
- graph build time;
- single-query latency p50/p99 (`HnswIndex.search`, one thread, as the server calls it) at k=10 and
  k=50 for ef in {32, 64, 128}, with recall@k against exact search;
- exact numpy brute force (`exact_search`) latency, the baseline HNSW has to beat;
- filtered search at several selectivities: the graph search with hnswlib's filter vs exact search
  over the allowed rows, which is where `EXACT_MAX_ROWS` / `EXACT_MAX_FRACTION` come from.

Prints progress to stderr and a markdown table to stdout; `--append-results` also appends the tables
and the command to bench/RESULTS.md. Bounded: about 2-4 minutes on 2 cores at n=100k.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from server.config import DenseConfig
from server.retrieval.dense import EXACT_MAX_FRACTION, EXACT_MAX_ROWS, HnswIndex, exact_search

F32 = npt.NDArray[np.float32]
T = TypeVar("T")
RESULTS = Path(__file__).with_name("RESULTS.md")
RESULTS_HEADER = "# Benchmark results (commands and figures)\n"


def synthetic_corpus(n: int, n_queries: int, *, dim: int = 384, seed: int = 0, clusters: int = 100,
                     latent: int = 48) -> tuple[F32, F32]:
    """Unit vectors shaped like sentence embeddings, plus held-out queries from the same distribution.

    A mixture of `clusters` topics: each row is a shared direction (embeddings are anisotropic: random
    pairs of MiniLM passages have cosine ~0.1, not 0) + its topic centre + a point in the topic's own
    `latent`-dimensional subspace (real embeddings have low intrinsic dimension) + isotropic noise.
    Queries are drawn the same way with extra noise, so they sit farther from their neighbours than
    passages do from each other (query-passage top-1 cosine ~0.5, as for short spoken questions).
    Isotropic Gaussian data of full dimension would be much harder for HNSW than any real corpus
    (every point nearly equidistant) and would mislead the ef choice.
    """
    rng = np.random.default_rng(seed)
    common = _unit(rng.normal(size=dim))
    centres = _unit(rng.normal(size=(clusters, dim)))
    bases = rng.normal(size=(clusters, latent, dim)) / np.sqrt(dim)

    def sample(m: int, r: np.random.Generator, iso: float) -> F32:
        topic = r.integers(0, clusters, m)
        z = r.normal(size=(m, latent)) / np.sqrt(latent)
        out = np.empty((m, dim), np.float32)
        for c in range(clusters):
            rows = np.flatnonzero(topic == c)
            x = (0.3 * common + 0.6 * centres[c] + 0.6 * (z[rows] @ bases[c])
                 + iso * r.normal(size=(rows.size, dim)) / np.sqrt(dim))
            out[rows] = _unit(x)
        return out

    return sample(n, rng, 0.35), sample(n_queries, np.random.default_rng([seed, 1]), 0.85)


def recall_at(found: npt.NDArray[np.int64], truth: npt.NDArray[np.int64]) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (rows are queries)."""
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size if truth.size else 1.0


def _unit(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    return np.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype=np.float64)


def _log(msg: str) -> None:
    print(f"[bench.dense {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _timed(fn: Callable[[int], T], n: int) -> tuple[npt.NDArray[np.float64], list[T]]:
    """Latency in ms of fn(0..n-1), after a short warm-up (caches, hnswlib's visited-list pool)."""
    for i in range(min(n, 20)):
        fn(i)
    lat = np.empty(n, np.float64)
    results: list[T] = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        out = fn(i)
        lat[i] = (time.perf_counter_ns() - t0) / 1e6
        results.append(out)
    return lat, results


def _pct(lat: npt.NDArray[np.float64]) -> str:
    return f"{np.percentile(lat, 50):.3f} | {np.percentile(lat, 99):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dense", description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="indexed vectors (default 100000)")
    ap.add_argument("--dim", type=int, default=384, help="dimension (default 384, MiniLM-L6)")
    ap.add_argument("--queries", type=int, default=1000, help="timed queries per HNSW setting (default 1000)")
    ap.add_argument("--exact-queries", type=int, default=200, help="timed brute-force queries (default 200)")
    ap.add_argument("--threads", type=int, default=0, help="build threads, 0 = one per core (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append-results", action="store_true", help="append the tables to bench/RESULTS.md")
    args = ap.parse_args(argv)
    started = time.monotonic()
    cfg = DenseConfig()

    _log(f"generating {args.n} x {args.dim} corpus + {args.queries} queries (seed {args.seed})")
    corpus, queries = synthetic_corpus(args.n, args.queries, dim=args.dim, seed=args.seed)

    _log(f"building HNSW m={cfg.hnsw_m} ef_construction={cfg.hnsw_ef_construction} threads={args.threads or 'all'}")
    t0 = time.perf_counter()
    index = HnswIndex.build(corpus, m=cfg.hnsw_m, ef_construction=cfg.hnsw_ef_construction, ef=cfg.hnsw_ef,
                            threads=args.threads, seed=args.seed)
    build_s = time.perf_counter() - t0
    _log(f"built in {build_s:.1f} s on {index.threads} threads")

    _log("exact ground truth (k=50) for all queries")
    sims = queries @ index.vectors.T
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :50]
    del sims

    rows: list[str] = []
    for ef in (32, 64, 128):
        index.ef = ef
        for k in (10, 50):
            _log(f"HNSW ef={ef} k={k}: {args.queries} single queries")

            def hnsw(i: int, k: int = k) -> npt.NDArray[np.int64]:
                return index.search(queries[i], k)[0]

            lat, found = _timed(hnsw, args.queries)
            rec = recall_at(np.stack(found)[:, :10], truth[:, :10])
            rec_k = recall_at(np.stack(found), truth[:, :k])
            rows.append(f"| HNSW ef={ef} | {k} | {_pct(lat)} | {rec:.4f} | {rec_k:.4f} |")
    index.ef = cfg.hnsw_ef

    matrix = index.vectors
    for k in (10, 50):
        _log(f"exact brute force k={k}: {args.exact_queries} queries")

        def exact(i: int, k: int = k) -> npt.NDArray[np.int64]:
            return exact_search(matrix, queries[i], k)[0]

        lat, _ = _timed(exact, args.exact_queries)
        rows.append(f"| exact numpy | {k} | {_pct(lat)} | 1.0000 | 1.0000 |")

    # Filtered search, k=10, default ef: graph search with the filter (forced) vs exact over the rows.
    frows: list[str] = []
    rng = np.random.default_rng([args.seed, 2])
    n_f = min(args.queries, 300)
    for share in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
        mask = rng.random(args.n) < share
        allowed = int(mask.sum())
        ftruth = np.stack([exact_search(matrix, queries[i], 10, mask)[0] for i in range(n_f)])
        cells = []
        for mode in ("hnsw", "exact"):
            index.exact_max_rows, index.exact_max_fraction = (0, 0.0) if mode == "hnsw" else (args.n, 1.0)
            _log(f"filtered share={share:.3f} ({allowed} rows) via {mode}: {n_f} queries")

            def filtered(i: int, m: npt.NDArray[np.bool_] = mask) -> npt.NDArray[np.int64]:
                return index.search(queries[i], 10, mask=m)[0]

            lat, got = _timed(filtered, n_f)
            cells.append(f"{_pct(lat)} | {recall_at(np.stack(got), ftruth):.4f}")
        frows.append(f"| {share:.1%} | {allowed} | {cells[0]} | {cells[1]} |")
    index.exact_max_rows, index.exact_max_fraction = EXACT_MAX_ROWS, EXACT_MAX_FRACTION

    elapsed = time.monotonic() - started
    cpu = platform.processor() or platform.machine()
    env = (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, numpy {np.__version__}, "
           f"hnswlib {metadata.version('hnswlib')}; n={args.n}, dim={args.dim}, "
           f"m={cfg.hnsw_m}, ef_construction={cfg.hnsw_ef_construction}, seed={args.seed}")
    table = "\n".join([
        f"Build: {build_s:.1f} s ({index.threads} threads). {env}.",
        "",
        "Single queries (`HnswIndex.search`, num_threads=1), latency in ms; recall against exact search:",
        "",
        "| search | k | p50 ms | p99 ms | recall@10 | recall@k |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Filtered (pre-filter mask, k=10, ef={cfg.hnsw_ef}, {n_f} queries): graph search with hnswlib's",
        "filter vs exact search over the allowed rows; recall against exact filtered search:",
        "",
        "| allowed share | rows | HNSW p50 ms | HNSW p99 ms | HNSW recall@10 | exact p50 ms | exact p99 ms | "
        "exact recall@10 |",
        "|---|---|---|---|---|---|---|---|",
        *frows,
        "",
        f"Whole run: {elapsed:.0f} s.",
    ])
    print(table)
    if args.append_results:
        command = "python -m bench.dense " + " ".join(argv if argv is not None else sys.argv[1:])
        if not RESULTS.exists():
            RESULTS.write_text(RESULTS_HEADER, encoding="utf-8")
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(f"\n## Dense (HNSW)\n\nCommand: `{command.strip()}` ({time.strftime('%Y-%m-%d')})\n\n"
                    f"Synthetic corpus: `bench.dense.synthetic_corpus` (clustered, low intrinsic dimension, "
                    f"anisotropic, like sentence embeddings).\n\n{table}\n")
        _log(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
