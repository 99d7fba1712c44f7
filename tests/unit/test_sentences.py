"""server/generate/sentences.split_sentences: answers are spoken sentence by sentence."""

from __future__ import annotations

import pytest

from server.generate.sentences import split_sentences


def test_splits_on_terminal_punctuation() -> None:
    assert split_sentences("Stop the robot. Is it safe? Yes! Resume.") == [
        "Stop the robot.", "Is it safe?", "Yes!", "Resume."]


def test_strips_whitespace_and_handles_empty_text() -> None:
    assert split_sentences("  One.   Two.\n\nThree.  ") == ["One.", "Two.", "Three."]
    assert split_sentences("") == []
    assert split_sentences("   \n ") == []


def test_text_without_terminal_punctuation_is_one_sentence() -> None:
    assert split_sentences("hold the button for 10 seconds") == ["hold the button for 10 seconds"]


def test_no_split_before_a_lower_case_word() -> None:
    assert split_sentences("Open the app. then tap Add.") == ["Open the app. then tap Add."]


@pytest.mark.parametrize("text", [
    "Use a hub, e.g. the Lumo Echo Hub. Then pair the sensor.",
    "Some routers, i.e. Mesh ones, need a 2.4 GHz band. Then pair the sensor.",
    "It takes approx. 5 minutes to update. Then pair the sensor.",
    "See the guide, rev. C for details. Then pair the sensor.",
])
def test_abbreviations_do_not_end_a_sentence(text: str) -> None:
    first, second = split_sentences(text)
    assert second == "Then pair the sensor."
    assert text.startswith(first)


@pytest.mark.parametrize(("text", "expected"), [
    ("Use 2.4 GHz Wi-Fi. The 5 GHz band is not supported.", ["Use 2.4 GHz Wi-Fi.", "The 5 GHz band is not supported."]),
    ("Cap speed at 0.8 m/s. Resume at 1.2 m/s.", ["Cap speed at 0.8 m/s.", "Resume at 1.2 m/s."]),
    ("Firmware 3.14.2 fixes it. Update now.", ["Firmware 3.14.2 fixes it.", "Update now."]),
])
def test_decimals_do_not_end_a_sentence(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_sentence_may_start_with_a_digit_or_a_quote() -> None:
    assert split_sentences("Wait a moment. 60 seconds is enough.") == ["Wait a moment.", "60 seconds is enough."]
    assert split_sentences('Press Reset. "Done" appears on the screen.') == [
        "Press Reset.", '"Done" appears on the screen.']


def test_quote_after_the_full_stop_stays_outside() -> None:
    text = 'The ring turns blue and Lumo says "Hi, I\'m ready". Setup is finished.'
    assert split_sentences(text) == ['The ring turns blue and Lumo says "Hi, I\'m ready".', "Setup is finished."]


@pytest.mark.parametrize(("text", "expected"), [
    ('Lumo says "Hi, I\'m ready." Then it updates.', ['Lumo says "Hi, I\'m ready."', "Then it updates."]),
    ("Keep it 3 m away (about 10 ft.) Then pair it.", ["Keep it 3 m away (about 10 ft.)", "Then pair it."]),
])
def test_closing_quote_inside_the_full_stop_is_kept(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_no_text_is_lost_without_quotes() -> None:
    text = ("To factory reset a Lumo Smart Plug Mini, keep it plugged in. Press and hold the button, e.g. with a "
            "fingertip, for 10 seconds! The LED blinks red at 2.5 Hz. Is it done? Yes.")
    parts = split_sentences(text)
    assert len(parts) == 5
    assert " ".join(parts) == text
