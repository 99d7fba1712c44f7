"""The tokenizer shared by indexing and queries: NFKC, lowercase, split on non-alphanumerics,
optional stopwords and light stemming.

Hyphenated compounds also yield their joined form ("wi-fi" -> wi, fi, wifi).
The stemmer is deliberately light (plural, -ing, -ed, -ly): help-centre and SOP text is short and
full of product and fault names ("e202", "wi-fi", "t2") that aggressive stemmers mangle.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# "wi-fi", "amr-017", "e-stop": also index the joined form, so "wifi" and "estop" match.
_COMPOUND = re.compile(r"[^\W_]+(?:-[^\W_]+)+", re.UNICODE)

# Function words that carry no retrieval signal in spoken questions ("how do i ...", "what does ...").
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just let me more most my myself no nor
not of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves please
hey lumo okay ok tell know want need
""".split())


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Strip one common English suffix, keeping at least a 3-letter stem. Cached: vocabularies repeat."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, repl in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("edly", ""), ("ed", ""), ("ly", ""),
                         ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            if suffix == "es" and not word.endswith(("ches", "shes", "xes", "zes", "sses")):
                continue
            out = word[: len(word) - len(suffix)] + repl
            # "setting" -> "sett" -> "set": undouble a final consonant left by -ing/-ed.
            if suffix in ("ing", "ed") and len(out) >= 4 and out[-1] == out[-2] and out[-1] not in "lsz":
                out = out[:-1]
            return out
    return word


@dataclass(frozen=True, slots=True)
class Tokenizer:
    lowercase: bool = True
    stopwords: bool = True
    stem: bool = True

    def __call__(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text)
        if self.lowercase:
            text = text.lower()
        words = _WORD.findall(text)
        if "-" in text:
            words += [m.replace("-", "") for m in _COMPOUND.findall(text)]
        if self.stopwords:
            words = [w for w in words if w not in STOPWORDS]
        if self.stem:
            words = [stem(w) for w in words]
        return words
