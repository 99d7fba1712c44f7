"""server/generate/extractive: the model-free generator speaks the sentences that answer the question,
with the citation marker of the passage each comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Bm25Config
from server.generate.base import AnswerPiece, GenerationRequest
from server.generate.extractive import ExtractiveGenerator, idf_lookup
from server.generate.sentences import split_sentences
from server.knowledge import KnowledgeBase, Passage, load_knowledge_base
from server.retrieval.sparse import Hit, SparseRetriever
from server.retrieval.text import Tokenizer

REPO = Path(__file__).resolve().parents[2]

RESET_SENTENCE = "To factory reset it, press and hold the button for 10 seconds until the LED blinks red."
PASSAGES = [
    Passage("home-plug-reset", "The Lumo Smart Plug Mini has one button on its side. " + RESET_SENTENCE
            + " A reset erases schedules and Wi-Fi details.", "troubleshooting", "smart_home", "en-US", 0.9,
            "Lumo Smart Plug Mini — User Guide"),
    Passage("home-thermo-schedule", "The Lumo Thermostat follows a weekly schedule. Open the app and tap "
            "Schedule to change it. Eco mode lowers the target by 2 degrees while you are away.", "climate",
            "smart_home", "en-US", 0.8, "Lumo Thermostat — User Guide"),
    Passage("home-plug-energy", "The Lumo Smart Plug Mini measures energy use. Open Devices > Smart Plug Mini > "
            "Energy to see daily totals. Energy history is kept for 12 months.", "device_setup", "smart_home",
            "en-US", 0.7, "Lumo Smart Plug Mini — User Guide"),
]


def build(passages: list[Passage]) -> tuple[SparseRetriever, ExtractiveGenerator]:
    kb = KnowledgeBase(passages=list(passages), by_id={p.id: i for i, p in enumerate(passages)})
    tokenizer = Tokenizer()
    retriever = SparseRetriever(kb, tokenizer, Bm25Config(), apply_confidence=True)
    generator = ExtractiveGenerator(tokenizer, idf_lookup(retriever.vocab, retriever.matrix.idf.tolist()))
    return retriever, generator


@pytest.fixture(scope="module")
def small() -> tuple[SparseRetriever, ExtractiveGenerator]:
    return build(PASSAGES)


async def answer(generator: ExtractiveGenerator, request: GenerationRequest) -> list[AnswerPiece]:
    return [piece async for piece in generator.stream(request)]


def assert_cited(pieces: list[AnswerPiece], hits: list[Hit]) -> None:
    """Every spoken sentence is a sentence of the one passage its marker points to."""
    for piece in pieces:
        (marker,) = piece.markers
        assert 1 <= marker <= len(hits)
        assert piece.text in split_sentences(hits[marker - 1].passage.text)


async def test_picks_the_sentence_that_answers(small) -> None:  # type: ignore[no-untyped-def]
    retriever, generator = small
    question = "how long do i hold the button to factory reset the plug"
    hits = retriever.search(question, 3)
    assert hits[0].passage.id == "home-plug-reset"
    pieces = await answer(generator, GenerationRequest(question, hits, max_sentences=1))
    assert pieces == [AnswerPiece(RESET_SENTENCE, (1,))]


async def test_cites_the_marker_of_the_passage_it_speaks_from(small) -> None:  # type: ignore[no-untyped-def]
    _, generator = small
    # The answering passage ranked second: its sentence carries marker 2, and the off-topic first passage
    # contributes nothing.
    hits = [Hit(PASSAGES[1], 5.0), Hit(PASSAGES[0], 4.0)]
    pieces = await answer(generator, GenerationRequest("factory reset button hold", hits, max_sentences=3))
    assert pieces and all(p.markers == (2,) for p in pieces)
    assert RESET_SENTENCE in [p.text for p in pieces]
    assert_cited(pieces, hits)


@pytest.mark.parametrize("max_sentences", [1, 2, 3])
async def test_respects_max_sentences(small, max_sentences: int) -> None:  # type: ignore[no-untyped-def]
    retriever, generator = small
    question = "factory reset the smart plug button schedules wifi energy"
    hits = retriever.search(question, 3)
    pieces = await answer(generator, GenerationRequest(question, hits, max_sentences=max_sentences))
    assert len(pieces) == max_sentences  # enough supported sentences exist for 3
    assert_cited(pieces, hits)


async def test_sentences_are_spoken_in_passage_order(small) -> None:  # type: ignore[no-untyped-def]
    retriever, generator = small
    question = "plug button factory reset erases schedules wifi"
    hits = retriever.search(question, 3)
    chosen = generator.select(GenerationRequest(question, hits, max_sentences=3))
    assert len(chosen) >= 2
    keys = [(c.passage_rank, c.position) for c in chosen]
    assert keys == sorted(keys)


@pytest.mark.parametrize("question", ["how do i do it", "what is this", "  ", "zebra giraffe"])
async def test_nothing_for_a_query_without_matching_content_words(small, question: str) -> None:  # type: ignore[no-untyped-def]
    _, generator = small
    hits = [Hit(p, 1.0) for p in PASSAGES]
    request = GenerationRequest(question, hits, max_sentences=3)
    assert generator.select(request) == []
    assert await answer(generator, request) == []


async def test_no_passages_no_answer(small) -> None:  # type: ignore[no-untyped-def]
    _, generator = small
    assert await answer(generator, GenerationRequest("factory reset the plug", [], max_sentences=3)) == []


def test_sources_are_numbered_in_rank_order_and_capped(small) -> None:  # type: ignore[no-untyped-def]
    _, generator = small
    hits = [Hit(p, 1.0) for p in [*PASSAGES, PASSAGES[0]]]
    sources = generator.sources(GenerationRequest("q", hits))
    assert [s.marker for s in sources] == [1, 2, 3]  # max_passages = 3
    assert [s.passage_id for s in sources] == [p.id for p in PASSAGES]
    assert sources[0].snippet == "The Lumo Smart Plug Mini has one button on its side."
    assert sources[0].source == "Lumo Smart Plug Mini — User Guide"


def test_idf_lookup_defaults_unknown_terms_to_the_largest_idf() -> None:
    lookup = idf_lookup({"a": 0, "b": 1}, [0.5, 2.0])
    assert lookup("a") == 0.5 and lookup("b") == 2.0 and lookup("zzz") == 2.0
    assert idf_lookup({}, [])("x") == 1.0


async def test_real_kb_factory_reset_smart_plug() -> None:
    kb = load_knowledge_base([REPO / "data/kb/voice", REPO / "data/kb/warehouse"])
    retriever, generator = build(kb.passages)
    question = "how do i factory reset the smart plug"
    hits = retriever.search(question, 3)
    request = GenerationRequest(question, hits, max_sentences=3)
    pieces = await answer(generator, request)
    assert 1 <= len(pieces) <= 3
    first = pieces[0]
    assert first.markers == (1,)
    assert "factory reset" in first.text.lower() and "smart plug" in first.text.lower()
    assert "hold" in first.text.lower()  # the how, not just the topic
    assert_cited(pieces, hits)
    assert generator.sources(request)[0].passage_id == hits[0].passage.id
