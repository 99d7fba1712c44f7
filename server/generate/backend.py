"""The text-backend contract: stream tokens for a chat prompt from a language model.

Two layers sit in `server/generate/`:

* a **backend** (this contract) turns a `Prompt` into a stream of `TextDelta`s: `vllm` (an OpenAI-
  compatible HTTP server, the production path) and `local` (transformers + peft in process);
* the **policy generator** (`policy.py`) picks a backend, model and LoRA adapter per task, assembles the
  prompt, cuts the stream into sentences, checks grounding and falls back along the configured tiers.

Deadlines are enforced once, here, by `guarded()`: time to first token and the stall between tokens.
Backends only stream and must release what they hold when the generator is closed (`aclose()`, which
is also what cancellation of the gRPC call does): the HTTP response is closed so vLLM aborts the
request, the local decode loop sees its stop flag at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """What the model sees. Chat backends send `messages`; completion backends render them with the
    model's chat template. `trimmed` lists what the prompt builder cut to fit the token budget."""

    messages: tuple[ChatMessage, ...]
    prompt_tokens: int = 0
    trimmed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    max_tokens: int = 128
    """Most new tokens."""
    first_token_s: float = 1.0
    """Deadline for the first token, from the call (prefill included)."""
    stall_s: float = 2.0
    """Longest gap between two tokens."""
    temperature: float = 0.0
    """0 = greedy (answers are reproducible and testable)."""
    stop: tuple[str, ...] = ()
    json_schema: Mapping[str, Any] | None = None
    """Constrain the output to JSON matching this schema (vLLM structured outputs); None = free text."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    tokens: int = 1
    """Tokens this delta carries (a vLLM SSE chunk may carry several)."""


class BackendError(Exception):
    """A backend could not serve the call. `kind` is what the policy's fallback reason reports."""

    kind: str = "error"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class BackendUnavailable(BackendError):
    """Connection refused / reset, no healthy endpoint, model not loaded."""

    kind = "unavailable"


class BackendServerError(BackendError):
    """The server answered 5xx, or a malformed stream."""

    kind = "server_error"


class BackendRejected(BackendError):
    """The server refused the request as given (4xx: unknown adapter, prompt too long)."""

    kind = "rejected"


class FirstTokenTimeout(BackendError):
    kind = "first_token_timeout"


class StreamStalled(BackendError):
    kind = "stalled"


class TextBackend(Protocol):
    name: str
    """Backend kind: "vllm" or "local"."""

    async def start(self) -> None:
        """Connect / load and warm up; called before health reports SERVING."""
        ...

    def stream(self, prompt: Prompt, limits: DecodeLimits, *, model: str,
               adapter: str | None = None) -> AsyncIterator[TextDelta]:
        """Stream the completion. `model` names the base model; `adapter` a LoRA adapter (None = base).
        Raises a `BackendError` subclass for anything the policy should fall back on."""
        ...

    async def close(self) -> None:
        ...


@dataclass(slots=True)
class StreamStats:
    """Filled in by `guarded()` as the stream runs: what each call records."""

    started: float = field(default_factory=time.monotonic)
    first_token_ms: float | None = None
    tokens: int = 0
    chars: int = 0


async def guarded(stream: AsyncIterator[TextDelta], limits: DecodeLimits,
                  stats: StreamStats | None = None) -> AsyncIterator[TextDelta]:
    """Re-yield `stream` under the first-token and stall deadlines, and always close it: a deadline
    miss, an exception or the consumer closing us (cancel, barge-in) all end in `stream.aclose()`."""
    stats = stats if stats is not None else StreamStats()
    it = aiter(stream)
    try:
        first = True
        while True:
            limit = limits.first_token_s - (time.monotonic() - stats.started) if first else limits.stall_s
            try:
                async with asyncio.timeout(max(0.0, limit)):
                    delta = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if first:
                    raise FirstTokenTimeout(f"no token within {limits.first_token_s * 1000:.0f} ms") from None
                raise StreamStalled(f"no token for {limits.stall_s * 1000:.0f} ms after {stats.tokens} "
                                    "token(s)") from None
            if first and delta.text:
                stats.first_token_ms = (time.monotonic() - stats.started) * 1000
                first = False
            stats.tokens += delta.tokens
            stats.chars += len(delta.text)
            yield delta
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


__all__ = ["BackendError", "BackendRejected", "BackendServerError", "BackendUnavailable", "ChatMessage",
           "DecodeLimits", "FirstTokenTimeout", "Prompt", "StreamStalled", "StreamStats", "TextBackend",
           "TextDelta", "guarded"]
