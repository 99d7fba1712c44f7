"""Index snapshots: round trip, checksums, refusal of corrupt or mismatched snapshots, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server.config import Config
from server.knowledge import knowledge_base_from, load_corpus_records
from server.retrieval.snapshot import SnapshotError, load_snapshot, verify_snapshot, write_snapshot
from server.retrieval.sparse import SparseRetriever
from server.retrieval.text import Tokenizer
from server.runtime import Runtime

QUERIES = ["how do i reset my smart plug", "forklift e202 pallet shifted", "camera night vision blurry",
           "battery overtemperature while charging", "set an alarm for seven"]


@pytest.fixture
def snapshot(tmp_path: Path, runtime: Runtime, config: Config) -> Path:
    out = tmp_path / "snap"
    write_snapshot(out, runtime.kb, config, Tokenizer(), log=lambda _m: None)
    return out


def test_round_trip_serves_the_same_results(snapshot: Path, runtime: Runtime, config: Config) -> None:
    snap = load_snapshot(snapshot, Tokenizer())
    assert len(snap.kb) == len(runtime.kb) and snap.manifest["counts"]["passages"] == len(runtime.kb)
    loaded = SparseRetriever(snap.kb, Tokenizer(), config.retrieval.bm25, apply_confidence=True,
                             confidence_weight=config.retrieval.confidence_weight, prebuilt=(snap.vocab, snap.matrix))
    fresh = runtime.retriever.sparse
    for q in QUERIES:
        a = [(h.passage.id, round(h.score, 5)) for h in loaded.search(q, 10)]
        b = [(h.passage.id, round(h.score, 5)) for h in fresh.search(q, 10)]
        assert a == b
    # metadata and procedures survive
    p = snap.kb.passages[snap.kb.by_id["wh-f-e202-recover"]]
    assert p.fault_code == "E202" and p.steps and p.domain == "warehouse"


def test_manifest_lists_every_file_with_sha256(snapshot: Path) -> None:
    manifest = verify_snapshot(snapshot)
    assert manifest["format_version"] == 1
    assert set(manifest["files"]) == {"passages.jsonl", "vocab.json", "bm25.npz"}
    assert all(len(d) == 64 for d in manifest["files"].values())
    assert manifest["tokenizer"] == {"lowercase": True, "stopwords": True, "stem": True}


@pytest.mark.parametrize("victim", ["passages.jsonl", "vocab.json", "bm25.npz"])
def test_corrupt_file_is_refused_with_its_name(snapshot: Path, victim: str) -> None:
    f = snapshot / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=rf"{victim}: sha256 does not match"):
        load_snapshot(snapshot, Tokenizer())


def test_truncated_or_missing_files_are_refused(snapshot: Path) -> None:
    (snapshot / "vocab.json").unlink()
    with pytest.raises(SnapshotError, match=r"vocab\.json: missing"):
        verify_snapshot(snapshot)
    (snapshot / "manifest.json").unlink()
    with pytest.raises(SnapshotError, match=r"no manifest\.json"):
        verify_snapshot(snapshot)


def test_wrong_format_version_and_tokenizer_mismatch(snapshot: Path) -> None:
    m = json.loads((snapshot / "manifest.json").read_text())
    with pytest.raises(SnapshotError, match="tokenizer"):
        load_snapshot(snapshot, Tokenizer(stem=False))
    m["format_version"] = 99
    (snapshot / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match="format_version 99"):
        load_snapshot(snapshot, Tokenizer())


def test_existing_snapshot_is_not_overwritten_without_force(snapshot: Path, runtime: Runtime, config: Config) -> None:
    with pytest.raises(SnapshotError, match="already exists"):
        write_snapshot(snapshot, runtime.kb, config, Tokenizer(), log=lambda _m: None)
    write_snapshot(snapshot, runtime.kb, config, Tokenizer(), force=True, log=lambda _m: None)
    verify_snapshot(snapshot)
    assert [p.name for p in snapshot.parent.iterdir()] == ["snap"], "no temp or backup directories left"


def test_failed_write_leaves_nothing_behind(tmp_path: Path, runtime: Runtime, config: Config) -> None:
    import numpy as np

    bad = np.zeros((3, 4), dtype=np.float32)  # wrong row count: fails after files were written
    with pytest.raises(SnapshotError, match="3 rows"):
        write_snapshot(tmp_path / "snap", runtime.kb, config, Tokenizer(), embeddings=bad, log=lambda _m: None)
    assert list(tmp_path.iterdir()) == []


def test_beir_corpus_records(tmp_path: Path) -> None:
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"_id": "4983", "title": "Microstructural development", "text": "Alterations of the brain."}\n'
                 '{"_id": "5836", "title": "", "text": "Induction of myelodysplasia."}\n')
    kb = knowledge_base_from(load_corpus_records(f))
    assert [p.id for p in kb.passages] == ["4983", "5836"]
    assert kb.passages[0].source == "Microstructural development" and kb.passages[0].confidence == 1.0
    shutil.copy(f, tmp_path / "dup.jsonl")
    with (tmp_path / "dup.jsonl").open("a") as fh:
        fh.write('{"_id": "4983", "title": "x", "text": "again"}\n')
    with pytest.raises(ValueError, match="duplicate passage id '4983'"):
        knowledge_base_from(load_corpus_records(tmp_path / "dup.jsonl"))


def test_server_startup_refuses_a_corrupt_snapshot(snapshot: Path) -> None:
    from server.config import load_config
    from server.runtime import build_runtime

    cfg = load_config(env={}, overrides=[f"knowledge_base.snapshot={snapshot}", "retrieval.dense.enabled=false"])
    rt = build_runtime(cfg)  # a good snapshot serves
    try:
        assert len(rt.kb) == json.loads((snapshot / "manifest.json").read_text())["counts"]["passages"]
    finally:
        rt.close()
    with (snapshot / "bm25.npz").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(SnapshotError, match=r"bm25\.npz: sha256 does not match"):
        build_runtime(cfg)
