"""train-lora's pieces on the tiny random Llama: grounded targets with citations, answer-only loss
masking, a few training steps whose adapter folder loads in peft and in the local backend, and the
grounded-answer scoring. (The real SmolLM2 run is `snaprag train-lora`; its card holds the numbers.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from server.config import LocalConfig  # noqa: E402
from server.generate import train_lora as tl  # noqa: E402
from server.generate.backend import ChatMessage, DecodeLimits, Prompt  # noqa: E402
from server.knowledge import GoldenQuestion, Passage  # noqa: E402
from server.retrieval.sparse import Hit  # noqa: E402
from tests.generate.tiny_llama import TinyLlama, build_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyLlama:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _hit(pid: str, text: str) -> Hit:
    return Hit(Passage(pid, text, "device_setup", "home", "en-US", 1.0, "Guide"), 1.0)


@dataclass
class _Chosen:
    passage_rank: int
    text: str


class _Extractive:
    """Stands in for ExtractiveGenerator.select: the first sentence of each passage, nothing for 'none'."""

    def select(self, request: Any) -> list[_Chosen]:
        if "none" in request.question:
            return []
        return [_Chosen(i, h.passage.text.split(". ")[0].rstrip(".") + ".") for i, h in enumerate(request.passages[:2])]


def _prompt(question: str, hits: Any) -> Prompt:
    passages = "\n".join(f"[{i + 1}] {h.passage.text}" for i, h in enumerate(hits))
    return Prompt((ChatMessage("system", "Answer from the passages."),
                   ChatMessage("user", f"Passages:\n{passages}\n\nQuestion: {question}")))


def test_cite_puts_the_marker_inside_the_sentence() -> None:
    assert tl.cite("Hold it for 10 seconds.", 1) == "Hold it for 10 seconds [1]."
    assert tl.cite("Is it on?", 2) == "Is it on [2]?"
    assert tl.cite("No stop", 3) == "No stop [3]."


def test_build_examples_skips_questions_without_an_extractive_answer() -> None:
    hits = [_hit("p1", "Hold the reset button for ten seconds. Then wait."), _hit("p2", "The light blinks red.")]
    golden = [GoldenQuestion("q1", "how do i reset", ("p1",)), GoldenQuestion("q2", "none of that", ("p2",))]
    examples, skipped = tl.build_examples(golden, lambda q, k: hits[:k], _Extractive(), _prompt, k=2,
                                          max_sentences=3)
    assert skipped == 1 and [e.qid for e in examples] == ["q1"]
    assert examples[0].answer == "Hold the reset button for ten seconds [1]. The light blinks red [2]."
    evaluation, _ = tl.build_examples(golden, lambda q, k: hits[:k], _Extractive(), _prompt, k=2,
                                      max_sentences=3, with_answers=False)
    assert len(evaluation) == 2 and all(e.answer == "" for e in evaluation)


def test_encode_example_masks_the_prompt_and_ends_with_eos(tiny: TinyLlama) -> None:
    from transformers import AutoTokenizer

    from server.generate.local import render_chat

    tok = AutoTokenizer.from_pretrained(str(tiny.model_dir), local_files_only=True)
    hits = (_hit("p1", "Hold the reset button for ten seconds."),)
    ex = tl.QaExample("q1", "how do i reset", hits, _prompt("how do i reset", hits), "Hold the button [1].")
    encoded = tl.encode_example(tok, ex, max_length=512)
    assert encoded is not None
    ids, labels = encoded
    n_prompt = len(render_chat(tok, ex.prompt))
    assert ids[:n_prompt] == render_chat(tok, ex.prompt)  # exactly what the local backend feeds
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == "Hold the button [1]."
    assert tl.encode_example(tok, ex, max_length=n_prompt) is None


def test_eval_sample_is_seeded_and_in_order() -> None:
    golden = [GoldenQuestion(f"q{i}", f"question {i}", ()) for i in range(50)]
    a, b = tl.eval_sample(golden, 10, seed=3), tl.eval_sample(golden, 10, seed=3)
    assert a == b and len(a) == 10 and [g.id for g in a] == sorted((g.id for g in a), key=lambda s: int(s[1:]))
    assert tl.eval_sample(golden, 0, seed=3) == golden


def test_grounded_scores_count_spoken_sentences() -> None:
    class Checker:
        def check(self, sentence: str, passages: Any) -> Any:
            return type("S", (), {"supported": "bad" not in sentence.lower()})()

    ex = tl.QaExample("q", "q", (), Prompt(()), "")
    scores = tl.grounded_scores(["Good one [1]. Bad one. Good two [2]. Bad four.", ""], [ex, ex], Checker(),
                                max_sentences=3)
    # 3 spoken sentences (the 4th is never spoken): 2 of 3 supported; the empty answer scores 0.
    assert scores["grounded_rate"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-4)
    assert scores["fully_grounded"] == 0.0 and scores["cites_passage"] == 0.5


async def test_a_few_steps_write_an_adapter_peft_and_the_local_backend_load(tiny: TinyLlama, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.generate.local import LocalBackend

    settings = tl.LoraSettings(rank=4, alpha=8, steps=4, accumulation=2, lr=1e-2, threads=1)
    model, tok = tl.load_base(tiny.model_dir, settings)
    model = tl.attach_lora(model, settings)
    hits = (_hit("p1", "Hold the reset button for ten seconds."),)
    ex = tl.QaExample("q1", "how do i reset", hits, _prompt("how do i reset", hits), "Hold the reset button [1].")
    encoded = [tl.encode_example(tok, ex, 512)]
    stats = tl.train_adapter(model, encoded, settings, deadline=float("inf"), log=lambda _: None)
    assert stats.steps_done == 4 and stats.examples_seen == 8 and stats.losses[-1] < stats.losses[0]

    out = tmp_path / "lora"
    model.save_pretrained(str(out), safe_serialization=True)
    tl._verify_adapter_files(out)
    assert json.loads((out / tl.ADAPTER_CONFIG).read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), local_files_only=True)
    PeftModel.from_pretrained(base, str(out))

    backend = LocalBackend(LocalConfig(model_dir=str(tiny.model_dir), device="cpu", threads=1,
                                       adapters=[f"trained={out}"]), Path)
    await backend.start()
    try:
        text = "".join([d.text async for d in backend.stream(ex.prompt, DecodeLimits(max_tokens=8), model="",
                                                             adapter="trained")])
        want, _ = tl.generate_answer(model, tok, ex, adapter=True, max_new_tokens=8, max_sentences=3, device="cpu")
        assert text.strip() == want
    finally:
        await backend.close()


def test_batched_evaluation_answers_equal_one_at_a_time(tiny: TinyLlama) -> None:
    """The evaluation decodes left-padded batches; padding must not change a greedy answer."""
    settings = tl.LoraSettings(threads=1)
    model, tok = tl.load_base(tiny.model_dir, settings)
    questions = ["reset", "how do i reset the plug after a power cut", "what does a slow red pulse mean on the bulb"]
    examples = []
    for i, q in enumerate(questions):
        hits = (_hit(f"p{i}", "Hold the reset button for ten seconds. " * (i + 1)),)
        examples.append(tl.QaExample(f"q{i}", q, hits, _prompt(q, hits), ""))
    batched = tl.generate_answers(model, tok, examples, adapter=False, max_new_tokens=10, max_sentences=3,
                                  device="cpu")
    single = [tl.generate_answer(model, tok, ex, adapter=False, max_new_tokens=10, max_sentences=3, device="cpu")
              for ex in examples]
    assert batched == single
