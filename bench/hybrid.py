"""Full hybrid retrieval latency at 100k passages, through the server's own HybridRetriever.

    python -m bench.hybrid [--n 100000] [--queries 500] [--append-results]

Measured in one run, single queries, on this machine:
  1. query encoding alone: the real ONNX MiniLM on real spoken questions (the KB golden questions);
  2. hybrid without encoding: BM25 top-50 + HNSW k=50 + convex fusion + confidence + top-10, i.e.
     `HybridRetriever.search` with the query vector already known;
  3. hybrid with encoding: the same, with the real encoder run on a real question first.
The 100k corpus is synthetic (bench.retrieval.synthetic tokens for BM25, bench.dense.synthetic_corpus
vectors for HNSW, row i of one is passage i of the other): the latency of the code path is real,
the relevance of the results is not measured here (bench/RESULTS.md has quality on real data).
Targets (issue 3): encoding p50 <= 5 ms; hybrid p99 <= 2 ms without encoding, <= 10 ms with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.dense import synthetic_corpus
from bench.retrieval import synthetic
from kernels import bm25
from server.config import REPO_ROOT, load_config
from server.knowledge import KnowledgeBase, Passage, load_golden
from server.retrieval.dense import HnswIndex
from server.retrieval.hybrid import DenseRetriever, HybridRetriever
from server.retrieval.sparse import SparseRetriever
from server.retrieval.text import Tokenizer

INTENTS = ("a", "b", "c", "d")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class KnownVectors:
    """Stands in for the encoder when the query vector is already known (measures search alone)."""

    def __init__(self, by_text: dict[str, npt.NDArray[np.float32]], real: Any = None,
                 spoken: dict[str, str] | None = None) -> None:
        self.by_text, self.real, self.spoken = by_text, real, spoken or {}

    def encode_query(self, text: str) -> npt.NDArray[np.float32]:
        if self.real is not None:  # pay the real encoder on a real question, then search the synthetic vector
            self.real.encode_query(self.spoken[text])
        return self.by_text[text]


def _pct(lat_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(lat_ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _time(fn: Callable[[str], Any], texts: Sequence[str], repeat: int = 1) -> list[float]:
    for t in texts[:20]:  # warm caches, ORT arenas, the side thread
        fn(t)
    out = []
    for _ in range(repeat):
        for t in texts:
            t0 = time.perf_counter()
            fn(t)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="passages (default 100000)")
    ap.add_argument("--queries", type=int, default=500, help="timed queries per measurement (default 500)")
    ap.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--json", type=Path, help="write the figures as JSON")
    args = ap.parse_args(argv)
    cfg = load_config(env={})
    dc, fc = cfg.retrieval.dense, cfg.retrieval.fusion
    t_start = time.perf_counter()

    _log(f"corpus: {args.n} synthetic passages (tokens + vectors)")
    corpus = synthetic(args.n, args.queries)
    vocab = {f"t{i}": i for i in range(corpus.n_terms)}
    matrix = bm25.build(cfg.retrieval.bm25.variant, corpus.docs, corpus.n_terms, k1=cfg.retrieval.bm25.k1,
                        b=cfg.retrieval.bm25.b)
    rng = np.random.default_rng(7)
    kb = KnowledgeBase()
    for i in range(args.n):  # metadata so the filter path is the real one; text is never read here
        kb.by_id[f"p{i}"] = i
        kb.passages.append(Passage(id=f"p{i}", text="", intent=INTENTS[i % 4], domain="synthetic", locale="en-US",
                                   confidence=float(rng.uniform(0.5, 1.0)), source=""))
    tok = Tokenizer(lowercase=True, stopwords=False, stem=False)
    sparse = SparseRetriever(kb, tok, cfg.retrieval.bm25, apply_confidence=True, prebuilt=(vocab, matrix))
    queries = [" ".join(f"t{t}" for t in q if t >= 0) or "t0" for q in corpus.queries]

    vectors, qvecs = synthetic_corpus(args.n, args.queries)
    _log(f"hnsw: building (M={dc.hnsw_m}, ef_construction={dc.hnsw_ef_construction}) ...")
    t0 = time.perf_counter()
    index = HnswIndex.build(vectors, m=dc.hnsw_m, ef_construction=dc.hnsw_ef_construction, ef=dc.hnsw_ef)
    build_s = time.perf_counter() - t0
    _log(f"hnsw: built in {build_s:.1f} s")

    from server.retrieval.encoder import OnnxEncoder

    encoder = OnnxEncoder.load(cfg.resolve_path(dc.model_dir), max_length=dc.max_length,
                               intra_op_threads=dc.intra_op_threads)
    spoken = [g.question for kbname in ("voice", "warehouse") for split in ("train", "dev")
              for g in load_golden(REPO_ROOT / "data" / "kb" / kbname, split)]
    spoken = (spoken * (args.queries // len(spoken) + 1))[: args.queries]
    by_text = dict(zip(queries, qvecs, strict=True))
    said = dict(zip(queries, spoken, strict=True))

    results: dict[str, dict[str, float]] = {}
    _log("timing: query encoding alone")
    results["encode query (ONNX MiniLM, real questions)"] = _pct(_time(encoder.encode_query, spoken))
    _log("timing: BM25 alone (top-50)")
    results["BM25 top-50"] = _pct(_time(lambda q: sparse.candidates(q, fc.candidates, None), queries))
    _log("timing: HNSW alone (k=50)")
    results["HNSW k=50"] = _pct(_time(lambda q: index.search(by_text[q], fc.candidates), queries))
    known = HybridRetriever(kb, sparse, DenseRetriever(KnownVectors(by_text), index), fc,  # type: ignore[arg-type]
                            apply_confidence=True)
    with_enc = HybridRetriever(kb, sparse, DenseRetriever(KnownVectors(by_text, encoder, said), index),  # type: ignore[arg-type]
                               fc, apply_confidence=True)
    try:
        for mode in ("convex", "rrf"):
            _log(f"timing: hybrid {mode} without encoding")
            results[f"hybrid {mode}, no encoding"] = _pct(_time(lambda q, m=mode: known.search(q, 10, None, m),
                                                                queries))
        _log("timing: hybrid convex with a filter (intent = 1 of 4)")
        results["hybrid convex + intent filter, no encoding"] = _pct(
            _time(lambda q: known.search(q, 10, {"intent": ["b"]}, "convex"), queries))
        _log("timing: hybrid convex with encoding")
        results["hybrid convex, with encoding"] = _pct(_time(lambda q: with_enc.search(q, 10, None, "convex"),
                                                             queries))
    finally:
        known.close()
        with_enc.close()

    head = (f"n={args.n}, {args.queries} queries each, k=10 from 50+50 candidates, ef={dc.hnsw_ef}, "
            f"bm25={cfg.retrieval.bm25.variant}; {os.cpu_count()} cores ({platform.machine()}), "
            f"load average {os.getloadavg()[0]:.1f}; HNSW build {build_s:.1f} s; whole run "
            f"{time.perf_counter() - t_start:.0f} s")
    table = ("| measurement | p50 ms | p95 ms | p99 ms | mean ms |\n|---|---|---|---|---|\n"
             + "\n".join(f"| {k} | {v['p50']:.3f} | {v['p95']:.3f} | {v['p99']:.3f} | {v['mean']:.3f} |"
                         for k, v in results.items()))
    print(head)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"setup": head, "results": results}, indent=2))
    if args.append_results:
        with (REPO_ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Hybrid retrieval latency (100k passages)\n\nCommand: `python -m bench.hybrid "
                     f"--n {args.n} --queries {args.queries} --append-results` ({time.strftime('%Y-%m-%d')})\n\n"
                     f"{head}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
