"""The extractive generator: no model, a short spoken answer from the retrieved passages' best sentences.

Each candidate sentence is scored by how much of the question's content it covers (IDF-weighted, so
"e202" counts more than "robot"), with a preference for the better-ranked passage and for a
passage's opening sentences (help text states the point first). The best sentences are spoken in
passage order so the answer reads as a procedure, each with its citation marker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

from server.generate.base import AnswerPiece, GenerationRequest, Source
from server.generate.sentences import split_sentences

# How much a lower-ranked passage's sentences are discounted per rank, and a sentence per position.
RANK_DECAY = 0.85
POSITION_DECAY = 0.93
# A sentence from a lower-ranked passage must cover this share of the best sentence's support: a
# spoken answer that wanders to a neighbouring topic is worse than a shorter one.
SECONDARY_MIN_RATIO = 0.75


@dataclass(frozen=True, slots=True)
class _Candidate:
    passage_rank: int
    position: int
    text: str
    score: float


class ExtractiveGenerator:
    name = "extractive"

    def __init__(self, tokenize: Callable[[str], list[str]], idf: Callable[[str], float], *,
                 max_passages: int = 3, min_support: float = 0.2) -> None:
        self._tokenize = tokenize
        self._idf = idf
        self.max_passages = max_passages
        self.min_support = min_support

    def sources(self, request: GenerationRequest) -> list[Source]:
        return [Source(i + 1, h.passage.id, h.passage.source, split_sentences(h.passage.text)[0][:200])
                for i, h in enumerate(request.passages[: self.max_passages])]

    def select(self, request: GenerationRequest) -> list[_Candidate]:
        q_terms = set(self._tokenize(request.question))
        if not q_terms:
            return []
        weights = {t: max(self._idf(t), 0.1) for t in q_terms}
        total = sum(weights.values())
        candidates: list[_Candidate] = []
        for rank, hit in enumerate(request.passages[: self.max_passages]):
            for pos, sentence in enumerate(split_sentences(hit.passage.text)):
                covered = q_terms.intersection(self._tokenize(sentence))
                support = sum(weights[t] for t in covered) / total
                if support < self.min_support and not (rank == 0 and pos == 0 and covered):
                    continue
                score = support * (RANK_DECAY ** rank) * (POSITION_DECAY ** pos)
                candidates.append(_Candidate(rank, pos, sentence, score))
        if not candidates:
            return []
        top = max(candidates, key=lambda c: c.score)
        candidates = [c for c in candidates if c.passage_rank == top.passage_rank
                      or c.score >= SECONDARY_MIN_RATIO * top.score]
        best = sorted(candidates, key=lambda c: (-c.score, c.passage_rank, c.position))[: request.max_sentences]
        # Keep the top passage first and each passage's sentences in their written order.
        return sorted(best, key=lambda c: (c.passage_rank, c.position))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[AnswerPiece, None]:
        for c in self.select(request):
            yield AnswerPiece(c.text, (c.passage_rank + 1,))
            await asyncio.sleep(0)  # a cancellation point between sentences


def idf_lookup(vocab: dict[str, int], idf: Sequence[float]) -> Callable[[str], float]:
    default = max(idf) if len(idf) else 1.0
    def lookup(term: str) -> float:
        i = vocab.get(term)
        return float(idf[i]) if i is not None else default
    return lookup


__all__ = ["ExtractiveGenerator", "idf_lookup"]
