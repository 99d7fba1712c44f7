"""Sentence splitting for spoken output: answers leave at sentence boundaries so TTS can start."""

from __future__ import annotations

import re

# A sentence ends at . ! ? followed by space and an upper-case letter, digit or quote, but not after
# common abbreviations or single letters ("e.g.", "approx.", "U.S.").
_ABBREV = ("e.g", "i.e", "approx", "etc", "vs", "min", "max", "rev", "fig", "mr", "mrs", "dr", "st", "u.s", "u.k")
# The boundary is the whitespace itself, so a closing quote or bracket stays with its sentence.
_BOUNDARY = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    parts = _BOUNDARY.split(text.strip())
    out: list[str] = []
    for part in parts:
        if out:
            prev_word = out[-1].rstrip(".!?").rsplit(" ", 1)[-1].lower()
            if out[-1].endswith(".") and (prev_word in _ABBREV or (len(prev_word) == 1 and prev_word.isalpha())):
                out[-1] = f"{out[-1]} {part}"
                continue
        out.append(part)
    return [s.strip() for s in out if s.strip()]
