"""Corpus embeddings cached on disk, keyed by content: same encoder + same texts = same file.

Encoding a few thousand abstracts takes minutes on a 2-core CPU; evaluation and index builds re-run
often with the same corpus, so the second run should not pay again. The key covers the encoder's
model hash, its max length and every text, so any change re-encodes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from server.config import REPO_ROOT
from server.retrieval.encoder import OnnxEncoder

DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "embeddings"


def content_key(encoder: OnnxEncoder, texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(f"{encoder.model_id}\0{encoder.fingerprint}\0{encoder.max_length}\0{len(texts)}\0".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def cached_embeddings(encoder: OnnxEncoder, texts: Sequence[str], *, cache_dir: Path | None = None,
                      batch_size: int = 32, progress: bool = False) -> npt.NDArray[np.float32]:
    folder = cache_dir or DEFAULT_CACHE_DIR
    path = folder / f"{content_key(encoder, texts)}.npy"
    if path.exists():
        vecs = np.load(path)
        if vecs.shape == (len(texts), encoder.dim):
            return vecs.astype(np.float32, copy=False)
    vecs = encoder.encode(list(texts), batch_size=batch_size, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, vecs)
    os.replace(tmp, path)  # a crashed run never leaves a half-written cache entry
    return vecs
