"""Crash injection: kill the snapshot builder process at several points, restart, and the served snapshot
is valid, holds the expected passages, and every checksum matches. Plus the pointer and log edges."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from server.index.builder import CRASH_ENV, BuildFailed, BuildResult, run_build
from server.index.live import LiveIndex
from server.index.store import Pointer
from server.retrieval.snapshot import verify_snapshot
from tests.index.conftest import as_passage, passage


def _writes(live: LiveIndex) -> set[tuple[str, str]]:
    live.upsert([as_passage(passage(800 + i)) for i in range(5)])
    live.upsert([as_passage(passage(3, text="replaced: the heron manual"))])
    live.delete(["doc-00009", "doc-00010"], missing_ok=False)
    return {(p.id, p.text) for p in live.view.passages()}


def _build(live: LiveIndex) -> BuildResult:
    """What the Snapshot RPC does: seal the log, run the builder process, record (and prune)."""
    result = asyncio.run(run_build(live.seal(), lambda *_: None))
    live.built(result)
    return result


@pytest.mark.parametrize("stage", ["loaded", "bm25", "hnsw", "manifest"])
def test_builder_killed_mid_snapshot_leaves_the_served_index_whole(make_live: Callable[..., LiveIndex],
                                                                   monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    live = make_live()
    expected = _writes(live)
    monkeypatch.setenv(CRASH_ENV, stage)
    with pytest.raises(BuildFailed, match=rf"stopped after stage '{stage}' \(killed by SIGKILL"):
        _build(live)
    assert live.view.version == "v000001" and {(p.id, p.text) for p in live.view.passages()} == expected
    torn = [p.name for p in live.store.snapshots.iterdir() if p.name.startswith(".v000002.tmp-")]
    assert len(torn) == (0 if stage == "loaded" else 1)  # the killed build's temp dir, once it made one
    assert live.store.versions() == ["v000001"]  # ...never a version
    live.close()
    # Restart: the leftover temp dir is removed, the old snapshot verifies, the log restores every write.
    monkeypatch.delenv(CRASH_ENV)
    again = make_live(live.cfg)
    assert again.view.version == "v000001" and again.store.versions() == ["v000001"]
    assert not [p for p in again.store.snapshots.iterdir() if p.name.startswith(".")]
    manifest = verify_snapshot(again.store.path("v000001"))
    assert manifest["counts"]["passages"] == 120
    assert {(p.id, p.text) for p in again.view.passages()} == expected and len(again.view) == 120 + 5 - 2
    # ...and the next snapshot includes the writes the killed build was given.
    result = _build(again)
    assert result.version == "v000002" and result.passages == len(expected)
    assert verify_snapshot(again.store.path("v000002"))["lifecycle"]["parent"] == "v000001"


def test_builder_killed_after_its_rename_leaves_a_complete_unserved_version(make_live: Callable[..., LiveIndex],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    live = make_live()
    expected = _writes(live)
    monkeypatch.setenv(CRASH_ENV, "renamed")
    with pytest.raises(BuildFailed, match="stage 'renamed'"):
        _build(live)
    live.close()
    monkeypatch.delenv(CRASH_ENV)
    again = make_live(live.cfg)
    assert again.view.version == "v000001"  # CURRENT never moved
    assert verify_snapshot(again.store.path("v000002"))["counts"]["passages"] == len(expected)
    cand = again.prepare_swap("v000002", False, lambda *_: None)
    assert cand.reapplied == 0  # everything logged is inside v000002
    again.commit_swap(cand)
    assert {(p.id, p.text) for p in again.view.passages()} == expected
    assert again.view.n_dead == 0 and again.view.delta_rows == 0  # compacted: one segment, no tombstones


def test_a_crash_during_the_pointer_write_or_before_the_log_cleanup_is_harmless(
        make_live: Callable[..., LiveIndex]) -> None:
    live = make_live()
    expected = _writes(live)
    _build(live)
    logged = [(p.name, p.read_bytes()) for p in live.wal.segments()]
    cand = live.prepare_swap("v000002", False, lambda *_: None)
    live.commit_swap(cand)
    live.close()
    # A crash after CURRENT moved but before the log was cleaned: the old segments are still there.
    for name, data in logged:
        (live.store.wal_dir / name).write_bytes(data)
    # ...and a crash while writing the next pointer left its temp file behind.
    (live.store.root / ".CURRENT.tmp-999").write_text('{"version": "v0000')
    again = make_live(live.cfg)
    assert again.view.version == "v000002"
    assert {(p.id, p.text) for p in again.view.passages()} == expected  # nothing applied twice
    assert not (live.store.root / ".CURRENT.tmp-999").exists()
    # The pointer names the new version only once it was renamed into place: never a mix.
    assert again.store.read_current() == Pointer("v000002", cand.replay_after, again.pointer.history)


def test_swap_and_rollback_keep_pending_writes_and_prune_to_keep(make_live: Callable[..., LiveIndex]) -> None:
    live = make_live(index__keep=1)
    _writes(live)
    _build(live)
    live.commit_swap(live.prepare_swap("", False, lambda *_: None))
    live.upsert([as_passage(passage(950))])  # pending, not in any snapshot
    back = live.prepare_swap(live.previous_version(), True, lambda *_: None)
    assert back.version == "v000001" and back.reapplied == 1
    live.commit_swap(back)
    assert live.view.version == "v000001" and "doc-00950" in {p.id for p in live.view.passages()}
    assert live.store.versions() == ["v000001", "v000002"]  # keep = 1 besides the live one
    _build(live)  # v000003 -> the oldest non-live version goes
    assert live.store.versions() == ["v000001", "v000003"]
