"""Grounding check: nothing a model generates is spoken unless the retrieved passages support it.

A sentence is *supported* when it clears both bars (thresholds in [generation.grounding]):

* **lexical**: the share of its content words (our retrieval tokenizer: stopwords out, light stemming)
  found in the passages it may draw on, where numbers and codes ("10", "e202", "5ghz") weigh double:
  a changed number is the most harmful hallucination and the one a word-overlap score must not wash
  out. A sentence that introduces a number or code that appears in no passage fails outright.
* **embedding**: the cosine similarity (MiniLM, the dense retriever's encoder) between the sentence and
  its best-matching passage *sentence*: paraphrases pass, on-topic but different claims mostly do not.
  Passage sentence vectors are cached by passage id.

Citation markers ([1], [2]) are stripped before checking. When no encoder is loaded the embedding bar
is skipped and the check is lexical only (the record says so).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.config import GroundingConfig
from server.generate.sentences import split_sentences
from server.retrieval.sparse import Hit

_MARKER = re.compile(r"\s*\[(\d{1,2})\]")
_HAS_DIGIT = re.compile(r"\d")
_CACHE_PASSAGES = 4096


@dataclass(frozen=True, slots=True)
class SentenceSupport:
    supported: bool
    lexical: float
    embedding: float | None
    """None when no encoder is loaded (lexical-only check)."""
    best_passage: int
    """0-based index into the passages of the best-matching one (-1 when none)."""
    reason: str = ""


def strip_markers(text: str) -> tuple[str, tuple[int, ...]]:
    """'Hold it 10 s [1].' -> ('Hold it 10 s.', (1,)). Markers may sit before or after the period."""
    markers = tuple(dict.fromkeys(int(m) for m in _MARKER.findall(text)))
    clean = _MARKER.sub("", text).strip()
    clean = re.sub(r"\s+([.!?,;:])", r"\1", clean)
    return clean, markers


class GroundingChecker:
    def __init__(self, cfg: GroundingConfig, tokenize: Callable[[str], list[str]], encoder: Any = None) -> None:
        self.cfg = cfg
        self.tokenize = tokenize
        self.encoder = encoder if cfg.min_embedding > 0 else None
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _passage_vectors(self, hit: Hit) -> np.ndarray:
        pid = hit.passage.id
        with self._lock:
            v = self._vectors.get(pid)
            if v is not None:
                self._vectors.move_to_end(pid)
                return v
        sentences = split_sentences(hit.passage.text) or [hit.passage.text]
        v = self.encoder.encode(sentences)
        with self._lock:
            self._vectors[pid] = v
            while len(self._vectors) > _CACHE_PASSAGES:
                self._vectors.popitem(last=False)
        return v

    def lexical(self, sentence: str, passages: Sequence[Hit]) -> tuple[float, int, str]:
        """(support share, best passage index, reason when a number/code is unsupported)."""
        terms = set(self.tokenize(sentence))
        if not terms:
            return 1.0, -1, ""  # nothing to check ("Sure." / "Okay.")
        vocab = [set(self.tokenize(h.passage.text)) for h in passages]
        everything = set().union(*vocab) if vocab else set()
        weight = {t: 2.0 if _HAS_DIGIT.search(t) else 1.0 for t in terms}
        total = sum(weight.values())
        share = sum(w for t, w in weight.items() if t in everything) / total
        unknown_codes = sorted(t for t in terms if _HAS_DIGIT.search(t) and t not in everything)
        best = max(range(len(vocab)), key=lambda i: len(terms & vocab[i]), default=-1)
        reason = f"states {', '.join(unknown_codes)}, which no passage contains" if unknown_codes else ""
        return share, best, reason

    def check(self, sentence: str, passages: Sequence[Hit]) -> SentenceSupport:
        """Blocking (runs the encoder): call it from a worker thread on the serving path."""
        text, _ = strip_markers(sentence)
        if not passages:
            return SentenceSupport(False, 0.0, None, -1, "no passages to support it")
        share, best, reason = self.lexical(text, passages)
        if reason:
            return SentenceSupport(False, share, None, best, reason)
        if share < self.cfg.min_lexical:
            return SentenceSupport(False, share, None, best,
                                   f"{share:.0%} of its content words are in the passages "
                                   f"(needs {self.cfg.min_lexical:.0%})")
        if self.encoder is None:
            return SentenceSupport(True, share, None, best)
        q = self.encoder.encode_query(text)
        sims = [float(np.max(self._passage_vectors(h) @ q)) for h in passages]
        best_emb = int(np.argmax(sims))
        cos = sims[best_emb]
        if cos < self.cfg.min_embedding:
            return SentenceSupport(False, share, cos, best_emb,
                                   f"closest passage sentence has cosine {cos:.2f} "
                                   f"(needs {self.cfg.min_embedding:.2f})")
        return SentenceSupport(True, share, cos, best_emb)

    def answer_rate(self, text: str, passages: Sequence[Hit]) -> float:
        """Share of an answer's sentences that are supported (0 for an empty answer): the grounded-answer
        score of the bench and the LoRA card."""
        sentences = split_sentences(text)
        if not sentences:
            return 0.0
        return sum(self.check(s, passages).supported for s in sentences) / len(sentences)


__all__ = ["GroundingChecker", "SentenceSupport", "strip_markers"]
