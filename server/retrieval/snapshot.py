"""Index snapshots: one directory holding everything retrieval needs, with a manifest of checksums.

    <snapshot>/
      manifest.json     format version, counts, tokenizer + BM25 + HNSW settings, encoder id, sha256 per file
      passages.jsonl    the passages and their metadata, in index order
      vocab.json        BM25 term -> row
      bm25.npz          the CSR matrix (indptr, doc_ids, weights, idf)
      embeddings.npy    dense vectors (float32, L2-normalised), when built with an encoder
      hnsw.bin          the HNSW graph over them

A snapshot is written into a temporary sibling directory, fsynced, and renamed into place, so a crash
leaves either no snapshot or a complete one. Loading verifies every checksum and that the snapshot was
built with the tokenizer and encoder this server is configured with; anything else is refused with the
file or setting named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from kernels.bm25 import Bm25Matrix
from server.config import Config
from server.knowledge import KnowledgeBase, KnowledgeBaseError, Passage, load_corpus_records
from server.retrieval.sparse import bm25_matrix, passage_index_text, tokenize_passages
from server.retrieval.text import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class SnapshotError(ValueError):
    """A snapshot is missing, corrupt, or built with other settings; the message names what and the fix."""


@dataclass
class Snapshot:
    path: Path
    manifest: dict[str, Any]
    kb: KnowledgeBase
    vocab: dict[str, int]
    matrix: Bm25Matrix
    embeddings: npt.NDArray[np.float32] | None
    hnsw_path: Path | None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_settings(tok: Tokenizer) -> dict[str, Any]:
    return {"lowercase": tok.lowercase, "stopwords": tok.stopwords, "stem": tok.stem}


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so a rename or new entry inside it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_snapshot(out: Path, kb: KnowledgeBase, cfg: Config, tokenizer: Tokenizer, *, encoder: Any = None,
                   embeddings: npt.NDArray[np.float32] | None = None, force: bool = False,
                   log: Any = print, encoder_id: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                   hnsw_threads: int = 0, checkpoint: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the BM25 matrix (and the HNSW graph over `embeddings` when given) and write a snapshot.

    `encoder_id` stands in for `encoder` when only its identity is known (the index builder process
    re-packs vectors without loading the model). `extra` goes into the manifest as is (the index
    lifecycle's version, parent and write-ahead-log position). `checkpoint(stage)` is called after each
    step ("bm25", "embeddings", "hnsw", "manifest", "renamed"): progress reports, and crash injection
    in the tests.
    """
    step = checkpoint or (lambda _stage: None)
    if out.exists() and not force:
        raise SnapshotError(f"{out} already exists; pass --force to replace it")
    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        log(f"  bm25: indexing {len(kb)} passages")
        vocab, docs = tokenize_passages(kb.passages, tokenizer)
        matrix = bm25_matrix(docs, len(vocab), cfg.retrieval.bm25)
        tokens = sum(len(d) for d in docs)
        del docs
        lines = "".join(json.dumps(_passage_dict(p), ensure_ascii=False) + "\n" for p in kb.passages)
        _write(tmp / "passages.jsonl", lines.encode("utf-8"))
        _write(tmp / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
        with (tmp / "bm25.npz").open("wb") as fh:
            np.savez(fh, indptr=matrix.indptr, doc_ids=matrix.doc_ids, weights=matrix.weights, idf=matrix.idf)
            fh.flush()
            os.fsync(fh.fileno())
        step("bm25")
        dense: dict[str, Any] | None = None
        if embeddings is not None:
            from server.retrieval.dense import HnswIndex

            if embeddings.shape[0] != len(kb):
                raise SnapshotError(f"embeddings have {embeddings.shape[0]} rows for {len(kb)} passages")
            dc = cfg.retrieval.dense
            with (tmp / "embeddings.npy").open("wb") as fh:
                np.save(fh, embeddings.astype(np.float32, copy=False))
                fh.flush()
                os.fsync(fh.fileno())
            step("embeddings")
            log(f"  hnsw: building the graph (M={dc.hnsw_m}, ef_construction={dc.hnsw_ef_construction})")
            index = HnswIndex.build(embeddings, m=dc.hnsw_m, ef_construction=dc.hnsw_ef_construction, ef=dc.hnsw_ef,
                                    threads=hnsw_threads)
            index.save(tmp / "hnsw.bin")
            fsync_path(tmp / "hnsw.bin")
            step("hnsw")
            dense = {"dim": int(embeddings.shape[1]),
                     "encoder": encoder_id if encoder_id is not None else encoder_identity(encoder),
                     "hnsw": {"m": dc.hnsw_m, "ef_construction": dc.hnsw_ef_construction}}
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # tokens: the BM25 length statistics (avgdl = tokens / passages) the live index's delta segment
            # scores with, so they need not be recomputed from the text.
            "counts": {"passages": len(kb), "terms": len(vocab), "postings": int(matrix.doc_ids.shape[0]),
                       "tokens": tokens},
            "tokenizer": tokenizer_settings(tokenizer),
            "bm25": dataclasses.asdict(cfg.retrieval.bm25),
            "dense": dense,
            "files": files,
            **(extra or {}),
        }
        _write(tmp / MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
        fsync_path(tmp)
        step("manifest")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        fsync_path(out.parent)
        step("renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  wrote {out} in {time.perf_counter() - t0:.1f} s")
    return manifest


def encoder_identity(encoder: Any) -> dict[str, Any] | None:
    if encoder is None:
        return None
    return {"model_id": encoder.model_id, "fingerprint": encoder.fingerprint, "max_length": encoder.max_length}


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.exists():
        raise SnapshotError(f"{path}: no {MANIFEST}; not a snapshot (build one with `snaprag index build`)")
    try:
        manifest: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{mpath}: corrupt manifest ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{mpath}: format_version {manifest.get('format_version')!r}, this server reads "
                            f"{FORMAT_VERSION}; rebuild the snapshot with this version")
    return manifest


