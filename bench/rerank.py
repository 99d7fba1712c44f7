"""Cross-encoder rerank latency: one `CrossEncoder.score` call per request, FP32 and INT8, in one run.

    python -m bench.rerank --model-dir DIR [--files model.onnx,model.int8.onnx] [--rounds 30]
                           [--threads 0] [--batch-size 16] [--append-results]

For 16, 32 and 64 candidates with (query, passage) pairs of about 128 and 256 tokens, measures the
latency of scoring one real question (the KB golden questions, cycled) against that many passages, as
the rerank stage pays it: tokenisation, dynamic padding, every ONNX run. The client loop is single
threaded (one request at a time); onnxruntime uses `--threads` intra-op threads (0 = one per core, the
`rerank.intra_op_threads` default). Passages are real KB text: consecutive passages joined and cut at
a token boundary so each pair reaches its length (the measured mean is in the table). Rounds interleave
the graphs and sizes, so background load on a shared machine hits them alike.

Prints progress to stderr and a markdown table to stdout; `--append-results` appends it to
bench/RESULTS.md under "## Rerank latency" (append only). Exits 2 with a message when the model
folder or a named graph is missing or does not load.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from bench.encoder import load_texts
from server.rerank.cross_encoder import FP32_MODEL_FILE, MODEL_FILE, TOKENIZER_FILE, CrossEncoder, RerankerError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = ROOT / "build/models/reranker-kb"
CANDIDATES = (16, 32, 64)
PAIR_TOKENS = (128, 256)
SERVE_MAX_LENGTH = 256  # rerank.max_length default: the graph is loaded as it is served
LABELS = {FP32_MODEL_FILE: "FP32", MODEL_FILE: "INT8"}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PassageMaker:
    """KB passages lengthened (by joining the next ones) and cut at a token boundary so that
    `[CLS] query [SEP] passage [SEP]` has about `pair_tokens` tokens."""

    def __init__(self, tokenizer: Tokenizer, passages: Sequence[str]) -> None:
        self._tok = tokenizer
        self._passages = list(passages)
        self._specials = tokenizer.num_special_tokens_to_add(True)
        self._cache: dict[tuple[int, int], str] = {}

    def passage(self, i: int, budget: int) -> str:
        key = (i % len(self._passages), budget)
        if key not in self._cache:
            text, j = "", i
            while True:
                text = f"{text} {self._passages[j % len(self._passages)]}".strip()
                enc = self._tok.encode(text, add_special_tokens=False)
                if len(enc.ids) >= budget:
                    break
                j += 1
            self._cache[key] = text[: enc.offsets[budget - 1][1]]
        return self._cache[key]

    def batch(self, query: str, start: int, n: int, pair_tokens: int) -> list[str]:
        q = len(self._tok.encode(query, add_special_tokens=False).ids)
        budget = max(1, pair_tokens - self._specials - q)
        return [self.passage(start + k, budget) for k in range(n)]


def _plain(tok: Tokenizer) -> Tokenizer:
    tok.no_padding()
    tok.no_truncation()
    return tok


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.rerank", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                    help=f"cross-encoder folder (default {DEFAULT_MODEL_DIR.relative_to(ROOT)})")
    ap.add_argument("--files", help=f"comma-separated graphs inside the folder (default: whichever of "
                                    f"{FP32_MODEL_FILE},{MODEL_FILE} exist)")
    ap.add_argument("--rounds", type=int, default=30, help="timed calls per (graph, candidates, length)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = one per core)")
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per ONNX run (rerank.batch_size)")
    ap.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)

    model_dir: Path = args.model_dir
    if not model_dir.is_dir():
        print(f"error: cross-encoder folder {model_dir} does not exist; train one with `snaprag train-reranker` "
              f"(it lands in build/models/reranker-kb) or pass --model-dir", file=sys.stderr)
        return 2
    if args.files:
        files = [f.strip() for f in args.files.split(",") if f.strip()]
    else:
        files = [f for f in (FP32_MODEL_FILE, MODEL_FILE) if (model_dir / f).is_file()]
    missing = [f for f in files if not (model_dir / f).is_file()]
    if not files or missing:
        print(f"error: no graph {missing or [FP32_MODEL_FILE, MODEL_FILE]} in {model_dir}; "
              f"pass --files with the .onnx files it has", file=sys.stderr)
        return 2
    t_start = time.perf_counter()

    encoders: dict[str, CrossEncoder] = {}
    for f in files:
        _log(f"loading {model_dir / f} ...")
        try:
            encoders[f] = CrossEncoder.load(model_dir, model_file=f, max_length=SERVE_MAX_LENGTH,
                                            intra_op_threads=args.threads)
        except RerankerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        encoders[f].warm_up(args.batch_size)

    queries, passages = load_texts(ROOT / "data")
    maker = PassageMaker(_plain(Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))), passages)
    cells = [(n, t) for t in PAIR_TOKENS for n in CANDIDATES]
    times: dict[tuple[str, int, int], list[float]] = {(f, n, t): [] for f in files for n, t in cells}
    tokens: dict[tuple[int, int], list[int]] = {c: [] for c in cells}
    for f in files:  # one untimed call per cell: first runs at a new shape pick kernels
        for n, t in cells:
            encoders[f].score(queries[0], maker.batch(queries[0], 0, n, t), args.batch_size)
    for r in range(args.rounds):
        if r % 10 == 0:
            _log(f"round {r + 1}/{args.rounds} ...")
        q = queries[r % len(queries)]
        for n, t in cells:
            batch = maker.batch(q, r * 7, n, t)
            if r < 3:
                some = encoders[files[0]]
                tokens[(n, t)] += [some.pair_count_tokens(q, p) for p in batch]
            for f in files:
                t0 = time.perf_counter()
                encoders[f].score(q, batch, args.batch_size)
                times[(f, n, t)].append((time.perf_counter() - t0) * 1000.0)

    some = encoders[files[0]]
    head = (f"{model_dir}: {', '.join(files)}; {args.rounds} calls per row, one at a time; batch size "
            f"{args.batch_size}; intra-op threads {args.threads or 'one per core'}; providers {some.providers}; "
            f"{os.cpu_count()} CPUs ({platform.machine()}), load average {os.getloadavg()[0]:.1f}; "
            f"whole run {time.perf_counter() - t_start:.0f} s")
    rows = ["| graph | candidates | pair tokens (mean) | p50 ms | p95 ms | mean ms | p50 ms / pair |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for n, t in cells:
        for f in files:
            ms = np.asarray(times[(f, n, t)])
            p50 = float(np.percentile(ms, 50))
            rows.append(f"| {LABELS.get(f, f)} ({f}) | {n} | {np.mean(tokens[(n, t)]):.0f} | {p50:.2f} | "
                        f"{np.percentile(ms, 95):.2f} | {ms.mean():.2f} | {p50 / n:.3f} |")
    table = "\n".join(rows)
    print(head)
    print()
    print(table)
    if args.append_results:
        command = shlex.join(["python", "-m", "bench.rerank", *argv])
        with (ROOT / "bench" / "RESULTS.md").open("a", encoding="utf-8") as fh:
            fh.write(f"\n## Rerank latency\n\nCommand: `{command}` ({time.strftime('%Y-%m-%d')})\n\n"
                     f"{head}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
