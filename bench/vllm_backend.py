"""vLLM backend latency: time to first token and decode speed through `VllmBackend`, base and LoRA.

    python -m bench.vllm_backend --model-dir DIR [--lora NAME=DIR] [--requests 20] [--max-tokens 64]
                                 [--api completions|chat] [--dtype float32] [--extra-vllm-args "..."]

Starts one vLLM server with `VllmProcess` (the launcher's CPU defaults, 127.0.0.1, a free port), then
sends `--requests` calls per variant, one at a time, as the voice path makes them: a RAG-shaped prompt
(instruction, two KB passages, a golden KB question), greedy, streamed and read through `guarded()`.
Variants (base, and the adapter when `--lora` is given) alternate request by request so background load
on a shared machine hits them alike; two warm-up calls per variant are not counted.

TTFT is from the call to the first text delta (connect, prefill and the first decode step included).
Decode tokens/s is the tokens after the first over the time after the first delta, per request; e2e
tokens/s is all tokens over the whole call (medians reported). With a model that decodes faster than the
API server flushes (the tiny test model), chunks arrive in bursts and only the e2e figure means much.
Prints progress to stderr and a markdown table with the exact command to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.encoder import load_texts
from server.config import VllmConfig
from server.generate.backend import ChatMessage, DecodeLimits, Prompt, StreamStats, guarded
from server.generate.vllm import VllmBackend
from server.generate.vllm_launcher import VllmProcess, VllmStartError, default_dtype

ROOT = Path(__file__).resolve().parents[1]
PASSAGE_CHARS = 400
WARMUP = 2
SYSTEM = "Answer the question from the passages in one or two short sentences. Cite passages as [n]."


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Samples:
    ttft_ms: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    e2e_tps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def build_prompts(n: int) -> list[Prompt]:
    questions, passages = load_texts(ROOT / "data")
    prompts = []
    for i in range(n):
        p1, p2 = passages[(2 * i) % len(passages)], passages[(2 * i + 1) % len(passages)]
        user = (f"Passages:\n[1] {p1[:PASSAGE_CHARS]}\n[2] {p2[:PASSAGE_CHARS]}\n\n"
                f"Question: {questions[i % len(questions)]}")
        prompts.append(Prompt((ChatMessage("system", SYSTEM), ChatMessage("user", user))))
    return prompts


async def one_call(backend: VllmBackend, prompt: Prompt, limits: DecodeLimits, model: str,
                   adapter: str | None) -> tuple[float, float, float, int]:
    """(ttft ms, decode tokens/s after the first delta, tokens/s over the call, tokens)."""
    stats = StreamStats()
    first_at = last_at = 0.0
    first_tokens = 0
    async for delta in guarded(backend.stream(prompt, limits, model=model, adapter=adapter), limits, stats):
        now = time.monotonic()
        if not first_at and delta.text:
            first_at, first_tokens = now, stats.tokens
        last_at = now
    if stats.first_token_ms is None:
        raise RuntimeError("the stream carried no text")
    after = stats.tokens - first_tokens
    tps = after / (last_at - first_at) if after and last_at > first_at else 0.0
    return stats.first_token_ms, tps, stats.tokens / (last_at - stats.started), stats.tokens


async def run_bench(base_url: str, variants: Sequence[tuple[str, str | None]], requests: int, max_tokens: int,
                    api: str) -> dict[str, Samples]:
    backend = VllmBackend(VllmConfig(endpoints=[base_url], api=api))  # type: ignore[arg-type]
    await backend.start()
    model = backend.base_model or ""
    # Generous deadlines: this measures latency, it does not enforce a budget.
    limits = DecodeLimits(max_tokens=max_tokens, first_token_s=30.0, stall_s=30.0)
    prompts = build_prompts(requests + WARMUP)
    results = {label: Samples() for label, _ in variants}
    try:
        for i, prompt in enumerate(prompts):
            # Alternate which variant goes first, so neither always follows the other's cleanup.
            for label, adapter in (variants if i % 2 == 0 else variants[::-1]):
                ttft, tps, e2e, tokens = await one_call(backend, prompt, limits, model, adapter)
                if i >= WARMUP:
                    s = results[label]
                    s.ttft_ms.append(ttft)
                    s.decode_tps.append(tps)
                    s.e2e_tps.append(e2e)
                    s.tokens.append(tokens)
            if i >= WARMUP and (i - WARMUP + 1) % 5 == 0:
                _log(f"  {i - WARMUP + 1}/{requests} requests per variant")
    finally:
        await backend.close()
    return results


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def render(results: dict[str, Samples], *, command: str, startup_s: float, model_dir: str, api: str,
           max_tokens: int, dtype: str) -> str:
    lines = [
        f"vLLM backend, `{model_dir}` ({dtype}), {api} api, greedy, max_tokens {max_tokens}; "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}); "
        f"vLLM startup {startup_s:.1f} s.",
        "",
        f"    {command}",
        "",
        "| variant | requests | TTFT p50 (ms) | TTFT p95 (ms) | decode tok/s (p50) | e2e tok/s (p50) "
        "| tokens/request |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in results.items():
        lines.append(f"| {label} | {len(s.ttft_ms)} | {_pct(s.ttft_ms, 0.5):.0f} | {_pct(s.ttft_ms, 0.95):.0f} | "
                     f"{statistics.median(s.decode_tps):.1f} | {statistics.median(s.e2e_tps):.1f} | "
                     f"{statistics.mean(s.tokens):.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vllm_backend", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="HF model folder to serve")
    p.add_argument("--lora", default=None, metavar="NAME=DIR", help="also measure this LoRA adapter")
    p.add_argument("--requests", type=int, default=20, help="measured requests per variant")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--api", choices=["completions", "chat"], default="chat")
    p.add_argument("--dtype", default="auto", help="the launcher's: bfloat16 on CPUs with native bf16, else float32")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--extra-vllm-args", default="", help="more `vllm serve` flags, one shell-quoted string")
    args = p.parse_args(argv)
    if not Path(args.model_dir).is_dir():
        _log(f"--model-dir {args.model_dir}: not a folder")
        return 2
    variants: list[tuple[str, str | None]] = [("base", None)]
    if args.lora:
        name = args.lora.split("=", 1)[0]
        variants.append((f"LoRA `{name}`", name))
    command = "python -m bench.vllm_backend " + shlex.join(argv if argv is not None else sys.argv[1:])
    _log(f"starting vLLM for {args.model_dir} ...")
    try:
        with VllmProcess(args.model_dir, loras=[args.lora] if args.lora else [], dtype=args.dtype,
                         max_model_len=args.max_model_len, extra_args=shlex.split(args.extra_vllm_args)) as server:
            assert server.startup_s is not None
            _log(f"vLLM ready on {server.base_url} in {server.startup_s:.1f} s; {args.requests} requests per "
                 f"variant (+{WARMUP} warm-up)")
            results = asyncio.run(run_bench(server.base_url, variants, args.requests, args.max_tokens, args.api))
            startup_s = server.startup_s
    except VllmStartError as e:
        _log(str(e))
        return 2
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    print(render(results, command=command, startup_s=startup_s, model_dir=args.model_dir, api=args.api,
                 max_tokens=args.max_tokens, dtype=dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
