"""Small synthetic corpora and a deterministic stand-in encoder, so live-index tests run in seconds.

The stand-in encoder hashes words into 32-d vectors (bag of words, signed): similar texts get similar
vectors, nothing is downloaded or run through ONNX, and the builder process never needs it (it re-packs
the vectors the server computed). Tests that need the real MiniLM path use the session runtime's encoder.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.config import Config, load_config
from server.index.live import LiveIndex
from server.knowledge import Passage
from server.retrieval.text import Tokenizer
from tests.conftest import NO_DELAY_SHEDDING

ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
SYLLABLES = ["ka", "lo", "mi", "ru", "te", "zo", "pa", "ne", "vi", "su"]
TOPICS = ["thermostat heating schedule", "forklift pallet fault", "camera night vision", "charger battery dock",
          "speaker volume pairing", "robot lidar obstacle", "doorbell chime wiring", "conveyor belt jam"]


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def word(i: int) -> str:
    """A made-up word unique to passage i (letters only, so the stemmer leaves it alone)."""
    return "".join(SYLLABLES[(i // 10 ** d) % 10] for d in range(4)) + "q"


def passage(i: int, *, text: str | None = None, pid: str | None = None, **fields: Any) -> dict[str, Any]:
    topic = TOPICS[i % len(TOPICS)]
    return {"id": pid or f"doc-{i:05d}", "text": text or f"{word(i)} guide for the {topic}: step {i} explains it.",
            "intent": ["setup", "fix"][i % 2], "domain": ["home", "warehouse"][i % 2 == 0 and i % 3 == 0],
            "locale": "en-US", "confidence": 0.9, "source": f"Manual {i % 5}", **fields}


class FakeEncoder:
    model_id = "fake-bow-32"
    fingerprint = "fake0000bow32000"
    max_length = 256
    dim = 32

    def __init__(self) -> None:
        self._tok = Tokenizer()

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for t in self._tok(text) or ["empty"]:
            h = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
            v[h % self.dim] += 1.0 if (h >> 8) & 1 else -1.0
        if not v.any():
            v[0] = 1.0
        return v / np.linalg.norm(v)

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        return np.stack([self._vec(t) for t in texts]) if texts else np.empty((0, self.dim), np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        return self._vec(text)


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


def write_corpus(folder: Path, n: int, *, golden: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "passages.jsonl").write_text("".join(json.dumps(passage(i)) + "\n" for i in range(n)))
    qs = [{"id": f"q{i}", "question": f"{word(i)} {TOPICS[i % len(TOPICS)]}", "relevant": [f"doc-{i:05d}"]}
          for i in range(0, n, max(1, n // golden))]
    (folder / "golden_dev.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    return folder


def live_config(tmp: Path, n: int = 120, **overrides: Any) -> Config:
    kb = write_corpus(tmp / "kb", n)
    sets = [f"knowledge_base.paths=[\"{kb}\"]", f"index.root=\"{tmp / 'root'}\"", "admin.enabled=true",
            f"admin.tokens=[\"admin:sha256:{sha(ADMIN_TOKEN)}\", \"read:sha256:{sha(READ_TOKEN)}\"]",
            "index.golden_splits=[\"dev\"]", "server.port=0", "index.builder_nice=0", "index.ingest_nice=0",
            "index.builder_threads=1", *NO_DELAY_SHEDDING]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(overrides=sets, env={})


@pytest.fixture
def make_live(tmp_path: Path, fake_encoder: FakeEncoder) -> Iterator[Callable[..., LiveIndex]]:
    """Open (or re-open, as a restart would) a live index over a synthetic corpus in tmp_path."""
    opened: list[LiveIndex] = []

    def make(cfg: Config | None = None, *, n: int = 120, dense: bool = True, **overrides: Any) -> LiveIndex:
        cfg = cfg or live_config(tmp_path, n, **overrides)
        enc = fake_encoder if dense else None
        live = LiveIndex.open(cfg, Tokenizer(), enc, enc)
        opened.append(live)
        return live

    yield make
    for live in opened:
        live.close()


def as_passage(d: dict[str, Any]) -> Passage:
    from server.knowledge import parse_passage

    return parse_passage(d, "test")


@pytest.fixture
async def admin_server(make_live: Callable[..., LiveIndex], runtime: Any) -> AsyncIterator[Callable[..., Any]]:
    """A real server (port 0) with IndexAdmin over a synthetic live index; the session runtime supplies the
    pipelines. Returns (running server, channel to the admin port, the live index)."""
    import dataclasses

    import grpc

    from server.app import start_server
    from server.index.serving import LiveKnowledge, LiveRetriever

    started: list[tuple[Any, Any]] = []

    async def make(cfg: Config | None = None, **overrides: Any) -> tuple[Any, Any, LiveIndex]:
        live = make_live(cfg, **overrides)
        rt = dataclasses.replace(runtime, cfg=live.cfg, retriever=LiveRetriever(live), kb=LiveKnowledge(live),
                                 index=live)
        running = await start_server(live.cfg, runtime=rt)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.admin_port}")
        started.append((running, channel))
        return running, channel, live

    yield make
    for running, channel in started:
        await channel.close()
        await running.stop(0)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)
