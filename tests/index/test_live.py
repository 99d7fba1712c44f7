"""LiveIndex semantics: reads match the static retriever, writes replace/delete/report, views stay consistent."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from server.errors import NotFound
from server.index.live import LiveIndex
from server.index.wal import WalError, read_segment
from server.retrieval.dense import exact_search
from server.retrieval.hybrid import DenseRetriever, HybridRetriever
from server.retrieval.snapshot import load_snapshot
from server.retrieval.sparse import SparseRetriever
from server.retrieval.text import Tokenizer
from tests.index.conftest import TOPICS, FakeEncoder, as_passage, passage, word

QUERIES = [f"{word(i)} {TOPICS[i % 8]}" for i in (3, 17, 40, 77)] + ["forklift pallet", "camera vision night",
                                                                       "battery dock charger step"]


def ids(hits: list) -> list[str]:
    return [h.passage.id for h in hits]


def static_retriever(live: LiveIndex, enc: FakeEncoder) -> HybridRetriever:
    """The pre-existing HybridRetriever over the same snapshot: the reference a fresh view must equal."""
    from server.retrieval.dense import HnswIndex

    cfg = live.cfg
    snap = load_snapshot(live.gen.path, Tokenizer(), encoder=enc)
    sparse = SparseRetriever(snap.kb, Tokenizer(), cfg.retrieval.bm25, apply_confidence=True,
                             confidence_weight=cfg.retrieval.confidence_weight, prebuilt=(snap.vocab, snap.matrix))
    assert snap.hnsw_path is not None
    dense = DenseRetriever(enc, HnswIndex.load(snap.hnsw_path, dim=enc.dim, ef=cfg.retrieval.dense.hnsw_ef))  # type: ignore[arg-type]
    return HybridRetriever(snap.kb, sparse, dense, cfg.retrieval.fusion, apply_confidence=True)


@pytest.mark.parametrize("mode", ["sparse", "dense", "rrf", "convex"])
def test_fresh_view_ranks_exactly_like_the_static_retriever(make_live: Callable[..., LiveIndex],
                                                            fake_encoder: FakeEncoder, mode: str) -> None:
    live = make_live()
    ref = static_retriever(live, fake_encoder)
    try:
        for q in QUERIES:
            for filters in (None, {"intent": ["fix"]}, {"domain": ["warehouse"], "intent": ["setup", "fix"]}):
                a = [(h.passage.id, round(h.score, 6)) for h in live.search(q, 10, filters, mode)]  # type: ignore[arg-type]
                b = [(h.passage.id, round(h.score, 6)) for h in ref.search(q, 10, filters, mode)]  # type: ignore[arg-type]
                assert a == b, (q, filters)
    finally:
        ref.close()


def test_upsert_inserts_and_replaces_delete_removes(make_live: Callable[..., LiveIndex]) -> None:
    live = make_live()
    n0 = len(live.view)
    out = live.upsert([as_passage(passage(900)), as_passage(passage(4, text="walrus maintenance for the dock"))])
    assert (out.inserted, out.replaced, out.live_passages) == (1, 1, n0 + 1)
    assert ids(live.search(word(900), 1, mode="sparse")) == ["doc-00900"]
    hits = live.search("walrus", 3, mode="sparse")
    assert ids(hits)[0] == "doc-00004" and hits[0].passage.text.startswith("walrus")
    assert word(4) not in {t for h in live.search(word(4), 5, mode="sparse") for t in h.passage.text.split()}
    # a replaced passage is one passage: it is never returned twice (old + new)
    assert ids(live.search("walrus dock", 50)).count("doc-00004") == 1
    out_d = live.delete(["doc-00900", "doc-00004"], missing_ok=False)
    assert out_d.deleted == 2 and len(live.view) == n0 - 1
    assert "doc-00004" not in ids(live.search("walrus dock", 50))
    assert "doc-00004" not in {p.id for p in live.view.passages()}


def test_deleting_an_unknown_id_is_reported_and_changes_nothing(make_live: Callable[..., LiveIndex]) -> None:
    live = make_live()
    before = (live.view.seq, len(live.view), len(live.pending))
    with pytest.raises(NotFound, match=r"ids not in the index: nope-1, nope-2; nothing was deleted"):
        live.delete(["doc-00001", "nope-1", "nope-2"], missing_ok=False)
    assert (live.view.seq, len(live.view), len(live.pending)) == before
    assert "doc-00001" in {p.id for p in live.view.passages()}
    out = live.delete(["doc-00001", "nope-1"], missing_ok=True)
    assert out.deleted == 1 and out.not_found == ["nope-1"]


def test_hnsw_grows_past_its_capacity_and_finds_every_added_row(make_live: Callable[..., LiveIndex],
                                                               fake_encoder: FakeEncoder) -> None:
    live = make_live(n=40)
    dense = live.gen.dense
    assert dense is not None
    cap0 = dense.index.capacity
    new = [as_passage(passage(1000 + i, text=f"{word(1000 + i)} {word(7000 + i)}")) for i in range(cap0)]
    for lo in range(0, len(new), 16):  # more rows than the headroom
        live.upsert(new[lo:lo + 16])
    assert dense.index.capacity > cap0 and len(dense) == 40 + cap0
    for p in new[::7]:
        # the graph answers like brute force over every row, old and added
        best, _ = exact_search(dense.index.vectors, fake_encoder.encode_query(p.text), 1)
        assert ids(live.search(p.text, 1, mode="dense")) == [live.gen.rows[int(best[0])].id] == [p.id]


def test_a_held_view_keeps_rows_later_writes_hide_until_it_is_released(make_live: Callable[..., LiveIndex]) -> None:
    live = make_live()
    target = "doc-00010"
    text = live.gen.rows[live.gen.row_of[target]].text
    dense = live.gen.dense
    assert dense is not None
    with live.acquire() as old:
        live.upsert([as_passage(passage(10, text="completely different words about otters"))])
        live.delete(["doc-00011"], missing_ok=False)
        # The old view still sees the old passage, in BM25 and in the graph (not yet marked deleted).
        assert dense.index.deleted == 0
        for mode in ("sparse", "dense"):
            hit = old.search(text, 1, mode=mode)[0]  # type: ignore[arg-type]
            assert (hit.passage.id, hit.passage.text) == (target, text)
        assert "doc-00011" in ids(old.search(word(11), 3, mode="sparse"))
        assert (len(old), len(live.view)) == (120, 119)  # one replaced (same count), one deleted
    live.upsert([as_passage(passage(2000))])  # the next write reaps: no one holds the old view any more
    assert dense.index.deleted == 2
    new_hits = live.search(text, 5, mode="dense")
    assert all(h.passage.text != text for h in new_hits)
    assert "doc-00011" not in ids(live.search(word(11), 5))


@pytest.mark.parametrize("added", [10, 300])  # a few percent of the snapshot, and three times its size
def test_scores_with_a_delta_match_a_rebuild(make_live: Callable[..., LiveIndex], tmp_path, added: int) -> None:
    from server.knowledge import knowledge_base_from
    from server.retrieval.snapshot import write_snapshot

    live = make_live(n=100)
    new = [as_passage(passage(3000 + i)) for i in range(added)]
    for lo in range(0, added, 50):
        live.upsert(new[lo:lo + 50])
    out = tmp_path / "rebuilt"
    write_snapshot(out, knowledge_base_from(list(live.view.passages())), live.cfg, Tokenizer(), log=lambda _m: None)
    snap = load_snapshot(out, Tokenizer())
    ref = SparseRetriever(snap.kb, Tokenizer(), live.cfg.retrieval.bm25, apply_confidence=False,
                          prebuilt=(snap.vocab, snap.matrix))
    factor = live.view.factor
    assert factor is not None
    unique = [f"{word(3000 + i)} {TOPICS[i % 8]}" for i in range(0, added, max(1, added // 8))]
    for q in unique + QUERIES:
        hits = live.search(q, 10, mode="sparse")
        ours = {h.passage.id: h.score / factor[live.gen.row_of[h.passage.id]] for h in hits}
        theirs = {h.passage.id: h.score for h in ref.search(q, 10)}
        if q in unique:  # generic queries have near-ties whose order avgdl may flip
            assert next(iter(ours)) == next(iter(theirs)), q
        # old and new rows alike score within 2 % of a single index over everything (avgdl is the
        # snapshot's until the next one)
        for pid in set(ours) & set(theirs):
            assert ours[pid] == pytest.approx(theirs[pid], rel=0.02), (q, pid)


def test_restart_replays_the_log_and_ignores_a_torn_tail(make_live: Callable[..., LiveIndex]) -> None:
    live = make_live()
    live.upsert([as_passage(passage(700)), as_passage(passage(5, text="replaced: penguins on the conveyor"))])
    live.delete(["doc-00006"], missing_ok=False)
    expected = sorted((p.id, p.text) for p in live.view.passages())
    results = [ids(live.search(q, 5)) for q in QUERIES]
    segment = live.wal.path(live.wal.active)
    live.close()
    with segment.open("ab") as fh:  # a crash half-way through appending the next record
        fh.write(b"SRW1\x40\x00\x00\x00garbage")
    again = make_live(live.cfg)
    assert sorted((p.id, p.text) for p in again.view.passages()) == expected
    assert [ids(again.search(q, 5)) for q in QUERIES] == results
    assert len(again.pending) == 2 and again.view.version == "v000001"


def test_corruption_in_the_middle_of_the_log_is_refused(make_live: Callable[..., LiveIndex]) -> None:
    live = make_live()
    live.upsert([as_passage(passage(700))])
    live.upsert([as_passage(passage(701))])
    segment = live.wal.path(live.wal.active)
    live.close()
    data = bytearray(segment.read_bytes())
    data[20] ^= 0xFF  # inside the first record's payload
    segment.write_bytes(bytes(data))
    with pytest.raises(WalError, match=r"checksum mismatch in the middle of the log"):
        list(read_segment(segment))


def test_readers_never_see_half_a_batch(make_live: Callable[..., LiveIndex]) -> None:
    """Writer threads replace a group of passages batch by batch; readers at full speed must see every
    group member, all from the same batch."""
    live = make_live()
    group = [f"grp-{i}" for i in range(4)]

    def batch(v: int) -> list:
        return [as_passage(passage(0, pid=g, text=f"aardvark zeppelin version{v} member {g}")) for g in group]

    live.upsert(batch(0))
    stop = threading.Event()
    problems: list[str] = []
    reads = [0]

    def reader(mode: str) -> None:
        while not stop.is_set():
            hits = [h for h in live.search("aardvark zeppelin", 10, mode=mode) if h.passage.id.startswith("grp-")]  # type: ignore[arg-type]
            versions = {h.passage.text.split()[2] for h in hits}
            if len(hits) != 4 or len(versions) != 1:
                problems.append(f"{mode}: {[(h.passage.id, h.passage.text.split()[2]) for h in hits]}")
            reads[0] += 1

    threads = [threading.Thread(target=reader, args=(m,)) for m in ("sparse", "convex", "dense")]
    for t in threads:
        t.start()
    try:
        for v in range(1, 40):
            live.upsert(batch(v))
            if v % 10 == 0:
                live.delete([f"doc-{v:05d}"], missing_ok=False)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert reads[0] > 40
    assert not problems, problems[:5]
    assert np.count_nonzero(~live.view.alive) >= 4 * 39  # every replaced row is a tombstone
