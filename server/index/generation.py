"""One served snapshot and the writes applied on top of it: the state views are cut from.

A generation starts from a snapshot loaded from disk and lives until a swap replaces it. Everything a
published view reads is either immutable or append-only (rows, confidence factors, metadata masks,
the HNSW graph's rows): a write appends past every existing view's row count, and builds new small
objects (tombstone mask, delta segment tuple) for the next view. Only `apply` mutates, and only one
thread calls it at a time (LiveIndex's writer thread).

Row semantics, shared with the snapshot builder so a snapshot of a generation holds the same passages
in the same order: an upsert appends a new row per passage; if the id existed its old row becomes a
tombstone. A delete makes rows tombstones. Compaction (the builder) keeps live rows in row order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.bm25 import Bm25Matrix
from server.config import Config, FusionConfig
from server.index.delta import DeltaSegment, MainStats, add_segment, make_segment
from server.index.live_dense import LiveDense
from server.index.view import IndexView
from server.index.wal import WalRecord
from server.knowledge import FILTER_FIELDS, Passage
from server.retrieval.dense import HnswIndex
from server.retrieval.snapshot import Snapshot, SnapshotError
from server.retrieval.sparse import passage_index_text, tokenize_passages
from server.retrieval.text import Tokenizer

Mask = npt.NDArray[np.bool_]
GROWTH = 0.25


class AppendOnly:
    """A 1-d array that grows by appending; `array` is at least as long as what was appended. Rows below
    the current length never change, and a reallocation leaves old arrays (held by older views) intact."""

    def __init__(self, initial: npt.NDArray[Any]) -> None:
        self.array = initial
        self.n = int(initial.shape[0])

    def append(self, values: npt.NDArray[Any]) -> None:
        need = self.n + values.shape[0]
        if need > self.array.shape[0]:
            grown = np.zeros(need + math.ceil(need * GROWTH), dtype=self.array.dtype)
            grown[: self.n] = self.array[: self.n]
            self.array = grown
        self.array[self.n:need] = values
        self.n = need


@dataclass
class Applied:
    """What one write did (for the response and the deferred HNSW marks)."""

    inserted: int = 0
    replaced: int = 0
    deleted: int = 0
    died: npt.NDArray[np.int64] | None = None


class Generation:
    def __init__(self, snap: Snapshot, version: str, cfg: Config, tokenizer: Tokenizer, encoder: Any) -> None:
        rc = cfg.retrieval
        self.version = version
        self.path = snap.path
        self.manifest = snap.manifest
        self.tokenizer = tokenizer
        self.fusion: FusionConfig = rc.fusion
        self.encoder = encoder
        self.main: Bm25Matrix = snap.matrix
        self.main_vocab: dict[str, int] = snap.vocab
        self.idf_default = float(self.main.idf.max()) if self.main.idf.size else 1.0
        """Weight of a term the snapshot does not know (the extractive generator's idf lookup)."""
        self.rows: list[Passage] = list(snap.kb.passages)
        self.base_rows = len(self.rows)
        counts = snap.manifest.get("counts", {})
        if "tokens" in counts:
            avgdl = counts["tokens"] / max(1, counts["passages"])
        else:  # snapshots written before the token count was recorded: count once
            _, docs = tokenize_passages(self.rows, tokenizer, dict(self.main_vocab))
            avgdl = sum(map(len, docs)) / max(1, len(docs))
        bc = rc.bm25
        self.stats = MainStats.of(self.main, variant=bc.variant, k1=bc.k1, b=bc.b, epsilon=bc.epsilon, avgdl=avgdl)
        self.delta_vocab: dict[str, int] = {}
        """Terms the snapshot does not know, numbered from its vocabulary size. Append-only: a query
        may look up a term a later write added; the view's segments simply do not contain it."""
        w = self.confidence_weight = rc.confidence_weight
        self.factor: AppendOnly | None = None
        if rc.apply_confidence and w > 0:
            conf = np.array([p.confidence for p in self.rows], dtype=np.float32)
            self.factor = AppendOnly((1.0 - w) + w * conf)
        self.masks: dict[tuple[str, str], AppendOnly] = {}
        for f in FILTER_FIELDS:
            values = np.array([p.field_value(f) for p in self.rows], dtype=object)
            for v in sorted(set(values.tolist())):
                self.masks[(f, v)] = AppendOnly(values == v)
        self.dense: LiveDense | None = None
        if encoder is not None:
            if snap.embeddings is None or snap.hnsw_path is None:
                raise SnapshotError(f"{snap.path}: has no dense vectors, and this server runs dense retrieval "
                                    "(retrieval.dense.enabled); rebuild it with the encoder (no --no-dense)")
            dc = rc.dense
            index = HnswIndex.load(snap.hnsw_path, dim=snap.embeddings.shape[1], ef=dc.hnsw_ef,
                                   vectors=snap.embeddings)
            if len(index) != self.base_rows:
                raise SnapshotError(f"{snap.path}: hnsw.bin holds {len(index)} rows for {self.base_rows} passages")
            self.dense = LiveDense(index, add_chunk=cfg.index.hnsw_add_chunk)
        # Writer state (the writer thread's).
        self.row_of: dict[str, int] = dict(snap.kb.by_id)
        self.alive: Mask = np.ones(self.base_rows, dtype=bool)
        self.n_dead = 0
        self.segments: tuple[DeltaSegment, ...] = ()

    @property
    def n(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return self.n - self.n_dead

    def view(self, seq: int) -> IndexView:
        """The state after the last applied write, as an immutable view."""
        n = self.n
        return IndexView(
            gen=self, seq=seq, n=n, alive=self.alive if self.n_dead else None, n_dead=self.n_dead,
            segments=self.segments, masks={key: buf.array for key, buf in self.masks.items()},
            factor=self.factor.array if self.factor is not None else None)

    # -- writes ------------------------------------------------------------------------------------

    def apply(self, rec: WalRecord) -> Applied:
        if rec.op == "upsert":
            return self._upsert(rec)
        return self._delete(rec)

    def _upsert(self, rec: WalRecord) -> Applied:
        passages = list(rec.passages)
        m = len(passages)
        n0 = self.n
        if self.dense is not None:
            if rec.vectors is None or rec.vectors.shape[0] != m:
                raise ValueError(f"batch {rec.batch}: upsert without one vector per passage, and dense is on")
        alive = np.empty(n0 + m, dtype=bool)
        alive[:n0] = self.alive
        alive[n0:] = True
        out = Applied()
        died = []
        for i, p in enumerate(passages):
            old = self.row_of.get(p.id)
            if old is not None:
                if alive[old]:
                    alive[old] = False
                    died.append(old)
                out.replaced += 1
            else:
                out.inserted += 1
            self.row_of[p.id] = n0 + i
        # The graph first: a view that can see these rows must find them there.
        if self.dense is not None:
            assert rec.vectors is not None
            labels = self.dense.add(rec.vectors)
            if labels.shape[0] and int(labels[0]) != n0:
                raise RuntimeError(f"HNSW labels out of step with rows ({int(labels[0])} != {n0})")
        docs = self._term_ids(passages)
        n_terms = self.stats.n_terms + len(self.delta_vocab)
        segment = make_segment(n0, docs, n_terms, self.stats)
        self.segments = add_segment(self.segments, segment, n_terms, self.stats)
        self._append_row_data(passages)
        self.rows.extend(passages)
        self.alive = alive
        self.n_dead += len(died)
        out.died = np.asarray(died, dtype=np.int64)
        return out

    def _delete(self, rec: WalRecord) -> Applied:
        alive = self.alive.copy()
        died = []
        for pid in rec.ids:
            row = self.row_of.pop(pid, None)
            if row is not None and alive[row]:
                alive[row] = False
                died.append(row)
        self.alive = alive
        self.n_dead += len(died)
        return Applied(deleted=len(died), died=np.asarray(died, dtype=np.int64))

    def _term_ids(self, passages: list[Passage]) -> list[list[int]]:
        main, delta = self.main_vocab, self.delta_vocab
        base = self.stats.n_terms
        docs = []
        for p in passages:
            ids = []
            for t in self.tokenizer(passage_index_text(p)):
                i = main.get(t)
                if i is None:
                    i = delta.get(t)
                    if i is None:
                        i = delta[t] = base + len(delta)
                ids.append(i)
            docs.append(ids)
        return docs

    def _append_row_data(self, passages: list[Passage]) -> None:
        n0 = self.n
        if self.factor is not None:
            w = self.confidence_weight
            conf = np.array([p.confidence for p in passages], dtype=np.float32)
            self.factor.append((1.0 - w) + w * conf)
        for f in FILTER_FIELDS:
            values = np.array([p.field_value(f) for p in passages], dtype=object)
            for v in set(values.tolist()) - {v for (ff, v) in self.masks if ff == f}:
                self.masks[(f, v)] = AppendOnly(np.zeros(n0, dtype=bool))
            for (ff, v), buf in self.masks.items():
                if ff == f:
                    buf.append(values == v)
