"""Voice generation, side by side in one run: first-chunk latency under the real voice budget, and how
grounded each generator's own answers are.

    python -m bench.generation [--variants extractive,local,local+voice,vllm] [--questions 40]
                               [--local-adapter voice=DIR] [--vllm-url URL] [--append-results]

For every variant and KB dev question (both knowledge bases, taken alternately):

* **served**: the whole answer pipeline (retrieve -> generate, with the voice profile's budgets and the
  policy's fallback tier), as `Ask` runs it: first-chunk latency, and how often the model tier handed
  over to the extractive tier (and why);
* **grounded**: the same generator with no deadline and the grounding filter off, so its raw answer is
  judged: the share of its sentences the grounding check supports ([generation.grounding] thresholds),
  the share of answers with every sentence supported, and the share that cite a relevant passage.

Variants: `extractive`; `local` (SmolLM2 in process, [generation.local]); `local+NAME` (with the LoRA
adapter NAME from --local-adapter NAME=DIR); `vllm` (a running vLLM server at --vllm-url, base model) and
`vllm+NAME` (its LoRA module NAME). Prints progress to stderr and a markdown table to stdout;
`--append-results` appends it to bench/RESULTS.md under "## Generation".
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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.config import Config, GroundingConfig, TaskPolicy, load_config
from server.generate.base import GenerationRequest
from server.generate.grounding import GroundingChecker
from server.generate.policy import PolicyGenerator
from server.generate.prompt import PromptBuilder, approx_tokens
from server.pipeline.answer import AnswerPipeline, AnswerRequest
from server.pipeline.events import ChunkEvent, FinalEvent
from server.runtime import Runtime, build_runtime

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dev_questions(cfg: Config, n: int) -> list[dict[str, Any]]:
    """Dev questions of every KB, interleaved so a short run still covers both domains."""
    per_kb: list[list[dict[str, Any]]] = []
    for kb in cfg.knowledge_base.paths:
        rows: list[dict[str, Any]] = []
        for f in sorted(cfg.resolve_path(kb).glob("golden_dev_*.jsonl")):
            rows += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        per_kb.append(rows)
    out: list[dict[str, Any]] = []
    for i in range(max(map(len, per_kb), default=0)):
        out += [rows[i] for rows in per_kb if i < len(rows)]
    return out[:n]


@dataclasses.dataclass
class Variant:
    name: str
    policy: TaskPolicy
    backend: Any


def make_variants(names: Sequence[str], cfg: Config, args: argparse.Namespace) -> list[Variant]:
    out: list[Variant] = []
    backends: dict[str, Any] = {}
    for name in names:
        kind, _, adapter = name.partition("+")
        if kind == "extractive":
            out.append(Variant(name, TaskPolicy(backend="extractive"), None))
            continue
        if kind not in backends:
            if kind == "local":
                from server.generate.local import LocalBackend

                local = dataclasses.replace(cfg.generation.local, adapters=list(args.local_adapter))
                backends[kind] = LocalBackend(local, cfg.resolve_path)
            elif kind == "vllm":
                from server.generate.vllm import VllmBackend

                backends[kind] = VllmBackend(dataclasses.replace(cfg.generation.vllm, endpoints=[args.vllm_url]))
            else:
                raise SystemExit(f"unknown variant {name!r}: use extractive, local[+ADAPTER] or vllm[+ADAPTER]")
        policy = TaskPolicy(backend=kind, adapter=adapter, max_tokens=args.max_tokens)  # type: ignore[arg-type]
        out.append(Variant(name, policy, backends[kind]))
    return out


def generator_for(rt: Runtime, v: Variant, *, grounding: GroundingConfig) -> PolicyGenerator:
    g = dataclasses.replace(rt.cfg.generation, grounding=grounding, voice=v.policy)
    extractive = rt.generator.extractive  # type: ignore[attr-defined]
    if v.backend is None:
        return PolicyGenerator(v.policy, g, extractive=extractive)
    counter = getattr(v.backend, "count_tokens", None) or approx_tokens
    encoder = getattr(getattr(rt.retriever, "dense", None), "encoder", None)
    return PolicyGenerator(v.policy, g, extractive=extractive, backend=v.backend,
                           prompts=PromptBuilder(g.prompt, counter),
                           grounding=GroundingChecker(grounding, rt.tokenizer, encoder), cpu=rt.cpu)


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def served(rt: Runtime, gen: PolicyGenerator, questions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    pipeline = AnswerPipeline(dataclasses.replace(rt, generator=gen))
    profile = rt.cfg.profiles["voice"]
    firsts: list[float] = []
    tiers: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for q in questions:
        first = None
        async for ev in pipeline.run(AnswerRequest(query=q["question"], profile=profile)):
            if isinstance(ev, ChunkEvent) and first is None:
                first = ev
            if isinstance(ev, FinalEvent):
                firsts.append(ev.first_chunk_ms)
                tiers[ev.generator] += 1
                if ev.generation is not None and ev.generation.fallback_reason:
                    reasons[ev.generation.fallback_reason.split(":")[0]] += 1
    return {"first_chunk_ms": firsts, "tiers": dict(tiers), "fallback_reasons": dict(reasons)}


async def grounded(rt: Runtime, gen: PolicyGenerator, checker: GroundingChecker,
                   questions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    rates, full, cites_relevant, ttft, tok_s, answers = [], 0, 0, [], [], []
    loop = asyncio.get_running_loop()
    for q in questions:
        k = rt.cfg.profiles["voice"].default_k
        hits = await loop.run_in_executor(rt.cpu, rt.retriever.search, q["question"], k)
        req = GenerationRequest(q["question"], hits, rt.cfg.generation.max_sentences, first_token_s=120.0)
        t0 = time.perf_counter()
        pieces = [p async for p in gen.stream(req)]
        wall = time.perf_counter() - t0
        text = " ".join(p.text for p in pieces)
        passages = hits[: rt.cfg.generation.max_passages]
        rate = await loop.run_in_executor(rt.cpu, checker.answer_rate, text, passages)
        rates.append(rate)
        full += rate == 1.0
        cited = {hits[m - 1].passage.id for p in pieces for m in p.markers if 0 < m <= len(hits)}
        cites_relevant += bool(cited & set(q["relevant"]))
        if req.record.tokens and req.record.ttft_ms:
            ttft.append(req.record.ttft_ms)
            decode_s = wall - req.record.ttft_ms / 1000
            if decode_s > 0 and req.record.tokens > 1:
                tok_s.append((req.record.tokens - 1) / decode_s)
        answers.append({"question": q["question"], "answer": text, "rate": rate,
                        "fallback": req.record.fallback_reason})
    n = len(questions)
    return {"sentence_rate": float(np.mean(rates)) if rates else 0.0, "fully_grounded": full / n if n else 0.0,
            "cites_relevant": cites_relevant / n if n else 0.0, "ttft_ms": ttft, "tokens_per_s": tok_s,
            "answers": answers}


async def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides=args.set)
    _log("==> building the runtime (retriever, encoder) ...")
    rt = build_runtime(cfg)
    questions = dev_questions(cfg, args.questions)
    variants = make_variants(args.variants.split(","), cfg, args)
    for b in {id(v.backend): v.backend for v in variants if v.backend is not None}.values():
        _log(f"==> starting the {b.name} backend ...")
        await b.start()
    encoder = getattr(getattr(rt.retriever, "dense", None), "encoder", None)
    checker = GroundingChecker(cfg.generation.grounding, rt.tokenizer, encoder)
    rows, raw = [], {}
    try:
        for v in variants:
            _log(f"==> {v.name}: served ({len(questions)} questions, voice budget) ...")
            s = await served(rt, generator_for(rt, v, grounding=cfg.generation.grounding), questions)
            _log(f"==> {v.name}: grounded (no deadline, grounding filter off) ...")
            g = await grounded(rt, generator_for(rt, v, grounding=dataclasses.replace(
                cfg.generation.grounding, enabled=False)), checker, questions)
            fc = s["first_chunk_ms"]
            fell = sum(n for t, n in s["tiers"].items() if t != (v.backend.name if v.backend else "extractive"))
            rows.append(f"| {v.name} | {pct(fc, 50):.0f} | {pct(fc, 95):.0f} | {fell}/{len(fc)} | "
                        f"{g['sentence_rate']:.1%} | {g['fully_grounded']:.1%} | {g['cites_relevant']:.1%} | "
                        f"{pct(g['ttft_ms'], 50):.0f} | {np.mean(g['tokens_per_s']) if g['tokens_per_s'] else 0:.1f} |")
            raw[v.name] = {"served": s, "grounded": {k: v2 for k, v2 in g.items() if k != "answers"},
                           "sample_answers": g["answers"][:5]}
            _log(rows[-1])
    finally:
        for b in {id(v.backend): v.backend for v in variants if v.backend is not None}.values():
            await b.close()
        rt.close()
    cmd = "python -m bench.generation " + shlex.join(sys.argv[1:])
    table = "\n".join([
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}; {len(questions)} KB dev questions; "
        f"{os.cpu_count()} CPUs, {platform.machine()}; voice first-chunk budget "
        f"{cfg.profiles['voice'].first_chunk_ms:.0f} ms, first token {cfg.profiles['voice'].first_token_ms:.0f} ms)",
        "",
        "| variant | first chunk p50 ms | p95 ms | answered by the fallback tier | grounded sentences | "
        "fully grounded answers | cites a relevant passage | TTFT p50 ms (no deadline) | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows])
    print(table)
    for name, r in raw.items():
        print(f"\n{name}: fallback reasons {r['served']['fallback_reasons']}", file=sys.stderr)
        for a in r["sample_answers"][:3]:
            print(f"  Q: {a['question']}\n  A: {a['answer']}  (grounded {a['rate']:.0%})", file=sys.stderr)
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(raw, indent=1, default=str), "utf-8")
    if args.append_results:
        await asyncio.to_thread(_append, "\n## Generation\n\n" + table + "\n")
    return 0


def _append(text: str) -> None:
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="extractive",
                    help="comma-separated: extractive, local, local+NAME, vllm, vllm+NAME (default: %(default)s)")
    ap.add_argument("--questions", type=int, default=40, help="KB dev questions (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=96, help="model tiers' token cap (default: %(default)s)")
    ap.add_argument("--local-adapter", action="append", default=[], metavar="NAME=DIR",
                    help="LoRA adapter for local+NAME (repeatable)")
    ap.add_argument("--vllm-url", default="http://127.0.0.1:8000", help="vLLM server for vllm[+NAME]")
    ap.add_argument("--config", help="TOML config (default: snaprag.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--json", help="write raw figures and sample answers here")
    ap.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
