"""`snaprag index build / verify` as an operator runs them (in-process, BM25-only to stay fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import main

PASSAGES = [
    {"id": "p-plug-reset", "text": "Hold the plug button for ten seconds to factory reset it.",
     "intent": "troubleshooting", "domain": "smart_home", "locale": "en-US", "confidence": 0.9, "source": "Plug guide"},
    {"id": "p-wifi", "text": "The plug needs 2.4 GHz Wi-Fi with WPA2.", "intent": "connectivity",
     "domain": "smart_home", "locale": "en-US", "confidence": 0.8, "source": "Plug guide"},
]


def _corpus(tmp_path: Path, rows: list[object]) -> Path:
    f = tmp_path / "passages.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return f


def test_build_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snap"
    assert main(["index", "build", "--corpus", str(_corpus(tmp_path, PASSAGES)), "--out", str(out), "--no-dense"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["passages"] == 2
    assert main(["index", "verify", str(out)]) == 0
    assert "OK, 2 passages" in capsys.readouterr().out
    # a second build without --force refuses to overwrite
    assert main(["index", "build", "--corpus", str(tmp_path / "passages.jsonl"), "--out", str(out), "--no-dense"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err


def test_verify_names_the_corrupt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snap"
    main(["index", "build", "--corpus", str(_corpus(tmp_path, PASSAGES)), "--out", str(out), "--no-dense"])
    with (out / "passages.jsonl").open("a") as fh:
        fh.write("\n")
    assert main(["index", "verify", str(out)]) == 1
    assert "passages.jsonl: sha256 does not match" in capsys.readouterr().err


@pytest.mark.parametrize(("bad", "expected"), [
    ("{not json", "passages.jsonl:2: not valid JSON"),
    (json.dumps({**PASSAGES[0], "id": "p-x", "confidence": 3}), "passages.jsonl:2: confidence 3.0 is outside [0, 1]"),
    (json.dumps({k: v for k, v in PASSAGES[0].items() if k != "text"} | {"id": "p-y"}),
     "passages.jsonl:2: missing field 'text'"),
])
def test_malformed_jsonl_names_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str,
                                              expected: str) -> None:
    corpus = _corpus(tmp_path, [PASSAGES[0], bad])
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "s"), "--no-dense"]) == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_eval_rejects_unknown_method_and_missing_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["eval", "--kb", "voice", "--methods", "bm25,magic"]) == 1
    assert "unknown magic" in capsys.readouterr().err
    assert main(["eval", "--corpus", str(tmp_path / "nope.jsonl")]) == 1
    assert "missing: queries, qrels" in capsys.readouterr().err


def test_eval_on_kb_golden_set_bm25(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--kb", "warehouse", "--split", "dev", "--methods", "bm25", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures["bm25"]) >= {"ndcg@10", "mrr@10", "recall@100", "hit@5"}
    assert figures["bm25"]["ndcg@10"] > 0.5
