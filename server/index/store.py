"""The live index's folder: snapshot versions, the CURRENT pointer, clean-up after crashes, pruning.

CURRENT is a small JSON file, {"version": "v000007", "replay_after": 12, "history": [...]}: the snapshot
served, and the last write-ahead-log segment already inside it (later segments are replayed on top).
It is the one pointer a swap changes: written to a temp file, fsynced, renamed over the old one, and
the folder fsynced, so after a crash it names either the old snapshot or the new one, never a mix.
A snapshot directory is complete before CURRENT can name it (server/retrieval/snapshot.py writes it
to a temp dir and renames), and nothing a snapshot needs is deleted until CURRENT has moved on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.retrieval.snapshot import SnapshotError, fsync_path, read_manifest

CURRENT = "CURRENT"
VERSION = re.compile(r"^v(\d{6,})$")
HISTORY_MAX = 20


@dataclass
class Pointer:
    version: str
    replay_after: int = 0
    """Write-ahead-log segments up to this number are inside `version` (or were given up by a rollback)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Past promotions, newest last: {"version", "previous", "at"}."""

    def to_json(self) -> bytes:
        return json.dumps({"version": self.version, "replay_after": self.replay_after,
                           "history": self.history[-HISTORY_MAX:]}, indent=2).encode("utf-8")


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(name: str) -> int:
    m = VERSION.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a snapshot version (v000001, v000002, ...)")
    return int(m.group(1))


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class SnapshotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots = root / "snapshots"
        self.wal_dir = root / "wal"
        self.current_file = root / CURRENT

    def ensure(self) -> None:
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self.wal_dir.mkdir(parents=True, exist_ok=True)

    def path(self, version: str) -> Path:
        version_number(version)  # refuse anything that is not a plain version name (no paths)
        return self.snapshots / version

    def versions(self) -> list[str]:
        """Complete snapshot dirs (a manifest present), oldest first. Temp dirs start with a dot."""
        if not self.snapshots.exists():
            return []
        found = [p.name for p in self.snapshots.iterdir()
                 if p.is_dir() and VERSION.match(p.name) and (p / "manifest.json").exists()]
        return sorted(found, key=version_number)

    def next_version(self) -> str:
        """One past every version dir, temp dirs of crashed builds included (never reuse a name)."""
        numbers = [0]
        if self.snapshots.exists():
            for p in self.snapshots.iterdir():
                m = re.match(r"^v(\d{6,})", p.name.lstrip("."))  # ".v000004.tmp-123" counts as 4
                if m:
                    numbers.append(int(m.group(1)))
        return version_name(max(numbers) + 1)

    def read_current(self) -> Pointer | None:
        if not self.current_file.exists():
            return None
        try:
            data = json.loads(self.current_file.read_text(encoding="utf-8"))
            return Pointer(version=str(data["version"]), replay_after=int(data.get("replay_after", 0)),
                           history=list(data.get("history", [])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            # Cannot happen through a crash (rename is atomic); someone edited it.
            raise SnapshotError(f"{self.current_file}: unreadable ({e}); write it again as "
                                f'{{"version": "v000001", "replay_after": 0}} naming a snapshot in '
                                f"{self.snapshots}") from e

    def write_current(self, pointer: Pointer) -> None:
        tmp = self.root / f".{CURRENT}.tmp-{os.getpid()}"
        with tmp.open("wb") as fh:
            fh.write(pointer.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.current_file)
        fsync_path(self.root)

    def cleanup(self) -> list[str]:
        """Remove what crashed writers left: temp snapshot dirs and temp pointer files. Returns their names."""
        removed = []
        for p in list(self.root.glob(f".{CURRENT}.tmp-*")):
            p.unlink(missing_ok=True)
            removed.append(p.name)
        if self.snapshots.exists():
            for p in list(self.snapshots.iterdir()):
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        return removed

    def prune(self, keep: int, protect: set[str]) -> list[str]:
        """Delete all but the newest `keep` versions besides `protect` (the served one). Returns the deleted."""
        candidates = [v for v in self.versions() if v not in protect]
        doomed = candidates[: max(0, len(candidates) - keep)]
        for v in doomed:
            # Rename first so a crash mid-delete leaves a temp name cleanup() finishes, not a broken version.
            gone = self.snapshots / f".{v}.old-{os.getpid()}"
            os.replace(self.snapshots / v, gone)
            shutil.rmtree(gone, ignore_errors=True)
        if doomed:
            fsync_path(self.snapshots)
        return doomed

    def info(self, version: str) -> dict[str, Any]:
        path = self.path(version)
        try:
            manifest = read_manifest(path)
        except SnapshotError:
            return {"version": version, "passages": 0, "created": "", "bytes": 0}
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        return {"version": version, "passages": int(manifest.get("counts", {}).get("passages", 0)),
                "created": str(manifest.get("created", "")), "bytes": size}
