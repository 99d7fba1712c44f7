"""A tiny, deterministic Llama model, tokenizer and LoRA adapter for the generation tests.

    python -m tests.generate.tiny_llama OUT_DIR     # builds OUT_DIR/model and OUT_DIR/adapter-voice

Everything is made here, offline, with fixed seeds: a byte-level BPE tokenizer trained on the KB
passages, a 2-layer LlamaForCausalLM with random weights and a peft LoRA adapter with random weights.
The model says nothing sensible, but it is the real architecture, so vLLM serves it exactly as it would
SmolLM2, and greedy decoding is reproducible token for token against transformers + peft.

Shape choices, and why:
* head_dim 64 (hidden 128, 2 heads): vLLM's CPU attention only supports some head sizes.
* float32 weights: vLLM on CPU and transformers then compute the same logits to ~1e-6, so greedy
  tokens agree; a wider initializer spreads the logits so near-ties (where rounding could flip the
  argmax) are rare.
* the tokenizer is trained on ASCII-folded text with printable ASCII (not all 256 bytes) as its
  initial alphabet, so every token is whole ASCII text: any token sequence decodes to the same text
  streamed or at once, and JSON's punctuation exists for structured output.
* the special tokens' output rows are zeroed, so the model (almost) never ends early or emits them:
  streams run to max_tokens, which the chunking and cancel tests need.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
KB_PASSAGES = sorted((ROOT / "data/kb").glob("*/passages*.jsonl"))
VOCAB_SIZE = 800
ADAPTER_NAME = "voice"
# Long enough that a request of a few thousand tokens cannot finish before a test closes it (the model
# decodes hundreds of tokens a second); RoPE has no per-position weights, so it costs nothing.
CONTEXT = 4096
# Bump when the recipe changes, so a cached build is never mistaken for the new one.
RECIPE = "tiny-llama-v3"
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Plain role markers: the model's chat template (what vLLM's chat API applies).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True, slots=True)
class TinyLlama:
    model_dir: Path
    adapter_dir: Path
    adapter_name: str = ADAPTER_NAME


def build_tiny_llama(out: Path) -> TinyLlama:
    """Build (or reuse, when `out` already holds this recipe's build) the model and the adapter."""
    out = Path(out)
    built = TinyLlama(model_dir=out / "model", adapter_dir=out / f"adapter-{ADAPTER_NAME}")
    stamp = out / "RECIPE"
    if stamp.exists() and stamp.read_text() == RECIPE:
        return built
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(built.model_dir)
    model = _build_model(tokenizer)
    model.save_pretrained(built.model_dir, safe_serialization=True)
    _build_adapter(model, built.adapter_dir)
    stamp.write_text(RECIPE)
    return built


def _corpus() -> list[str]:
    texts = []
    for path in KB_PASSAGES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                text = unicodedata.normalize("NFKD", json.loads(line)["text"])
                texts.append(text.encode("ascii", "ignore").decode("ascii"))
    if not texts:
        raise RuntimeError(f"no KB passages under {ROOT / 'data/kb'} to train the tiny tokenizer on")
    return texts


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Every printable ASCII character, seen in the KB or not: structured output needs `{`, `}` and `"`.
    # (Byte-level BPE spells bytes 33..126 as themselves, and space, newline, tab as Ġ, Ċ, ĉ.)
    alphabet = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a", "\u0109"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, BOS, EOS], initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # The prompt gets a BOS, as Llama tokenizers do; vLLM and the reference both tokenize through this.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                      special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE,
                                   model_max_length=CONTEXT)


def _build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
        initializer_range=0.08, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for token_id in tokenizer.all_special_ids:
            model.lm_head.weight[token_id].zero_()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def _build_adapter(model, adapter_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4321)
    # init_lora_weights=False: random A and B (peft's default B=0 would make the adapter a no-op).
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                      "down_proj"])
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    # get_peft_model wraps the base model's modules in place; undo it so `model` stays the base.
    peft_model.unload()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m tests.generate.tiny_llama OUT_DIR\n{__doc__}")
    built = build_tiny_llama(Path(sys.argv[1]))
    print(f"model:   {built.model_dir}\nadapter: {built.adapter_dir} (name {built.adapter_name!r})")
