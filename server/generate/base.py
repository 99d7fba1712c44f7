"""The generator contract: stream an answer for a question and its retrieved passages.

A generator yields `AnswerPiece`s, each a whole sentence (TTS speaks as soon as one lands), with the
citation markers it relies on. Cancellation (barge-in, client cancel) arrives as CancelledError at the
generator's await point; a generator must release what it holds in `finally` and re-raise.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.retrieval.sparse import Hit


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    question: str
    passages: Sequence[Hit]
    max_sentences: int = 3


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
