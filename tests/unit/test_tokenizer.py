"""server/retrieval/text: the tokenizer shared by the index and the queries."""

from __future__ import annotations

import pytest

from server.retrieval.text import STOPWORDS, Tokenizer, stem

PLAIN = Tokenizer(stopwords=False, stem=False)


def test_nfkc_and_lowercase() -> None:
    assert PLAIN("ＲＥＳＥＴ Ｅ２０２") == ["reset", "e202"]  # full-width forms
    assert PLAIN("ﬁlter") == ["filter"]  # ligature
    assert PLAIN("cafe\u0301 CAFÉ") == ["café", "café"]  # combining accent composed, then case-folded
    assert PLAIN("Ⅳ ²") == ["iv", "2"]  # compatibility forms
    assert Tokenizer(lowercase=False, stopwords=False, stem=False)("Reset NOW") == ["Reset", "NOW"]


def test_splits_on_punctuation_and_underscores() -> None:
    assert PLAIN("reset, then: pair! (again?) x.y foo_bar 10/20") == [
        "reset", "then", "pair", "again", "x", "y", "foo", "bar", "10", "20"]
    assert PLAIN("  \t\n ") == [] and PLAIN("?!…") == []


def test_hyphenated_compounds_also_yield_the_joined_form() -> None:
    assert PLAIN("Wi-Fi drops on AMR-017") == ["wi", "fi", "drops", "on", "amr", "017", "wifi", "amr017"]
    assert "estop" in Tokenizer()("press the e-stop")


def test_stopwords_on_and_off() -> None:
    question = "How do I reset the plug, please?"
    assert Tokenizer()(question) == ["reset", "plug"]
    assert Tokenizer(stopwords=False)(question) == ["how", "do", "i", "reset", "the", "plug", "please"]
    assert {"how", "do", "i", "the", "what", "lumo"} <= STOPWORDS
    assert not {"reset", "plug", "wifi", "e202", "battery", "light"} & STOPWORDS


def test_stopwords_are_matched_after_lowercasing() -> None:
    assert Tokenizer()("HOW DO I RESET") == ["reset"]


@pytest.mark.parametrize(("word", "expected"), [
    ("resetting", "reset"),
    ("batteries", "battery"),
    ("lights", "light"),
    ("setting", "set"),
    ("running", "run"),
    ("plugged", "plug"),
    ("stopped", "stop"),
    ("falling", "fall"),  # a doubled l stays
    ("pressed", "press"),
    ("boxes", "box"),
    ("classes", "class"),
    ("quickly", "quick"),
    ("reset", "reset"),
    ("glass", "glass"),
    ("status", "status"),
    ("analysis", "analysis"),
])
def test_stem(word: str, expected: str) -> None:
    assert stem(word) == expected


@pytest.mark.parametrize("word", ["e202", "t2", "amr017", "fl20", "led", "bus", "gas", "is", "2.4"])
def test_stem_keeps_codes_and_short_words(word: str) -> None:
    assert stem(word) == word


def test_stemming_on_and_off() -> None:
    text = "Resetting the batteries: lights flashing on E202"
    assert Tokenizer()(text) == ["reset", "battery", "light", "flash", "e202"]
    assert Tokenizer(stem=False)(text) == ["resetting", "batteries", "lights", "flashing", "e202"]


def test_query_and_passage_forms_meet() -> None:
    tok = Tokenizer()
    assert set(tok("how do i reset my lights")) <= set(tok("Resetting the Lumo light strips"))


def test_deterministic() -> None:
    text = "Wi-Fi keeps dropping after resetting the Lumo Echo Hub; E202 on AMR-017."
    first = Tokenizer()(text)
    assert Tokenizer()(text) == first
    stem.cache_clear()
    assert Tokenizer()(text) == first
    assert Tokenizer() == Tokenizer() and hash(Tokenizer()) == hash(Tokenizer())
