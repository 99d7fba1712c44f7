"""BM25 kernel benchmark: our CSR kernel (okapi, lucene) next to rank-bm25 and bm25s, in one run.

    python -m bench.retrieval [--docs 100000] [--queries 1000] [--scifact ../shared/data/scifact] [--json OUT]

Two corpora:
- synthetic: `--docs` passages with lengths uniform in [40, 120] tokens over a Zipfian (s = 1) vocabulary
  of 50k terms (the terms drawn at least once get ids); `--queries` queries of 2-8 terms drawn from the
  same distribution; fixed seed. Its tokens are term ids by construction: no tokenizer is involved.
- SciFact (BEIR layout, read from `--scifact`, never copied): corpus.jsonl (title + " " + text),
  queries.jsonl, qrels/train.tsv. Every query in the TRAIN qrels is run, with two tokenizers: ours
  (`server.retrieval.text.Tokenizer()`: stopwords, light stemming) and a plain lowercase-word one.
  nDCG@10 and Recall@100 on these train queries are what the default variant is chosen by.

Every method gets the SAME tokens: documents and queries are tokenized once and mapped to term ids
(SciFact: in order of first appearance, as SparseRetriever does); rank-bm25 and ours take the id
lists, bm25s takes its `(ids, vocab)` tuple.
Tokenization is excluded from every timing. Latency is one query at a time on one thread (what a
server request sees): scoring plus the top-10, index build excluded; queries/s is 1 / mean latency.
rank-bm25 scores in Python per document and term (about 0.25 s a query at 100k documents), so on the
synthetic corpus it times only `--rank-queries` queries, and its top-10 agreement is over those;
"× rank-bm25" is the median over exactly those queries of rank-bm25's latency / the method's (the
ratio of mean latencies is in the JSON too).

Agreement with the reference (ours-okapi vs rank-bm25, ours-lucene vs bm25s-lucene; bm25s-robertson,
bm25s's other Okapi-style variant, is compared to rank-bm25 for information): the fraction of queries
whose top-10 id lists are identical, the mean top-10 overlap, and the fraction whose lists are
identical up to exact ties (the reference's own scores at every rank agree within 1e-6 relative:
bm25s breaks ties arbitrarily, ours and the rank-bm25 ranking here by lower document index).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("DISABLE_TQDM", "1")  # bm25s progress bars; must be set before it is imported

import numpy as np
import numpy.typing as npt

from kernels import bm25 as kbm25
from kernels.topk import top_k
from server.retrieval.text import Tokenizer

IdList = list[int]
SEED = 20240611
VOCAB = 50_000
ZIPF_S = 1.0
DOC_LEN = (40, 120)
QUERY_LEN = (2, 8)
TOP = 10
RECALL_AT = 100
TIE_RTOL = 1e-6
BOOTSTRAP = 10_000  # resamples for the paired interval on lucene - okapi nDCG@10

_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Corpora


@dataclass
class Corpus:
    name: str
    tokenizer: str
    docs: list[IdList]
    queries: list[IdList]  # -1 = a token no document has
    n_terms: int
    vocab: dict[Any, int]
    doc_keys: list[str] = field(default_factory=list)  # external ids, for qrels
    query_keys: list[str] = field(default_factory=list)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)


def synthetic(n_docs: int, n_queries: int) -> Corpus:
    rng = np.random.default_rng(SEED)
    p = 1.0 / np.arange(1, VOCAB + 1, dtype=np.float64) ** ZIPF_S
    cdf = np.cumsum(p / p.sum())
    perm = rng.permutation(VOCAB)  # term ids unrelated to frequency rank, as in a real vocabulary

    def draw(n: int) -> npt.NDArray[np.int64]:
        return perm[np.searchsorted(cdf, rng.random(n), side="right").clip(max=VOCAB - 1)]

    lengths = rng.integers(DOC_LEN[0], DOC_LEN[1] + 1, n_docs)
    tokens = draw(int(lengths.sum()))
    qlens = rng.integers(QUERY_LEN[0], QUERY_LEN[1] + 1, n_queries)
    q_tokens = draw(int(qlens.sum()))
    # The vocabulary is the terms the corpus has, as when it is built from real text: rare terms a
    # small corpus never drew get no id, and in a query they are out of vocabulary (-1).
    present = np.unique(tokens)
    tokens = np.searchsorted(present, tokens)
    at = np.searchsorted(present, q_tokens).clip(max=present.shape[0] - 1)
    q_tokens = np.where(present[at] == q_tokens, at, -1)
    docs = [d.tolist() for d in np.split(tokens, np.cumsum(lengths)[:-1])]
    queries = [q.tolist() for q in np.split(q_tokens, np.cumsum(qlens)[:-1])]
    n_terms = int(present.shape[0])
    return Corpus("synthetic", "ids", docs, queries, n_terms, {f"t{i}": i for i in range(n_terms)})


_LOWER_WORD = re.compile(r"\w+")


def lowercase_words(text: str) -> list[str]:
    return _LOWER_WORD.findall(text.lower())


TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"snaprag": Tokenizer(), "lowercase": lowercase_words}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def scifact(root: Path, tokenizer_name: str) -> Corpus:
    tokenize = TOKENIZERS[tokenizer_name]
    qrels: dict[str, dict[str, int]] = {}
    with (root / "qrels" / "train.tsv").open(encoding="utf-8") as fh:
        next(fh)  # header: query-id corpus-id score
        for line in fh:
            qid, did, rel = line.rstrip("\n").split("\t")
            if int(rel) > 0:
                qrels.setdefault(qid, {})[did] = int(rel)
    records = read_jsonl(root / "corpus.jsonl")
    vocab: dict[Any, int] = {}
    docs = [[vocab.setdefault(t, len(vocab)) for t in tokenize(f"{r.get('title', '')} {r['text']}")] for r in records]
    queries = [q for q in read_jsonl(root / "queries.jsonl") if str(q["_id"]) in qrels]
    return Corpus("scifact-train", tokenizer_name, docs, [[vocab.get(t, -1) for t in tokenize(q["text"])]
                                                          for q in queries],
                  len(vocab), vocab, [str(r["_id"]) for r in records], [str(q["_id"]) for q in queries], qrels)


# ---------------------------------------------------------------------------------------------
# Methods: build(docs, n_terms, vocab) -> index; search(index, ids, k) -> doc ids best first;
# scores(index, ids) -> every document's score (untimed, for tie-aware agreement).


@dataclass
class Method:
    name: str
    build: Callable[[list[IdList], int, dict[Any, int]], Any]
    search: Callable[[Any, IdList, int], npt.NDArray[np.int64]]
    scores: Callable[[Any, IdList], npt.NDArray[np.floating]]
    reference: str | None = None  # name of the method it is compared with
    subset: bool = False  # too slow for every query on the synthetic corpus
    rank_from_scores: Callable[[npt.NDArray[np.floating], int], npt.NDArray[np.int64]] | None = None
    """What `search` does, given the score vector: lets a slow reference score each query only once."""


def ours(variant: kbm25.Variant, reference: str) -> Method:
    return Method(
        f"ours-{variant}",
        lambda docs, n_terms, _vocab: kbm25.build(variant, docs, n_terms),
        lambda m, q, k: top_k(kbm25.score(m, q), k)[0],
        lambda m, q: kbm25.score(m, q),
        reference,
    )


def rank_bm25() -> Method:
    from rank_bm25 import BM25Okapi

    def scores(r: Any, q: IdList) -> npt.NDArray[np.float64]:
        return np.asarray(r.get_scores(q))  # an unknown id (-1) is in no document and has no idf: adds 0

    def rank(s: npt.NDArray[np.floating], k: int) -> npt.NDArray[np.int64]:
        return np.argsort(-s, kind="stable")[:k]  # its get_top_n sorts fully too

    return Method("rank-bm25", lambda docs, _n, _vocab: BM25Okapi(docs), lambda r, q, k: rank(scores(r, q), k),
                  scores, subset=True, rank_from_scores=rank)


def bm25s_method(method: str, backend: str, reference: str | None) -> Method:
    import bm25s

    def build(docs: list[IdList], _n: int, vocab: dict[Any, int]) -> Any:
        r = bm25s.BM25(method=method, backend=backend)
        if backend == "numba":
            # JIT compilation is not index build time: compile on a tiny index first. (Not with
            # `compile(warmup=True)`: bm25s 0.3.16's scorer warm-up writes past its 1-document buffer,
            # which corrupted the heap and crashed this benchmark.)
            r.index(([[0, 1], [1]], {"a": 0, "b": 1}), create_empty_token=False, show_progress=False)
        r.index((docs, dict(vocab)), create_empty_token=False, show_progress=False)
        return r

    def search(r: Any, q: IdList, k: int) -> npt.NDArray[np.int64]:
        known = [t for t in q if t >= 0]  # bm25s would drop them too, or fail on an all-unknown query
        if not known:
            return np.empty(0, np.int64)
        return np.asarray(r.retrieve([known], k=k, show_progress=False, n_threads=0).documents[0])

    def scores(r: Any, q: IdList) -> npt.NDArray[np.floating]:
        known = [t for t in q if t >= 0]
        return r.get_scores(known) if known else np.zeros(r.scores["num_docs"], np.float32)

    return Method(f"bm25s-{method}/{backend}", build, search, scores, reference)


def methods() -> list[Method]:
    return [
        rank_bm25(),
        bm25s_method("lucene", "numpy", None),
        bm25s_method("lucene", "numba", None),
        bm25s_method("robertson", "numpy", "rank-bm25"),
        bm25s_method("robertson", "numba", "rank-bm25"),
        ours("okapi", "rank-bm25"),
        ours("lucene", "bm25s-lucene/numpy"),
    ]


# ---------------------------------------------------------------------------------------------
# Measurements


def ndcg_at(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at(ranked: Sequence[str], relevant: dict[str, int], k: int) -> float:
    return len(set(ranked[:k]) & relevant.keys()) / len(relevant) if relevant else 0.0


def agreement(ours: npt.NDArray[np.int64], ref: npt.NDArray[np.int64],
              ref_scores: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """(identical top-10, overlap fraction, identical up to exact ties) for one query."""
    identical = up_to_ties = False
    if ours.shape == ref.shape:
        identical = bool((ours == ref).all())
        # Rank by rank, the reference scores the two documents the same: only tied documents differ.
        up_to_ties = bool(np.allclose(ref_scores[ours].astype(np.float64), ref_scores[ref].astype(np.float64),
                                      rtol=TIE_RTOL, atol=0.0))
    overlap = len(set(ours.tolist()) & set(ref.tolist())) / TOP
    return np.array([identical, overlap, up_to_ties], dtype=np.float64)


def quality(ranking: npt.NDArray[np.int64], corpus: Corpus, key: str) -> tuple[float, float]:
    ranked = [corpus.doc_keys[d] for d in ranking.tolist()]
    return ndcg_at(ranked, corpus.qrels[key], TOP), recall_at(ranked, corpus.qrels[key], RECALL_AT)


def run_corpus(corpus: Corpus, ms: list[Method], rank_queries: int) -> dict[str, Any]:
    label = f"{corpus.name}/{corpus.tokenizer}"
    nnz = sum(len(set(d)) for d in corpus.docs)
    progress(f"{label}: {len(corpus.docs)} docs, {corpus.n_terms} terms, {nnz} postings, {len(corpus.queries)} queries")
    # On the synthetic corpus rank-bm25 runs only the first `rank_queries` queries; speed-ups are
    # computed on exactly those queries for every method.
    subset = len(corpus.queries) if corpus.qrels else min(rank_queries, len(corpus.queries))
    references = {m.reference for m in ms if m.reference}
    results: dict[str, Any] = {}
    tops: dict[str, list[npt.NDArray[np.int64]]] = {}
    kept: dict[str, tuple[Method, Any]] = {}
    per_query_ndcg: dict[str, npt.NDArray[np.float64]] = {}
    latencies: dict[str, npt.NDArray[np.float64]] = {}  # ms, over the queries rank-bm25 also runs
    for m in ms:
        gc.collect()
        t = time.perf_counter()
        index = m.build(corpus.docs, corpus.n_terms, corpus.vocab)
        build_s = time.perf_counter() - t
        queries = corpus.queries[:subset] if m.subset else corpus.queries
        m.search(index, queries[0], TOP)  # warm-up: first-call JIT compilation, caches
        lat = np.empty(len(queries))
        top: list[npt.NDArray[np.int64]] = []
        gc.collect()
        for i, q in enumerate(queries):
            t0 = time.perf_counter_ns()
            ids = m.search(index, q, TOP)
            lat[i] = (time.perf_counter_ns() - t0) / 1e6
            top.append(ids)
        r: dict[str, Any] = {
            "build_s": build_s, "timed_queries": len(queries), "qps": 1e3 / lat.mean(),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        }
        latencies[m.name] = lat[:subset]
        # Quality at depth 100, untimed. A reference that ranks by sorting its scores gets it in the
        # agreement pass below, from the same score vectors (rank-bm25 is too slow to score twice).
        if corpus.qrels and not (m.name in references and m.rank_from_scores is not None):
            per_q = np.array([quality(m.search(index, q, RECALL_AT), corpus, key)
                              for q, key in zip(queries, corpus.query_keys, strict=True)])
            r["ndcg@10"], r["recall@100"] = per_q.mean(axis=0).tolist()
            per_query_ndcg[m.name] = per_q[:, 0]
        results[m.name], tops[m.name] = r, top
        progress(f"{label}: {m.name:24s} build {build_s:6.2f} s  {r['qps']:9.1f} q/s  p50 {r['p50_ms']:8.3f} ms  "
                 f"p99 {r['p99_ms']:8.3f} ms")
        if m.name in references:
            kept[m.name] = (m, index)
        del index
    # Agreement: one pass over the queries per reference, scoring each with the reference once.
    for ref_name, (ref_m, ref_index) in kept.items():
        compared = [m.name for m in ms if m.reference == ref_name]
        n = len(tops[ref_name])
        progress(f"{label}: agreement of {', '.join(compared)} with {ref_name} over {n} queries")
        acc = {name: np.zeros(3) for name in compared}
        q_sum = np.zeros(2)
        for i, q in enumerate(corpus.queries[:n]):
            s = ref_m.scores(ref_index, q)
            if corpus.qrels and ref_m.rank_from_scores is not None:
                q_sum += quality(ref_m.rank_from_scores(s, RECALL_AT), corpus, corpus.query_keys[i])
            for name in compared:
                acc[name] += agreement(tops[name][i], tops[ref_name][i], s)
        if corpus.qrels and ref_m.rank_from_scores is not None:
            results[ref_name]["ndcg@10"], results[ref_name]["recall@100"] = (q_sum / n).tolist()
        for name in compared:
            equal, overlap, tied = (acc[name] / n).tolist()
            results[name]["agreement"] = {"reference": ref_name, "queries": n, "top10_equal": equal,
                                          "top10_overlap": overlap, "top10_equal_up_to_ties": tied}
    kept.clear()
    if "rank-bm25" in latencies:
        base = latencies["rank-bm25"]
        for name, r in results.items():
            # Same queries for both: the ratio of mean latencies, and the median of per-query ratios
            # (robust to a stall from other work on the machine during a 50-query sample).
            r["x_rank_bm25_mean"] = float(base.mean() / latencies[name].mean())
            r["x_rank_bm25"] = float(np.median(base / latencies[name]))
    for name, r in results.items():
        if "ndcg@10" in r:
            progress(f"{label}: {name:24s} nDCG@10 {r['ndcg@10']:.4f}  Recall@100 {r['recall@100']:.4f}")
    out = {"docs": len(corpus.docs), "terms": corpus.n_terms, "postings": nnz, "queries": len(corpus.queries),
           "tokenizer": corpus.tokenizer, "speedup_queries": min(subset, len(corpus.queries)), "methods": results}
    if "ours-okapi" in per_query_ndcg and "ours-lucene" in per_query_ndcg:
        out["lucene_minus_okapi_ndcg@10"] = paired_difference(per_query_ndcg["ours-okapi"],
                                                              per_query_ndcg["ours-lucene"])
        progress(f"{label}: nDCG@10 lucene - okapi {out['lucene_minus_okapi_ndcg@10']}")
    return out


def paired_difference(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> dict[str, Any]:
    """Mean of b - a over the same queries, with a 95% paired-bootstrap interval (fixed seed)."""
    d = b - a
    rng = np.random.default_rng(SEED)
    means = d[rng.integers(0, d.shape[0], (BOOTSTRAP, d.shape[0]))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5]).tolist()
    return {"mean": float(d.mean()), "ci95": [lo, hi], "better": int((d > 0).sum()), "worse": int((d < 0).sum()),
            "queries": int(d.shape[0])}


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import bm25s

    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model or platform.processor(),
            "python": platform.python_version(), "numpy": np.__version__, "bm25s": bm25s.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "loadavg_start": loadavg()}


def loadavg() -> str:
    """Other work on the machine skews timings: the 1/5/15-minute load averages go into the report."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def table(report: dict[str, Any]) -> str:
    head = ("| corpus | method | build s | q/s | p50 ms | p99 ms | × rank-bm25 | timed q | "
            "top-10 = ref | overlap | = up to ties | nDCG@10 | R@100 |")
    lines = [head, "|" + "---|" * 13]
    for cname, c in report["corpora"].items():
        for mname, r in c["methods"].items():
            a = r.get("agreement")
            agree = (f"{a['top10_equal']:.3f} vs {a['reference']} | {a['top10_overlap']:.3f} | "
                     f"{a['top10_equal_up_to_ties']:.3f}") if a else "– | – | –"
            quality = (f"{r['ndcg@10']:.4f} | {r['recall@100']:.4f}" if "ndcg@10" in r else "– | –")
            x = f"{r['x_rank_bm25']:.0f}×" if "x_rank_bm25" in r else "–"
            lines.append(f"| {cname} | {mname} | {r['build_s']:.2f} | {r['qps']:.0f} | {r['p50_ms']:.3f} | "
                         f"{r['p99_ms']:.3f} | {x} | {r['timed_queries']} | {agree} | {quality} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.retrieval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100_000, help="synthetic corpus size (default 100000)")
    ap.add_argument("--queries", type=int, default=1000, help="synthetic queries (default 1000)")
    ap.add_argument("--rank-queries", type=int, default=50,
                    help="synthetic queries timed for rank-bm25, which is slow (default 50)")
    ap.add_argument("--scifact", type=Path, default=Path("../shared/data/scifact"),
                    help="BEIR-layout SciFact folder (default ../shared/data/scifact); skipped if absent")
    ap.add_argument("--tokenizers", default="snaprag,lowercase", help="tokenizers for SciFact, comma-separated")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    tokenizers = args.tokenizers.split(",")
    unknown = [t for t in tokenizers if t not in TOKENIZERS]
    if unknown:
        ap.error(f"unknown tokenizer {', '.join(unknown)}: choose from {', '.join(TOKENIZERS)}")

    report: dict[str, Any] = {"command": "python -m bench.retrieval " + " ".join(sys.argv[1:] if argv is None
                                                                               else argv),
                              "machine": machine(), "corpora": {}, "skipped": []}
    progress(f"machine: {report['machine']}")
    ms = methods()
    progress(f"synthetic: generating {args.docs} docs, {args.queries} queries (seed {SEED})")
    report["corpora"]["synthetic"] = run_corpus(synthetic(args.docs, args.queries), ms, args.rank_queries)
    needed = [args.scifact / "corpus.jsonl", args.scifact / "queries.jsonl", args.scifact / "qrels" / "train.tsv"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        why = f"SciFact skipped: {', '.join(missing)} not found (pass --scifact PATH to a BEIR-layout folder)"
        report["skipped"].append(why)
        progress(why)
    else:
        for name in tokenizers:
            progress(f"scifact: tokenizing with {name}")
            corpus = scifact(args.scifact, name)
            report["corpora"][f"scifact-train/{name}"] = run_corpus(corpus, ms, args.rank_queries)
    report["machine"]["loadavg_end"] = loadavg()
    report["wall_s"] = time.monotonic() - _T0
    progress(f"done in {report['wall_s']:.0f} s (load average {report['machine']['loadavg_end']})")
    print(table(report))
    for cname, c in report["corpora"].items():
        d = c.get("lucene_minus_okapi_ndcg@10")
        if d:
            print(f"\n{cname}: nDCG@10 ours-lucene - ours-okapi = {d['mean']:+.4f} (95% paired bootstrap "
                  f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]; lucene better on {d['better']}, worse on "
                  f"{d['worse']} of {d['queries']} queries)")
    for why in report["skipped"]:
        print(f"\n{why}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
