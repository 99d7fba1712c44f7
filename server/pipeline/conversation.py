"""The memory of one Converse stream, for model prompts: recent turns verbatim, older ones summarised.

The summary is deterministic and cheap (no model call on the hot path): each turn that leaves the
window adds "asked X; told Y" with Y the answer's first sentence, and the oldest entries go once the
summary passes its size. The prompt builder trims it further by tokens if the budget is short.
"""

from __future__ import annotations

from collections import deque

from server.generate.base import ConversationTurn
from server.generate.sentences import split_sentences


class Conversation:
    def __init__(self, max_turns: int, max_summary_chars: int = 600) -> None:
        self.recent: deque[ConversationTurn] = deque()
        self.max_turns = max_turns
        self.max_summary_chars = max_summary_chars
        self._summary: deque[str] = deque()

    def add(self, question: str, answer: str) -> None:
        self.recent.append(ConversationTurn(question, answer))
        while len(self.recent) > self.max_turns:
            old = self.recent.popleft()
            first = (split_sentences(old.answer) or [""])[0]
            self._summary.append(f"asked {old.question!r}; told {first!r}" if first else f"asked {old.question!r}")
            while len(self._summary) > 1 and len(self.summary) > self.max_summary_chars:
                self._summary.popleft()

    @property
    def summary(self) -> str:
        return "; ".join(self._summary)

    def turns(self) -> tuple[ConversationTurn, ...]:
        return tuple(self.recent)


__all__ = ["Conversation"]
