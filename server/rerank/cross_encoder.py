"""The ONNX cross-encoder: one relevance logit per (query, passage) pair, on onnxruntime + `tokenizers`.

Loads either of two folder layouts (`RerankConfig.model_dir`):

    ours (`snaprag train-reranker`)     model.onnx, model.int8.onnx, tokenizer.json, manifest.json
    any Hugging Face cross-encoder     model.onnx + tokenizer.json, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2
    exported to ONNX (optimum)          exported with `optimum-cli export onnx --task text-classification`

manifest.json, when present, must be `{"files": {name: sha256, ...}, ...}`: every listed file must
exist and match, so a half-copied or stale folder fails at startup with the file named. Without a
manifest the folder is taken as a generic export and nothing is checksummed.

The graph contract, read from the session rather than assumed:
- inputs `input_ids` and `attention_mask` (int64 or int32, [batch, seq]); `token_type_ids` is fed only
  when the graph has it (BERT-style models do, RoBERTa-style do not); any other input is refused;
- output: the one named `logits` when there is one, else the first. Its shape decides the head:
  (n,) or (n, 1): one relevance logit per pair (sentence-transformers' CrossEncoder, num_labels=1);
  (n, 2): a two-class softmax head, scored as logit[1] - logit[0], the positive class's log-odds, so
  that sigmoid(score) is the softmax probability of "relevant" exactly as for a one-logit head.

Pairs are encoded as the model was trained: `[CLS] query [SEP] passage [SEP]` (the tokenizer's own
pair template), truncated to `max_length` by cutting the passage only (`only_second`); a query too long
to leave the passage a single token falls back to `longest_first` for that pair. No fixed padding: each
ONNX run pads to its own longest pair, with pairs sorted by length so short ones ride together.

Every way the folder can be wrong (missing or corrupt model, tokenizer or manifest, unexpected inputs,
an output of the wrong shape, a `max_length` beyond the model's positions) raises `RerankerError` from
`CrossEncoder.load`, naming the file and the fix; a probe run at load makes sure of the last three.

Thread safety: `score` and friends may be called from several threads at once: onnxruntime's `run` is
thread-safe and releases the GIL, and the tokenizers are never reconfigured after `load`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from server.errors import FailedPrecondition
from server.retrieval.encoder import default_providers, session_options, sha256_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.int8.onnx"
"""Our default graph: dynamic INT8 (about 4x smaller, 1.5-2.5x faster on CPU than model.onnx)."""
FP32_MODEL_FILE = "model.onnx"
"""The FP32 graph; also the name optimum gives a generic export."""
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
FIX = ("retrain it with `snaprag train-reranker`, or re-export the cross-encoder to ONNX "
       "(model file + tokenizer.json), or point rerank.model_dir / rerank.model_file at a good copy")

REQUIRED_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)
LOGITS = "logits"
PAD_TOKENS = ("[PAD]", "<pad>")
_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}

# Text used by the load probe and `warm_up`; what matters is the token count, not the words.
_WARM_QUERY = "what does the blinking red light on the charging dock mean"
_WARM_WORDS = ("check the charger contacts on the dock and log the voltage before you restart the robot "
               "then wait until the light ring turns blue ").split()


class RerankerError(FailedPrecondition):
    """The cross-encoder folder is missing, corrupt, does not match its manifest, or is not a graph this
    server can run; the message names the file and the fix. FAILED_PRECONDITION at the gRPC edge: the
    server is not set up to rerank (the rerank stage is optional, so requests are served without it)."""


def _words(n: int) -> str:
    return " ".join(_WARM_WORDS[i % len(_WARM_WORDS)] for i in range(n))


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """manifest.json of `model_dir` (None when the folder has none), with its `files` map validated."""
    path = model_dir / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RerankerError(f"reranker manifest {path} is unreadable ({exc}); {FIX}") from exc
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise RerankerError(f"reranker manifest {path} has no `files` map of file name -> sha256; {FIX}")
    return raw


def verify_manifest(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists must exist in `model_dir` and have the listed sha256."""
    for name, expected in manifest["files"].items():
        path = model_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:  # symlinked files inside are fine
            raise RerankerError(f"reranker manifest {model_dir / MANIFEST_FILE} lists {name!r}, which is "
                                f"outside the folder; {FIX}")
        if not path.is_file():
            raise RerankerError(f"reranker file {path} is listed in {MANIFEST_FILE} but missing; {FIX}")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise RerankerError(f"reranker file {path} is corrupt or stale (sha256 {actual[:12]}…, "
                                f"{MANIFEST_FILE} says {expected[:12]}…); {FIX}")


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for malformed JSON
        raise RerankerError(f"reranker tokenizer {path} does not load ({exc}); {FIX}") from exc


