"""`snaprag index upsert|delete|snapshot|swap|rollback|stats|build --root` as an operator runs them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.cli import main
from server.index.store import SnapshotStore
from tests.index.conftest import ADMIN_TOKEN, READ_TOKEN, passage

GOOD = json.dumps(passage(900))


@pytest.mark.parametrize(("line", "expected"), [
    ("{not json", "passages.jsonl:2: not valid JSON"),
    (json.dumps({**passage(901), "text": ""}), "passages.jsonl:2 field 'text': is empty or missing"),
    (json.dumps({k: v for k, v in passage(901).items() if k != "text"}), "passages.jsonl:2 field 'text': is empty"),
    (json.dumps({**passage(901), "text": "y" * 4001}), "passages.jsonl:2 field 'text': is 4001 characters; the limit "
                                                       "is 4000"),
    (json.dumps({**passage(901), "confidence": 3}), "passages.jsonl:2: confidence 3.0 is outside [0, 1]"),
    (json.dumps({**passage(901), "confidence": "high"}), "passages.jsonl:2: field 'confidence' has the wrong type"),
    (json.dumps({**passage(901), "id": "Has Spaces"}), "passages.jsonl:2 field 'id': 'Has Spaces' must match"),
    (GOOD, "passages.jsonl:2 field 'id': 'doc-00900' is already on line 1"),
    (b'{"id": "doc-00901", "text": "caf\xe9"}', "passages.jsonl:2: not valid UTF-8 (byte 0xe9 at column 33)"),
])
def test_malformed_jsonl_is_refused_before_anything_is_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            line: str | bytes, expected: str) -> None:
    f = tmp_path / "passages.jsonl"
    f.write_bytes(GOOD.encode() + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    # Port 9 (discard) on loopback: nothing listens; the command must fail on the file, not the connection.
    assert main(["index", "upsert", str(f), "--target", "127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert expected in err, err


async def test_operator_round_trip(admin_server: Callable[..., Any], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    running, _, _live = await admin_server()
    target = f"127.0.0.1:{running.admin_port}"
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    f = tmp_path / "new.jsonl"
    f.write_text("".join(json.dumps(passage(900 + i)) + "\n" for i in range(7)))

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["index", *args, "--target", target])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = await asyncio.to_thread(cli, "upsert", str(f), "--batch", "3", "--token-file", str(token_file))
    assert code == 0 and "upserted 7 passages (7 new, 0 replaced); 127 live" in out
    monkeypatch.setenv("SNAPRAG_ADMIN_TOKEN", ADMIN_TOKEN)
    code, out, _ = await asyncio.to_thread(cli, "delete", "doc-00900", "ghost")
    assert code == 1
    code, out, _ = await asyncio.to_thread(cli, "delete", "doc-00900", "ghost", "--missing-ok")
    assert code == 0 and "deleted 1" in out and "not in the index: ghost" in out
    code, out, err = await asyncio.to_thread(cli, "snapshot", "--swap")
    assert code == 0, err
    assert "built v000002: 126 passages" in out and "swapped v000001 -> v000002" in out
    assert "gate recall@10: pass" in out
    code, out, err = await asyncio.to_thread(cli, "rollback", "--allow-shrink")
    assert code == 0 and "swapped v000002 -> v000001: 120 passages live, 0 pending writes" in out, err
    monkeypatch.setenv("SNAPRAG_ADMIN_TOKEN", READ_TOKEN)
    code, out, _ = await asyncio.to_thread(cli, "stats")
    assert code == 0 and "live: v000001" in out and "v000002  126 passages" in out
    code, _, err = await asyncio.to_thread(cli, "swap", "v000002")
    assert code == 1 and "PERMISSION_DENIED: Swap needs the admin role" in err
    code, out, _ = await asyncio.to_thread(cli, "stats", "--json")
    assert json.loads(out)["live_version"] == "v000001"


def test_build_into_a_live_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(passage(i)) + "\n" for i in range(5)))
    root = tmp_path / "root"
    assert main(["index", "build", "--corpus", str(corpus), "--root", str(root), "--no-dense"]) == 0
    assert main(["index", "build", "--corpus", str(corpus), "--root", str(root), "--no-dense"]) == 0
    store = SnapshotStore(root)
    assert store.versions() == ["v000001", "v000002"]
    current = store.read_current()
    assert current is not None and current.version == "v000001"  # the first one is served; later ones wait
    assert "promote it with `snaprag index swap v000002`" in capsys.readouterr().err
