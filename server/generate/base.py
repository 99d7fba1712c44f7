"""The generator contract: stream an answer for a question and its retrieved passages.

A generator yields `AnswerPiece`s, each a whole sentence (TTS speaks as soon as one lands), with the
citation markers it relies on. Cancellation (barge-in, client cancel) arrives as CancelledError at the
generator's await point; a generator must release what it holds in `finally` and re-raise.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from server.retrieval.sparse import Hit


@dataclass(slots=True)
class GenerationRecord:
    """What one generation call did; filled in by the generator as it runs, reported in the final event
    and the log (seed 002)."""

    backend: str = ""
    model: str = ""
    adapter: str = ""
    ttft_ms: float = 0.0
    tokens: int = 0
    fallback_reason: str = ""
    ungrounded: list[str] = field(default_factory=list)
    """One line per generated sentence the grounding check refused, with why."""
    prompt_trims: tuple[str, ...] = ()
    stopped_reason: str = ""
    """Set when a model stream ended early after sentences were spoken (stall, failure)."""
    leaks: list[str] = field(default_factory=list)
    """One line per generated sentence the prompt-leak guard refused (it reproduced the system prompt or
    talked about its instructions), with why; the sentence itself is never spoken."""
    injections: list[str] = field(default_factory=list)
    """One line per passage or question sentence the injection filter removed before answering (where,
    which pattern, its start). Removed text is never spoken; the answer stays FULL when the rest of the
    passages still answer the question."""

    @property
    def degraded_reason(self) -> str:
        """Why the answer is not FULL because of generation ('' when it is)."""
        parts = []
        if self.fallback_reason:
            parts.append(f"{self.fallback_reason}; answered by the {self.backend} tier")
        if self.leaks:
            parts.append(f"{len(self.leaks)} sentence(s) stopped by the prompt-leak guard")
        if self.ungrounded:
            parts.append(f"{len(self.ungrounded)} ungrounded sentence(s) not spoken")
        if self.stopped_reason:
            parts.append(self.stopped_reason)
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class ConversationTurn:
    """One earlier exchange of a Converse session (carried into the prompt)."""

    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    question: str
    passages: Sequence[Hit]
    max_sentences: int = 3
    first_token_s: float = 1.0
    """Time-to-first-token limit for a model tier (the profile's first_token_ms, or less if less is left)."""
    first_chunk_deadline: float | None = None
    """Absolute monotonic time by which the first sentence must be out: a model tier that cannot make it
    hands over to its fallback tier early enough for that tier to answer in time."""
    turns: Sequence[ConversationTurn] = ()
    summary: str = ""
    record: GenerationRecord = field(default_factory=GenerationRecord)


@dataclass(frozen=True, slots=True)
class AnswerPiece:
    text: str
    markers: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Source:
    marker: int
    passage_id: str
    source: str
    snippet: str


class Generator(Protocol):
    name: str

    def sources(self, request: GenerationRequest) -> list[Source]:
        """The citations the answer may use, known before the first sentence (sent up front)."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[AnswerPiece, None]:
        ...