def _pad_id(tok: Tokenizer) -> int:
    """The tokenizer's padding id, read before `_configured` drops its padding: from its own padding
    settings, else its [PAD]/<pad> token, else 0 (the value is masked out of attention either way; it
    only has to be a valid embedding row)."""
    if tok.padding:
        return int(tok.padding["pad_id"])
    for token in PAD_TOKENS:
        tid = tok.token_to_id(token)
        if tid is not None:
            return int(tid)
    return 0


def _configured(tok: Tokenizer, max_length: int, strategy: str) -> Tokenizer:
    # Exported tokenizer.json files often pad every text to a fixed length (MiniLM's: 128) and truncate
    # there: both would waste work or cut passages short. Padding is done per ONNX run instead.
    tok.no_padding()
    tok.enable_truncation(max_length, strategy=strategy)
    return tok


class CrossEncoder:
    """Relevance logits for (query, passage) pairs. Build with `CrossEncoder.load(model_dir)`.

    `score(query, passages)` is the per-request path; `warm_up()` belongs at startup, before the health
    service says SERVING, so the first request does not pay for arena allocation and kernel selection.
    """

    def __init__(self, session: ort.InferenceSession, pair_tokenizer: Tokenizer, longest_tokenizer: Tokenizer,
                 *, pad_id: int, max_length: int, model_path: Path, tokenizer_path: Path,
                 manifest: dict[str, Any] | None) -> None:
        self._session = session
        self._pair_tok = pair_tokenizer
        self._longest_tok = longest_tokenizer
        self._pad_id = pad_id
        self._max_length = max_length
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self._manifest = manifest

        inputs = {i.name: i.type for i in session.get_inputs()}
        missing = [n for n in REQUIRED_INPUTS if n not in inputs]
        unknown = sorted(set(inputs) - set(REQUIRED_INPUTS) - set(OPTIONAL_INPUTS))
        if missing or unknown:
            raise RerankerError(f"reranker model {model_path} has inputs {sorted(inputs)}; a cross-encoder needs "
                                f"{list(REQUIRED_INPUTS)} (+ optional {list(OPTIONAL_INPUTS)}) and nothing else; {FIX}")
        bad = {n: t for n, t in inputs.items() if t not in _DTYPES}
        if bad:
            raise RerankerError(f"reranker model {model_path} has non-integer token inputs {bad}; {FIX}")
        self._dtypes = {n: _DTYPES[t] for n, t in inputs.items()}
        self._wants_token_types = "token_type_ids" in inputs
        outputs = [o.name for o in session.get_outputs()]
        self._output = LOGITS if LOGITS in outputs else outputs[0]
        self._two_class = False  # set by the probe in `load`, once the output's width is known

    @classmethod
    def load(cls, model_dir: Path, *, model_file: str = MODEL_FILE, tokenizer_file: str = TOKENIZER_FILE,
             max_length: int = 256, intra_op_threads: int = 0,
             providers: Sequence[str] | None = None) -> CrossEncoder:
        """Open a cross-encoder folder, check it, and run one probe batch.

        model_file / tokenizer_file: names inside `model_dir` (`RerankConfig.model_file`, `.tokenizer_file`).
        max_length: token limit per pair, special tokens included; the passage is cut first. At most
            the model's position limit (512 for BERT/MiniLM): the probe runs a pair this long.
        intra_op_threads: onnxruntime threads per run; 0 = one per physical core.
        providers: onnxruntime execution providers in preference order; None = CUDA when this
            onnxruntime build has it, else CPU.
        Raises RerankerError naming the file and the fix when anything is missing, corrupt or unusable;
        ValueError for out-of-range arguments.
        """
        model_dir = Path(model_dir)
        if intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be >= 0 (0 = one per core), got {intra_op_threads}")
        if not model_dir.is_dir():
            raise RerankerError(f"reranker folder {model_dir} does not exist; {FIX}")
        manifest = read_manifest(model_dir)
        if manifest is not None:
            verify_manifest(model_dir, manifest)
            unlisted = [f for f in (model_file, tokenizer_file) if f not in manifest["files"]]
            if unlisted:
                log.warning("reranker manifest %s does not list %s: loaded unverified",
                            model_dir / MANIFEST_FILE, unlisted)
            trained = manifest.get("max_length")
            if isinstance(trained, int) and trained != max_length:
                log.warning("reranker %s was trained at max_length %d, served at %d (rerank.max_length)",
                            model_dir, trained, max_length)
        model_path = model_dir / model_file
        tokenizer_path = model_dir / tokenizer_file
        if not tokenizer_path.is_file():
            raise RerankerError(f"reranker tokenizer {tokenizer_path} is missing; {FIX}")
        if not model_path.is_file():
            raise RerankerError(f"reranker model {model_path} is missing; {FIX}")

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        raw_tok = _load_tokenizer(tokenizer_path)
        pad_id = _pad_id(raw_tok)
        pair_tok = _configured(raw_tok, max_length, "only_second")
        if max_length < pair_tok.num_special_tokens_to_add(True) + 2:
            raise ValueError(f"max_length must leave room for the special tokens and one token of each text, "
                             f"got {max_length}")
        longest_tok = _configured(_load_tokenizer(tokenizer_path), max_length, "longest_first")

        chosen = list(providers) if providers is not None else default_providers()
        try:
            session = ort.InferenceSession(str(model_path), session_options(intra_op_threads), providers=chosen)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types, not one base
            raise RerankerError(f"reranker model {model_path} does not load in onnxruntime ({exc}); {FIX}") from exc
        encoder = cls(session, pair_tok, longest_tok, pad_id=pad_id, max_length=max_length,
                      model_path=model_path, tokenizer_path=tokenizer_path, manifest=manifest)
        encoder._probe()
        return encoder

    def _probe(self) -> None:
        """One run of a short and a `max_length` pair together: proves the batch and sequence axes are
        dynamic, the positions reach `max_length`, and fixes the head from the output's width."""
        encs = self._encode(_WARM_QUERY, ["ok", _words(self._max_length)])
        try:
            raw = self._session.run([self._output], self._feed(encs))[0]
        except Exception as exc:
            raise RerankerError(
                f"reranker model {self.model_path} fails on a batch of 2 pairs up to {self._max_length} tokens "
                f"({exc}); lower rerank.max_length to the model's position limit, or re-export it with dynamic "
                f"batch and sequence axes") from exc
        shape = tuple(np.shape(raw))
        if shape not in ((2,), (2, 1), (2, 2)):
            raise RerankerError(f"reranker model {self.model_path} output {self._output!r} has shape {shape} for 2 "
                                f"pairs; a cross-encoder gives (n,), (n, 1) or (n, 2); {FIX}")
        self._two_class = shape == (2, 2)
        if not np.all(np.isfinite(self._head(raw))):
            raise RerankerError(f"reranker model {self.model_path} gives non-finite logits; {FIX}")

    # -- identity ---------------------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually runs on."""
        return list(self._session.get_providers())

    @property
    def two_class(self) -> bool:
        """True for an (n, 2) head, scored as logit[1] - logit[0]."""
        return self._two_class

    @property
    def output_name(self) -> str:
        return self._output

    @property
    def manifest(self) -> dict[str, Any] | None:
        """manifest.json as read (None for a generic export without one)."""
        return None if self._manifest is None else dict(self._manifest)

    # -- encoding ---------------------------------------------------------------------------------

    def _encode(self, query: str, passages: Sequence[str]) -> list[Encoding]:
        pairs = [(query, p) for p in passages]
        try:
            return list(self._pair_tok.encode_batch(pairs))
        except Exception:  # tokenizers raises a bare Exception when only_second cannot fit
            pass
        # The query alone leaves no room for some passage: those pairs (only) are cut longest-first.
        # Decided pair by pair, so a pair's tokens never depend on which other passages came with it.
        out = []
        for q, p in pairs:
            try:
                out.append(self._pair_tok.encode(q, p))
            except Exception:  # the same bare Exception
                out.append(self._longest_tok.encode(q, p))
        return out

    def encode_pairs(self, query: str, passages: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(token ids, token type ids) the model sees for each pair, after truncation, without padding."""
        _check(query, passages)
        return [(list(e.ids), list(e.type_ids)) for e in self._encode(query, passages)]

    def pair_count_tokens(self, query: str, passage: str) -> int:
        """Tokens the model sees for one pair (special tokens included, after truncation)."""
        _check(query, [passage])
        return len(self._encode(query, [passage])[0].ids)

    def _feed(self, encs: Sequence[Encoding]) -> dict[str, npt.NDArray[Any]]:
        """Right-padded to the longest pair in `encs` (dynamic padding); mask 0 on the padding."""
        width = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        types = np.zeros((len(encs), width), dtype=np.int64)
        for r, e in enumerate(encs):
            k = len(e.ids)
            ids[r, :k] = e.ids
            mask[r, :k] = 1
            types[r, :k] = e.type_ids
        feed = {"input_ids": ids, "attention_mask": mask}
        if self._wants_token_types:
            feed["token_type_ids"] = types
        return {name: (a if self._dtypes[name] is np.int64 else a.astype(self._dtypes[name]))
                for name, a in feed.items()}

    def _head(self, raw: Any) -> npt.NDArray[np.float32]:
        a = np.asarray(raw, dtype=np.float32)
        if self._two_class:
            return np.ascontiguousarray(a[:, 1] - a[:, 0])
        return a.reshape(-1)

    # -- scoring ----------------------------------------------------------------------------------

    def score(self, query: str, passages: Sequence[str], batch_size: int = 16) -> npt.NDArray[np.float32]:
        """One relevance logit per passage, float32, in input order (higher = more relevant;
        sigmoid(logit) is the model's probability that the passage answers the query).

        Pairs are sorted by token length and run `batch_size` at a time, each run padded to its own
        longest pair; the results do not depend on batch size or order beyond float rounding (~1e-6).
        An empty `passages` returns an empty array without running the model.
        """
        _check(query, passages)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(passages)
        out = np.empty(n, dtype=np.float32)
        if n == 0:
            return out
        encs = self._encode(query, passages)
        lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        for b0 in range(0, n, batch_size):
            rows = order[b0:b0 + batch_size]
            raw = self._session.run([self._output], self._feed([encs[i] for i in rows]))[0]
            out[rows] = self._head(raw)
        return out

    def warm_up(self, batch_size: int = 16) -> float:
        """Run single pairs of several lengths (16 tokens .. max_length), then a full batch at
        max_length (the largest arena a request can need), so allocation and kernel choice happen
        before the first request. Call at startup, before the health service says SERVING.

        Returns the measured ms per pair of one more full batch at half of `max_length`: a better first
        guess for `PairCost` on this machine than the configured prior."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for n in sorted({min(n, self._max_length) for n in (16, 64, 128, self._max_length)}):
            self.score(_WARM_QUERY, [_words(n)], batch_size=1)
        self.score(_WARM_QUERY, [_words(self._max_length)] * batch_size, batch_size=batch_size)
        passages = [_words(self._max_length // 2)] * batch_size
        t0 = time.perf_counter()
        self.score(_WARM_QUERY, passages, batch_size=batch_size)
        return (time.perf_counter() - t0) * 1000.0 / batch_size


def _check(query: str, passages: Sequence[str]) -> None:
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if isinstance(passages, str):
        raise TypeError("passages must be a sequence of str, not one str")
    for i, p in enumerate(passages):
        if not isinstance(p, str):
            raise TypeError(f"passages[{i}] is {type(p).__name__}, not str")
