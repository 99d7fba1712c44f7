"""The dense query/passage encoder: all-MiniLM-L6-v2 as one ONNX graph on onnxruntime + `tokenizers`.

The graph is exported once at build time (`make models`, see `export_encoder.py`) with mean pooling and
L2 normalisation inside it, so one `session.run` turns token ids into the sentence embedding; serving
needs neither torch nor transformers. The model folder holds:

    model.onnx      inputs input_ids, attention_mask, token_type_ids (int64, [batch, seq], padding on
                    the right: the fused attention kernel reads the mask as a length per row);
                    output sentence_embedding (float32, [batch, dim], unit length)
    tokenizer.json  the model's own WordPiece tokenizer, copied verbatim
    manifest.json   model id, source package and version, sha256 of both files, dim, max_length, opset

`OnnxEncoder.load` checks both sha256 sums against the manifest, so a half-copied or stale folder fails
at startup with the file named (`EncoderError`), never as silently wrong vectors.

Thread safety: `encode` and `encode_query` may be called from several threads at once (onnxruntime's
`run` is thread-safe and releases the GIL for the whole inference; the shared input buffers are
read-only).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from server.errors import FailedPrecondition

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
FIX = "run `make models` to rebuild it"

# Texts are tokenised this many at a time, then sorted by length inside the window so each batch pads
# only to its own longest member. A window bounds the memory of the held `Encoding`s when indexing a
# large corpus, while still grouping nearly all similar lengths together.
SORT_WINDOW = 4096


def _batches(order: npt.NDArray[np.intp], lengths: npt.NDArray[np.int64],
             batch_size: int) -> list[npt.NDArray[np.intp]]:
    """Cut `order` (indices sorted by descending length) into batches of at most `batch_size` rows,
    also starting a new batch when the next text is under half the batch's width. Cost is padded
    tokens (and attention is quadratic in width), so this bounds padding to 2x per row: three 256-token
    passages among short queries become their own batch instead of padding 29 queries to 256."""
    out = []
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or i - start == batch_size or 2 * lengths[order[i]] < lengths[order[start]]:
            out.append(order[start:i])
            start = i
    return out


class EncoderError(FailedPrecondition):
    """The exported encoder is missing, corrupt or does not match its manifest; the message names the
    file and the fix. A FAILED_PRECONDITION at the gRPC edge: the server is not set up for dense retrieval."""


@dataclass(frozen=True, slots=True)
class EncoderManifest:
    """What `export_encoder` wrote next to the graph (manifest.json)."""

    model_id: str
    dim: int
    max_length: int
    """The sequence length the model was trained with (sentence-transformers' max_seq_length)."""
    max_position: int
    """The hard limit of the position embeddings: no `max_length` may exceed it."""
    onnx_sha256: str
    tokenizer_sha256: str
    raw: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> EncoderManifest:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EncoderError(f"dense encoder manifest {path} is missing; {FIX}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EncoderError(f"dense encoder manifest {path} is unreadable ({exc}); {FIX}") from exc
        try:
            return cls(
                model_id=str(raw["model_id"]),
                dim=int(raw["dim"]),
                max_length=int(raw["max_length"]),
                max_position=int(raw.get("max_position", raw["max_length"])),
                onnx_sha256=str(raw["onnx"]["sha256"]),
                tokenizer_sha256=str(raw["tokenizer"]["sha256"]),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EncoderError(f"dense encoder manifest {path} lacks field {exc}; {FIX}") from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, expected: str, what: str) -> Path:
    if not path.is_file():
        raise EncoderError(f"dense encoder {what} {path} is missing; {FIX}")
    actual = sha256_file(path)
    if actual != expected:
        raise EncoderError(f"dense encoder {what} {path} is corrupt or stale (sha256 {actual[:12]}…, "
                           f"manifest says {expected[:12]}…); {FIX}")
    return path


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu on GPU nodes), always CPU as fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One request = one short run: parallelism inside the matmuls, none across graph branches (there
    # are none worth it in a 6-layer encoder, and a second pool would fight the first for 2 cores).
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_threads  # 0 = onnxruntime's default: one per physical core
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: the CPU build warns about every unused provider otherwise
    return so


class OnnxEncoder:
    """Sentence embeddings (float32, L2-normalised, `dim` wide) for queries and passages.

    Build with `OnnxEncoder.load(model_dir)`. `encode` is for indexing (length-sorted dynamic batches);
    `encode_query` is the per-request path (one run, no padding, no per-call allocation besides the ids).
    """

    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, manifest: EncoderManifest,
                 *, max_length: int, model_dir: Path, query_max_length: int | None = None) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self._manifest = manifest
        self._max_length = max_length
        self.model_dir = model_dir
        inputs = {i.name for i in session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - inputs
        if missing:
            raise EncoderError(f"dense encoder {model_dir / MODEL_FILE} has no input {sorted(missing)}; {FIX}")
        self._wants_token_types = "token_type_ids" in inputs
        # Queries get their own, shorter limit: spoken questions are a dozen tokens, and a pathological
        # 2,000-character query must not spend the whole retrieval budget in the encoder.
        self._query_tokenizer = tokenizer
        if query_max_length is not None and query_max_length < max_length:
            self._query_tokenizer = Tokenizer.from_str(tokenizer.to_str())
            self._query_tokenizer.enable_truncation(query_max_length)
        self._outputs = [OUTPUT_NAME]
        # Reused by every `encode_query`: a [1, L] slice of a [1, max_length] row is contiguous, so
        # onnxruntime takes it without a copy. Read-only, so concurrent callers can share them.
        self._ones = np.ones((1, max_length), dtype=np.int64)
        self._zeros = np.zeros((1, max_length), dtype=np.int64)
        self._ones.flags.writeable = False
        self._zeros.flags.writeable = False
        h = hashlib.sha256(f"{manifest.onnx_sha256}:{manifest.tokenizer_sha256}".encode())
        self._fingerprint = h.hexdigest()[:16]

    @classmethod
    def load(cls, model_dir: Path, *, max_length: int = 256, intra_op_threads: int = 0,
             providers: Sequence[str] | None = None, query_max_length: int | None = None) -> OnnxEncoder:
        """Open an exported encoder folder, verifying model.onnx and tokenizer.json against the manifest.

        max_length: token limit per text, special tokens included; longer texts are truncated (as
            sentence-transformers does). At most the model's position limit (512).
        intra_op_threads: onnxruntime threads per run; 0 = one per physical core.
        providers: onnxruntime execution providers in preference order; None = CUDA if available, CPU.
        Raises EncoderError naming the file and the fix when anything is missing or does not match.
        """
        model_dir = Path(model_dir)
        manifest = EncoderManifest.read(model_dir / MANIFEST_FILE)
        if not 1 <= max_length <= manifest.max_position:
            raise ValueError(f"max_length must be in 1..{manifest.max_position}, got {max_length}")
        if intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0 (0 = one per core), got {intra_op_threads}")
        model_path = _verified(model_dir / MODEL_FILE, manifest.onnx_sha256, "model")
        tokenizer_path = _verified(model_dir / TOKENIZER_FILE, manifest.tokenizer_sha256, "tokenizer")

        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed JSON
            raise EncoderError(f"dense encoder tokenizer {tokenizer_path} does not load ({exc}); {FIX}") from exc
        # The shipped tokenizer.json pads every text to a fixed 128 and truncates at 128; the model was
        # trained (and sentence-transformers runs it) at 256 with no padding beyond the batch's longest.
        # Leaving the file's settings in place is what makes a naive export disagree with PyTorch.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)

        chosen = list(providers) if providers is not None else default_providers()
        try:
            session = ort.InferenceSession(str(model_path), session_options(intra_op_threads), providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types, not one base
            raise EncoderError(f"dense encoder model {model_path} does not load in onnxruntime ({exc}); {FIX}") from exc
        return cls(session, tokenizer, manifest, max_length=max_length, model_dir=model_dir,
                   query_max_length=query_max_length)

    # -- identity ---------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._manifest.dim

    @property
    def model_id(self) -> str:
        return self._manifest.model_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def fingerprint(self) -> str:
        """Changes whenever the graph or the tokenizer does: cached vectors keyed on it stay valid."""
        return self._fingerprint

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually runs on."""
        return list(self._session.get_providers())

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._manifest.raw)

    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for `text` (special tokens included, after truncation)."""
        return len(self._tokenizer.encode(text).ids)

    # -- encoding ---------------------------------------------------------------------------------

    def encode_query(self, text: str) -> npt.NDArray[np.float32]:
        """One text -> one unit vector of shape (dim,). The latency path: a single run at the text's own
        length, shared mask buffers, no sorting or padding."""
        if not isinstance(text, str):
            raise TypeError(f"encode_query takes a str, got {type(text).__name__}")
        ids = self._query_tokenizer.encode(text).ids
        n = len(ids)
        feed = {"input_ids": np.array(ids, dtype=np.int64).reshape(1, n), "attention_mask": self._ones[:, :n]}
        if self._wants_token_types:
            feed["token_type_ids"] = self._zeros[:, :n]
        out: npt.NDArray[np.float32] = self._session.run(self._outputs, feed)[0][0]
        return out

    def encode(self, texts: Sequence[str], batch_size: int = 32,
               progress: bool = False) -> npt.NDArray[np.float32]:
        """Many texts -> (len(texts), dim) float32 unit vectors, row i for texts[i].

        Texts are sorted by token length (within windows of SORT_WINDOW) and batched so each batch pads
        only to its own longest text, at most twice a row's length; rows are written back in input
        order. Results match `encode_query` to float tolerance: padding is masked out of both
        attention and pooling.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts; use encode_query for one text")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        bar = None
        if progress and n:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="encoding", unit="text")
        try:
            for w0 in range(0, n, SORT_WINDOW):
                encodings = self._tokenizer.encode_batch(texts[w0:w0 + SORT_WINDOW])
                lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
                # Longest first: the biggest batch comes first, so a memory problem shows at once.
                order = np.argsort(-lengths, kind="stable")
                for rows in _batches(order, lengths, batch_size):
                    width = int(lengths[rows[0]])
                    ids = np.zeros((len(rows), width), dtype=np.int64)
                    mask = np.zeros((len(rows), width), dtype=np.int64)
                    for r, i in enumerate(rows):
                        k = int(lengths[i])
                        ids[r, :k] = encodings[i].ids
                        mask[r, :k] = 1
                    feed = {"input_ids": ids, "attention_mask": mask}
                    if self._wants_token_types:
                        feed["token_type_ids"] = np.zeros_like(ids)
                    out[w0 + rows] = self._session.run(self._outputs, feed)[0]
                    if bar is not None:
                        bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        return out
