"""The embedded knowledge bases meet the product requirements, and the loader rejects malformed files
with a message naming file, line and field."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from server.knowledge import (
    GoldenQuestion,
    KnowledgeBase,
    KnowledgeBaseError,
    Passage,
    load_golden,
    load_knowledge_base,
)
from server.robot_plan import ActionVocabulary, check_plan_safety

REPO = Path(__file__).resolve().parents[2]
VOICE = REPO / "data/kb/voice"
WAREHOUSE = REPO / "data/kb/warehouse"
FAULT_CODES: dict[str, dict[str, Any]] = json.loads(
    (WAREHOUSE / "fault_codes.json").read_text(encoding="utf-8"))["codes"]

VOICE_INTENTS = {"device_setup", "connectivity", "troubleshooting", "account_privacy", "routines_automation",
                 "media_audio", "timers_alarms", "lighting", "climate", "security_cameras"}
WAREHOUSE_INTENTS = {"fault_recovery", "safety_rule", "sop", "maintenance", "charging_power", "navigation"}
LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Z]{2})?$")
ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")

# Procedures whose steps break check_plan_safety for their fault's severity. This is a data issue, not a
# checker issue: the fallback rules for the same codes (data/fallback/rules.toml) follow the invariants
# (e.g. fault.E203.fl.loaded lowers the pallet only after request_assistance; fault.E305 waits for a
# technician). Remove an entry once its passage is fixed (the xfail is strict).
# Empty: every fault procedure passes. (wh-o-sop-power-cut-restart and wh-o-nav-ramp-proc were routine
# procedures tagged with a fault code; the planner would have run them as that fault's recovery plan, so
# the tag was removed.)
KNOWN_UNSAFE_PROCEDURES: dict[str, str] = {}

_VOICE_KB = load_knowledge_base([VOICE])
_WAREHOUSE_KB = load_knowledge_base([WAREHOUSE])


@pytest.fixture(scope="module")
def vocabulary() -> ActionVocabulary:
    return ActionVocabulary.load()


def golden(folder: Path, split: str) -> list[GoldenQuestion]:
    return load_golden(folder, split)


# ---------------------------------------------------------------------------------------------
# Size and coverage


def test_voice_kb_size_and_intents() -> None:
    intents = Counter(p.intent for p in _VOICE_KB.passages)
    assert len(_VOICE_KB) >= 400
    assert len(intents) >= 8
    assert set(intents) <= VOICE_INTENTS
    assert {p.domain for p in _VOICE_KB.passages} == {"smart_home"}


def test_warehouse_kb_size_and_intents() -> None:
    assert len(_WAREHOUSE_KB) >= 300
    assert {p.intent for p in _WAREHOUSE_KB.passages} <= WAREHOUSE_INTENTS
    assert {p.domain for p in _WAREHOUSE_KB.passages} == {"warehouse"}


@pytest.mark.parametrize("kb", [_VOICE_KB, _WAREHOUSE_KB], ids=["voice", "warehouse"])
def test_every_passage_is_complete(kb: KnowledgeBase) -> None:
    for p in kb.passages:
        assert ID.match(p.id), p.id
        assert p.text.strip() and p.intent and p.domain and p.source.strip(), p.id
        assert LOCALE.match(p.locale), f"{p.id}: locale {p.locale!r}"
        assert 0.0 <= p.confidence <= 1.0, p.id


def test_passage_ids_unique_across_both_kbs() -> None:
    ids = [p.id for p in _VOICE_KB.passages + _WAREHOUSE_KB.passages]
    assert [i for i, n in Counter(ids).items() if n > 1] == []
    both = load_knowledge_base([VOICE, WAREHOUSE])  # would raise on a duplicate
    assert len(both) == len(ids)
    assert all(both.passages[both.by_id[i]].id == i for i in ids)


def test_every_raw_line_has_the_required_fields() -> None:
    # The loader fills defaults for optional fields; the files themselves must carry the required ones.
    for path in sorted(VOICE.glob("passages*.jsonl")) + sorted(WAREHOUSE.glob("passages*.jsonl")):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                obj = json.loads(line)
                missing = {"id", "text", "intent", "domain", "locale", "confidence", "source"} - set(obj)
                assert not missing, f"{path.name}:{lineno} misses {missing}"


# ---------------------------------------------------------------------------------------------
# Golden questions


def test_golden_questions() -> None:
    both = load_knowledge_base([VOICE, WAREHOUSE])
    total = 0
    for folder, kb in ((VOICE, _VOICE_KB), (WAREHOUSE, _WAREHOUSE_KB)):
        train, dev = golden(folder, "train"), golden(folder, "dev")
        assert train and dev, folder
        total += len(train) + len(dev)
        for q in train + dev:
            assert q.question.strip() and q.relevant, q.id
            for pid in q.relevant:
                assert pid in both.by_id, f"{q.id}: relevant passage {pid!r} does not exist"
                assert pid in kb.by_id, f"{q.id}: relevant passage {pid!r} is in the other KB"
        assert not {q.id for q in train} & {q.id for q in dev}
        norm = lambda q: " ".join(q.question.lower().split())  # noqa: E731
        overlap = {norm(q) for q in train} & {norm(q) for q in dev}
        assert not overlap, f"questions in both train and dev: {sorted(overlap)[:5]}"
    assert total >= 300


def test_golden_ids_unique() -> None:
    ids = [q.id for f in (VOICE, WAREHOUSE) for s in ("train", "dev") for q in golden(f, s)]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# Warehouse procedures

_WITH_STEPS = [p for p in _WAREHOUSE_KB.passages if p.steps]
_FAULT_PROCEDURES = [p for p in _WITH_STEPS if p.fault_code]


@pytest.mark.parametrize("passage", _WITH_STEPS, ids=lambda p: p.id)
def test_steps_parse(vocabulary: ActionVocabulary, passage: Passage) -> None:
    steps = vocabulary.parse_steps(passage.steps)
    assert len(steps) == len(passage.steps)


def test_fault_codes_of_passages_exist() -> None:
    unknown = {p.id: p.fault_code for p in _WAREHOUSE_KB.passages if p.fault_code and p.fault_code not in FAULT_CODES}
    assert unknown == {}
    assert not [p.id for p in _VOICE_KB.passages if p.fault_code or p.steps]


def test_every_fault_code_has_a_procedure() -> None:
    covered = {p.fault_code for p in _FAULT_PROCEDURES}
    assert sorted(set(FAULT_CODES) - covered) == []


def test_known_unsafe_list_is_current() -> None:
    assert set(KNOWN_UNSAFE_PROCEDURES) <= {p.id for p in _FAULT_PROCEDURES}


@pytest.mark.parametrize("passage", [
    pytest.param(p, id=p.id, marks=pytest.mark.xfail(strict=True, reason=f"data: {KNOWN_UNSAFE_PROCEDURES[p.id]}"))
    if p.id in KNOWN_UNSAFE_PROCEDURES else pytest.param(p, id=p.id)
    for p in _FAULT_PROCEDURES
])
def test_fault_procedures_pass_the_safety_check(vocabulary: ActionVocabulary, passage: Passage) -> None:
    steps = vocabulary.parse_steps(passage.steps)
    severity = FAULT_CODES[passage.fault_code]["severity"]
    assert check_plan_safety(steps, severity=severity, carrying_load=False, people_involved=False) == []


# ---------------------------------------------------------------------------------------------
# Malformed files

GOOD: dict[str, Any] = {"id": "p-1", "text": "Hold the button for 10 seconds.", "intent": "troubleshooting",
                        "domain": "smart_home", "locale": "en-US", "confidence": 0.9, "source": "Guide"}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def load_error(folder: Path) -> str:
    with pytest.raises(KnowledgeBaseError) as caught:
        load_knowledge_base([folder])
    return str(caught.value)


def test_loads_a_good_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "passages.jsonl", [GOOD, "", {**GOOD, "id": "p-2", "fault_code": "e101", "steps": []}])
    kb = load_knowledge_base([tmp_path])
    assert [p.id for p in kb.passages] == ["p-1", "p-2"]
    assert kb.passages[1].fault_code == "E101"  # upper-cased
    assert kb.values("intent") == {"troubleshooting"}


def test_invalid_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "passages.jsonl", [GOOD, "", '{"id": "p-2", "text": '])
    msg = load_error(tmp_path)
    assert f"{path}:3" in msg and "not valid JSON" in msg  # blank lines still count


@pytest.mark.parametrize("field", ["id", "text", "intent", "domain", "locale", "confidence", "source"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    obj = {k: v for k, v in GOOD.items() if k != field}
    path = write_jsonl(tmp_path / "passages.jsonl", [{**GOOD, "id": "p-0"}, obj])
    msg = load_error(tmp_path)
    assert f"{path}:2" in msg and f"missing field '{field}'" in msg


@pytest.mark.parametrize(("field", "value"), [("confidence", "high"), ("confidence", True), ("text", 5), ("id", None)])
def test_wrong_field_type(tmp_path: Path, field: str, value: Any) -> None:
    path = write_jsonl(tmp_path / "passages.jsonl", [{**GOOD, field: value}])
    msg = load_error(tmp_path)
    assert f"{path}:1" in msg and f"field '{field}'" in msg


def test_duplicate_id_across_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "passages_a.jsonl", [GOOD])
    second = write_jsonl(tmp_path / "passages_b.jsonl", [{**GOOD, "id": "p-9"}, GOOD])
    msg = load_error(tmp_path)
    assert f"{second}:2" in msg and "duplicate passage id 'p-1'" in msg


def test_duplicate_id_across_folders(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a/passages.jsonl", [GOOD])
    write_jsonl(tmp_path / "b/passages.jsonl", [GOOD])
    with pytest.raises(KnowledgeBaseError, match="duplicate passage id 'p-1'"):
        load_knowledge_base([tmp_path / "a", tmp_path / "b"])


@pytest.mark.parametrize("confidence", [1.5, -0.1])
def test_confidence_outside_unit_interval(tmp_path: Path, confidence: float) -> None:
    path = write_jsonl(tmp_path / "passages.jsonl", [{**GOOD, "confidence": confidence}])
    msg = load_error(tmp_path)
    assert f"{path}:1" in msg and "confidence" in msg and "[0, 1]" in msg


def test_bad_id_empty_text_and_bad_steps(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "passages.jsonl", [{**GOOD, "id": "Bad Id"}])
    assert "'Bad Id'" in load_error(tmp_path)
    write_jsonl(tmp_path / "passages.jsonl", [{**GOOD, "text": "   "}])
    assert "field 'text' is empty" in load_error(tmp_path)
    write_jsonl(tmp_path / "passages.jsonl", [{**GOOD, "steps": ["stop"]}])
    assert "'steps'" in load_error(tmp_path)
    write_jsonl(tmp_path / "passages.jsonl", [[GOOD]])
    assert "expected a JSON object" in load_error(tmp_path)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "golden_train.jsonl").write_text("", encoding="utf-8")  # not a passages file
    msg = load_error(tmp_path)
    assert str(tmp_path) in msg and "no passages*.jsonl" in msg


def test_malformed_golden_question(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "golden_train.jsonl", [
        {"id": "q-1", "question": "reset plug", "relevant": ["p-1"]},
        {"id": "q-2", "question": "no relevant field"},
    ])
    with pytest.raises(KnowledgeBaseError, match=re.escape(f"{path}:2")):
        load_golden(tmp_path, "train")
    assert load_golden(tmp_path, "dev") == []