def verify_snapshot(path: Path) -> dict[str, Any]:
    """Checksums of every file named in the manifest. Returns the manifest."""
    manifest = read_manifest(path)
    files = manifest.get("files") or {}
    for name, digest in files.items():
        f = path / name
        if not f.exists():
            raise SnapshotError(f"{f}: missing (named in the manifest); the snapshot is incomplete, rebuild it")
        if sha256_file(f) != digest:
            raise SnapshotError(f"{f}: sha256 does not match the manifest; the file is corrupt, rebuild the snapshot")
    for required in ("passages.jsonl", "vocab.json", "bm25.npz"):
        if required not in files:
            raise SnapshotError(f"{path}: manifest lists no {required}")
    return manifest


def load_snapshot(path: Path, tokenizer: Tokenizer, *, encoder: Any = None) -> Snapshot:
    manifest = verify_snapshot(path)
    if manifest["tokenizer"] != tokenizer_settings(tokenizer):
        raise SnapshotError(f"{path}: built with tokenizer {manifest['tokenizer']}, the server is configured with "
                            f"{tokenizer_settings(tokenizer)}; rebuild the snapshot or change retrieval.tokenizer")
    try:
        kb = KnowledgeBase()
        for p in load_corpus_records(path / "passages.jsonl"):
            kb.by_id[p.id] = len(kb.passages)
            kb.passages.append(p)
    except KnowledgeBaseError as e:
        raise SnapshotError(f"{path}: {e}") from e
    if len(kb) != manifest["counts"]["passages"]:
        raise SnapshotError(f"{path}: {len(kb)} passages, the manifest says {manifest['counts']['passages']}")
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    with np.load(path / "bm25.npz") as z:
        matrix = Bm25Matrix(indptr=z["indptr"], doc_ids=z["doc_ids"], weights=z["weights"], idf=z["idf"],
                            n_docs=len(kb))
    embeddings = None
    hnsw_path = None
    dense = manifest.get("dense")
    if dense and encoder is not None:
        built = dense.get("encoder") or {}
        now = encoder_identity(encoder) or {}
        if built.get("fingerprint") != now.get("fingerprint"):
            raise SnapshotError(f"{path}: dense vectors were made by encoder {built.get('model_id')} "
                                f"({str(built.get('fingerprint'))[:12]}), the server runs {now.get('model_id')} "
                                f"({str(now.get('fingerprint'))[:12]}); rebuild the snapshot")
        embeddings = np.load(path / "embeddings.npy")
        hnsw_path = path / "hnsw.bin"
    return Snapshot(path, manifest, kb, vocab, matrix, embeddings, hnsw_path)


def _passage_dict(p: Passage) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["steps"] = [dict(s) for s in p.steps]
    if not d["steps"]:
        del d["steps"]
    if not d["fault_code"]:
        del d["fault_code"]
    return d


def index_texts(kb: KnowledgeBase) -> list[str]:
    """What the dense encoder embeds for each passage (the same text BM25 indexes)."""
    return [passage_index_text(p) for p in kb.passages]
