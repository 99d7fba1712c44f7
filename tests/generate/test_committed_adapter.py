"""The committed voice LoRA adapter (data/models/lora-voice) is intact and fits the SmolLM2 base.

Loading it needs the converted SmolLM2 (`make llm`, not part of `make test`); these checks catch a
corrupted, truncated or mismatched adapter without it: every file matches the manifest's sha256, and
every LoRA matrix has SmolLM2-135M's shapes (hidden 576, 30 layers, 9 query / 3 key-value heads of 64).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from safetensors import safe_open

ADAPTER = Path(__file__).resolve().parents[2] / "data/models/lora-voice"
HIDDEN, LAYERS, KV_DIM = 576, 30, 3 * 64


def test_files_match_the_manifest() -> None:
    manifest = json.loads((ADAPTER / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["files"]) >= {"adapter_config.json", "adapter_model.safetensors", "MODEL_CARD.md"}
    for name, sha in manifest["files"].items():
        assert hashlib.sha256((ADAPTER / name).read_bytes()).hexdigest() == sha, f"{name} differs from its manifest"
    assert manifest["base"]["hidden_size"] == HIDDEN and manifest["base"]["layers"] == LAYERS


def test_lora_matrices_fit_smollm2() -> None:
    cfg = json.loads((ADAPTER / "adapter_config.json").read_text(encoding="utf-8"))
    r = cfg["r"]
    assert cfg["peft_type"] == "LORA" and set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    out_dim = {"q_proj": HIDDEN, "k_proj": KV_DIM, "v_proj": KV_DIM, "o_proj": HIDDEN}
    layers = set()
    with safe_open(str(ADAPTER / "adapter_model.safetensors"), framework="numpy") as f:
        keys = list(f.keys())
        for key in keys:
            m = re.search(r"layers\.(\d+)\.self_attn\.(\w_proj)\.lora_([AB])\.weight$", key)
            assert m, f"unexpected tensor {key}"
            layer, proj, ab = int(m[1]), m[2], m[3]
            layers.add(layer)
            shape = tuple(f.get_slice(key).get_shape())
            assert shape == ((r, HIDDEN) if ab == "A" else (out_dim[proj], r)), (key, shape)
    assert layers == set(range(LAYERS)) and len(keys) == LAYERS * 4 * 2
