"""Write-ahead log of the live index: every acknowledged write batch, until a snapshot holds it.

    wal/00000003.log    one segment; a new one starts at every server start and every Snapshot (seal)

A segment is a sequence of records:

    b"SRW1" | payload length (u32 LE) | crc32 of the payload (u32 LE) | payload

    payload = one line of JSON {"op": "upsert"|"delete", "batch": n, "passages": [...], "ids": [...],
              "rows": r, "dim": d}  b"\\n"  r x d float32 vectors (little-endian), upserts with dense only

A record is appended, flushed and fsynced before the write is acknowledged or published, so a crash
loses only unacknowledged writes. A crash mid-append leaves a torn record at the end of the newest
segment; reading stops there (nothing after it was ever acknowledged). A bad record anywhere else is
corruption, and reading refuses with the file and offset.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt

from server.knowledge import KnowledgeBaseError, Passage, parse_passage
from server.retrieval.snapshot import fsync_path

MAGIC = b"SRW1"
HEADER = struct.Struct("<4sII")
SUFFIX = ".log"


class WalError(ValueError):
    """A log segment is corrupt (not just torn at its end); the message names the file and offset."""


@dataclass(frozen=True, slots=True)
class WalRecord:
    """One write batch as it was applied."""

    op: Literal["upsert", "delete"]
    batch: int
    """Write number, increasing over the life of the index root (the live view's generation)."""
    passages: tuple[Passage, ...] = ()
    vectors: npt.NDArray[np.float32] | None = None
    """Upserts with dense retrieval: the encoder's vectors, row i for passages[i] (never re-encoded)."""
    ids: tuple[str, ...] = ()
    """Deletes: the ids removed (only ids that existed)."""
    segment: int = 0
    """The segment it was read from or appended to."""

    @property
    def size(self) -> int:
        return len(self.passages) if self.op == "upsert" else len(self.ids)


def passage_json(p: Passage) -> dict[str, Any]:
    d: dict[str, Any] = {"id": p.id, "text": p.text, "intent": p.intent, "domain": p.domain, "locale": p.locale,
                         "confidence": p.confidence, "source": p.source}
    if p.fault_code:
        d["fault_code"] = p.fault_code
    if p.steps:
        d["steps"] = [dict(s) for s in p.steps]
    return d


def encode_record(rec: WalRecord) -> bytes:
    head: dict[str, Any] = {"op": rec.op, "batch": rec.batch}
    blob = b""
    if rec.op == "upsert":
        head["passages"] = [passage_json(p) for p in rec.passages]
        if rec.vectors is not None:
            vecs = np.ascontiguousarray(rec.vectors, dtype="<f4")
            head["rows"], head["dim"] = int(vecs.shape[0]), int(vecs.shape[1])
            blob = vecs.tobytes()
    else:
        head["ids"] = list(rec.ids)
    payload = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n" + blob
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes, where: str, segment: int) -> WalRecord:
    line, _, blob = payload.partition(b"\n")
    try:
        head = json.loads(line)
        op = head["op"]
        if op == "upsert":
            passages = tuple(parse_passage(obj, f"{where} passages[{i}]") for i, obj in enumerate(head["passages"]))
            vectors = None
            if "rows" in head:
                vectors = np.frombuffer(blob, dtype="<f4").reshape(head["rows"], head["dim"]).astype(np.float32)
            return WalRecord("upsert", int(head["batch"]), passages=passages, vectors=vectors, segment=segment)
        if op == "delete":
            return WalRecord("delete", int(head["batch"]), ids=tuple(head["ids"]), segment=segment)
        raise WalError(f"{where}: unknown op {op!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, KnowledgeBaseError) as e:
        raise WalError(f"{where}: record does not decode ({e})") from e


def segment_number(path: Path) -> int:
    return int(path.name[: -len(SUFFIX)])


def read_segment(path: Path) -> Iterator[WalRecord]:
    """The records of one segment, in order; stops quietly at a torn record at the end."""
    seg = segment_number(path)
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        where = f"{path} at byte {pos}"
        if len(data) - pos < HEADER.size:
            return  # torn header at the end
        magic, length, crc = HEADER.unpack_from(data, pos)
        if magic != MAGIC:
            raise WalError(f"{where}: no record marker; the log is corrupt (restore the file or move it away "
                           "to start from the served snapshot, losing its writes)")
        end = pos + HEADER.size + length
        if end > len(data):
            return  # torn payload at the end: never acknowledged
        payload = data[pos + HEADER.size:end]
        if zlib.crc32(payload) != crc:
            if end == len(data):
                return  # the last record, half written
            raise WalError(f"{where}: checksum mismatch in the middle of the log; the log is corrupt")
        yield decode_payload(payload, where, seg)
        pos = end


class WriteAheadLog:
    """The log folder: sealed segments plus the active one this process appends to."""

    def __init__(self, folder: Path, *, after: int = 0) -> None:
        """`after`: the last segment number already used (CURRENT's replay_after): numbers never go back,
        even when every segment file was deleted after a swap."""
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        existing = self.segments()
        # Always a fresh segment: a torn tail in the last one is never appended after.
        self.active = max((segment_number(existing[-1]) + 1) if existing else 1, after + 1)
        self._fh: BinaryIO | None = None

    def segments(self, after: int = 0, through: int | None = None) -> list[Path]:
        """Segment files with after < number <= through, oldest first."""
        out = []
        for p in self.folder.glob(f"*{SUFFIX}"):
            if not p.name[: -len(SUFFIX)].isdigit():
                continue
            n = segment_number(p)
            if n > after and (through is None or n <= through):
                out.append(p)
        return sorted(out, key=segment_number)

    def path(self, number: int) -> Path:
        return self.folder / f"{number:08d}{SUFFIX}"

    def records(self, after: int = 0) -> Iterator[WalRecord]:
        """Every record in segments after `after`, in write order."""
        for p in self.segments(after):
            yield from read_segment(p)

    def append(self, rec: WalRecord) -> WalRecord:
        """Write and fsync one record into the active segment; returns it tagged with the segment."""
        if self._fh is None:
            new = not self.path(self.active).exists()
            self._fh = self.path(self.active).open("ab")
            if new:
                fsync_path(self.folder)
        self._fh.write(encode_record(rec))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return WalRecord(rec.op, rec.batch, rec.passages, rec.vectors, rec.ids, segment=self.active)

    def seal(self) -> int:
        """Close the active segment (it will only be read from now on) and start the next; returns the
        sealed segment's number. An empty active segment is sealed too (numbers stay monotonic)."""
        sealed = self.active
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.active += 1
        return sealed

    def drop_through(self, number: int) -> None:
        """Delete segments <= number (their writes are inside the served snapshot)."""
        for p in self.segments(0, number):
            p.unlink(missing_ok=True)
        fsync_path(self.folder)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None




def read_all(paths: Sequence[Path]) -> Iterator[WalRecord]:
    for p in paths:
        yield from read_segment(p)
