"""Each gate rejects a bad snapshot (truncated, checksum corrupted, shrunk, recall dropped), says which gate
and by how much, and leaves the live index untouched."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from server.index.gates import GateFailed, doc_count_gate, recall_gate
from server.index.live import LiveIndex
from server.knowledge import knowledge_base_from
from server.retrieval.snapshot import write_snapshot
from server.retrieval.text import Tokenizer
from tests.index.conftest import FakeEncoder, as_passage, passage

QUERIES = ["camera night vision", "forklift pallet fault", "thermostat heating"]


def _candidate(live: LiveIndex, enc: FakeEncoder, passages: list) -> tuple[str, Path]:
    """A snapshot built outside the server (as `snaprag index build --root` does) into the next version."""
    version = live.store.next_version()
    kb = knowledge_base_from(passages)
    write_snapshot(live.store.path(version), kb, live.cfg, Tokenizer(), encoder=enc,
                   embeddings=enc.encode([f"{p.text} {p.fault_code} {p.source}" for p in passages]),
                   log=lambda _m: None)
    return version, live.store.path(version)


def _served(live: LiveIndex) -> tuple:
    return live.view.version, live.view.seq, [[h.passage.id for h in live.search(q, 5)] for q in QUERIES]


def _refused(live: LiveIndex, version: str, gate: str, allow_shrink: bool = False) -> GateFailed:
    before = _served(live)
    with pytest.raises(GateFailed) as info:
        live.prepare_swap(version, allow_shrink, lambda *_: None)
    assert _served(live) == before and live.store.read_current().version == "v000001"
    failed = [g.name for g in info.value.gates if not g.passed]
    assert failed == [gate], info.value
    assert f"gate {gate} failed" in str(info.value) and "the live index is unchanged" in str(info.value)
    return info.value


def test_a_good_candidate_passes_every_gate(make_live: Callable[..., LiveIndex], fake_encoder: FakeEncoder) -> None:
    live = make_live()
    version, _ = _candidate(live, fake_encoder, list(live.view.passages()))
    cand = live.prepare_swap(version, False, lambda *_: None)
    assert [(g.name, g.passed) for g in cand.gates] == [("integrity", True), ("doc_count", True), ("recall@10", True)]
    assert cand.gates[2].candidate == pytest.approx(cand.gates[2].live)


def test_truncated_file_fails_integrity(make_live: Callable[..., LiveIndex], fake_encoder: FakeEncoder) -> None:
    live = make_live()
    version, path = _candidate(live, fake_encoder, list(live.view.passages()))
    f = path / "hnsw.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = _refused(live, version, "integrity")
    assert "hnsw.bin: sha256 does not match the manifest" in str(err)


def test_corrupted_checksum_fails_integrity(make_live: Callable[..., LiveIndex], fake_encoder: FakeEncoder) -> None:
    live = make_live()
    version, path = _candidate(live, fake_encoder, list(live.view.passages()))
    f = path / "passages.jsonl"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x20  # one flipped bit, the file still parses
    f.write_bytes(bytes(data))
    err = _refused(live, version, "integrity")
    assert "passages.jsonl: sha256 does not match" in str(err)
    m = json.loads((path / "manifest.json").read_text())  # a manifest edited to "fix" it is no better
    m["files"]["passages.jsonl"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(m))
    _refused(live, version, "integrity")


def test_truncated_corpus_fails_doc_count_unless_allowed(make_live: Callable[..., LiveIndex],
                                                         fake_encoder: FakeEncoder) -> None:
    live = make_live()
    passages = list(live.view.passages())
    # 118 of 120 (98.3 %): golden questions still answered, just under the 99 % floor
    keep = [p for p in passages if p.id not in ("doc-00001", "doc-00002")]
    version, _ = _candidate(live, fake_encoder, keep)
    err = _refused(live, version, "doc_count")
    assert "118 passages vs 120 live (98.3%, the minimum is 99%, 2 missing; pass --allow-shrink" in str(err)
    cand = live.prepare_swap(version, True, lambda *_: None)
    assert cand.gates[1].passed and "not checked (allow_shrink)" in cand.gates[1].detail


def test_recall_drop_fails_the_recall_gate_with_its_margin(make_live: Callable[..., LiveIndex],
                                                           fake_encoder: FakeEncoder) -> None:
    live = make_live()
    relevant = {pid for q in live.golden for pid in q.relevant}
    # Same passages and count, but the golden-relevant ones lost their distinguishing words.
    scrambled = [as_passage(passage(int(p.id[4:]), text="generic text about nothing in particular"))
                 if p.id in relevant and int(p.id[4:]) % 3 == 0 else p for p in live.view.passages()]
    version, _ = _candidate(live, fake_encoder, scrambled)
    err = _refused(live, version, "recall@10")
    gate = next(g for g in err.gates if g.name == "recall@10")
    assert gate.candidate < 0.95 * gate.live
    assert f"candidate {gate.candidate:.3f} vs live {gate.live:.3f}" in gate.detail
    assert "the limit is -5.0%" in gate.detail and "over 24 golden questions" in gate.detail


def test_gate_arithmetic_at_the_bounds() -> None:
    assert doc_count_gate(99, 100, 0.99, False).passed and not doc_count_gate(98, 100, 0.99, False).passed
    assert recall_gate(0.95, 1.0, 0.05, 10, 5).passed and not recall_gate(0.949, 1.0, 0.05, 10, 5).passed
    assert recall_gate(0.99, 0.9, 0.05, 10, 5).passed  # better is fine
    assert "not evaluated" in recall_gate(0.0, 0.0, 0.05, 10, 0).detail
