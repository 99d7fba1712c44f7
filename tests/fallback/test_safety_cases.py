"""The fallback planner's safety-case suite: every case in robot_cases.toml and voice_cases.toml.

Beyond each case's own expectations, every robot plan is checked with the vocabulary validator and
with check_plan_safety, using a severity and people flag this test derives on its own (fault table +
its own keyword lists), so a planner bug cannot vouch for itself.
"""

from __future__ import annotations

import json
import math
import random
import re
import tomllib
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.fallback import FallbackAnswer, FallbackPlan, FallbackPlanner, RobotSituation
from server.robot_plan import HALT_ACTIONS, ActionVocabulary, PlanStep, check_plan_safety

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAULT_CODES: Mapping[str, Mapping[str, str]] = json.loads(
    (REPO / "data/kb/warehouse/fault_codes.json").read_text(encoding="utf-8")
)["codes"]
ROBOT_CASES: list[dict[str, Any]] = tomllib.loads((HERE / "robot_cases.toml").read_text(encoding="utf-8"))["case"]
VOICE_CASES: list[dict[str, Any]] = tomllib.loads((HERE / "voice_cases.toml").read_text(encoding="utf-8"))["case"]

SITUATION_KEYS = {"robot_id", "task", "fault_code", "state", "location", "carrying_load", "battery_pct"}
EXPECTATION_KEYS = {
    "id",
    "rule",
    "rule_prefix",
    "first_action_in",
    "must_include",
    "must_not_include",
    "must_not_include_before",
    "params_contain",
    "severity",
    "people",
    "record",
    "record_accepted",
}
VOICE_KEYS = {"id", "query", "intent", "rule", "must_contain", "must_not_contain"}

# The test's own reading of the brief, independent of rules.toml.
PEOPLE_CODES = {"E304", "E305", "E600", "E603"}
PEOPLE_WORDS = {
    "person",
    "persons",
    "people",
    "human",
    "humans",
    "pedestrian",
    "pedestrians",
    "worker",
    "workers",
    "someone",
    "collision",
    "injured",
    "hit",
    "estop",
}
HAZARD_WORDS = {"smoke", "fire", "spill", "leak", "leaking", "sparks", "burning", "fell"}
SEVERITY_ORDER = ["minor", "major", "critical"]


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def vocabulary() -> ActionVocabulary:
    return ActionVocabulary.load()


@pytest.fixture(scope="module")
def planner(vocabulary: ActionVocabulary) -> FallbackPlanner:
    return FallbackPlanner.load(vocabulary=vocabulary)


def situation_of(case: Mapping[str, Any]) -> RobotSituation:
    return RobotSituation(**{key: case[key] for key in SITUATION_KEYS if key in case})


def _words(text: str) -> set[str]:
    # Same conventions as the rules file documents: NFKC, case-folded, apostrophes dropped, words
    # are runs of letters and digits.
    folded = unicodedata.normalize("NFKC", text).casefold().translate({ord(c): None for c in "'\u2019\u02bc"})
    return set(re.findall(r"[^\W_]+", folded))


def _code(raw: str) -> str:
    return re.sub(r"[\s_-]", "", unicodedata.normalize("NFKC", raw)).upper()


def derived_people(case: Mapping[str, Any]) -> bool:
    if "people" in case:
        return bool(case["people"])
    text = _words(case.get("state", "")) | _words(case.get("task", ""))
    return _code(case.get("fault_code", "")) in PEOPLE_CODES or bool(text & PEOPLE_WORDS)


def derived_severity(case: Mapping[str, Any]) -> str | None:
    """The worst severity the situation implies: fault table, critical battery, hazards, people."""
    if "severity" in case:
        return str(case["severity"])
    found: list[str] = []
    entry = FAULT_CODES.get(_code(case.get("fault_code", "")))
    if entry:
        found.append(entry["severity"])
    battery = case.get("battery_pct")
    if isinstance(battery, float) and not math.isnan(battery) and 0 <= battery <= 5:
        found.append("major")
    if _words(case.get("state", "")) & HAZARD_WORDS or derived_people(case):
        found.append("critical")
    return max(found, key=SEVERITY_ORDER.index) if found else None


def actions(plan: FallbackPlan) -> list[str]:
    return [step.action for step in plan.steps]


def check_invariants(
    plan: FallbackPlan, vocabulary: ActionVocabulary, *, severity: str | None, carrying_load: bool, people: bool
) -> None:
    """What must hold for every robot plan the fallback ever returns."""
    assert vocabulary.validate(plan.steps) == [], plan
    assert (
        check_plan_safety(plan.steps, severity=severity, carrying_load=carrying_load, people_involved=people) == []
    ), plan
    names = actions(plan)
    if carrying_load:
        assert "hold_load" in names, plan
        halt = next((i for i, name in enumerate(names) if name in HALT_ACTIONS), None)
        if halt is not None:
            assert names[halt + 1] == "hold_load", f"hold_load must come right after the stop: {names}"
            assert "lower_load" not in names[:halt], names
    assert plan.rule_id, plan
    assert plan.reason.strip() and plan.reason.rstrip().endswith((".", "!")), plan.reason
    texts = [plan.reason] + [value for step in plan.steps for value in step.params.values() if isinstance(value, str)]
    for text in texts:
        assert text.strip(), plan
        assert not any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text), f"unprintable in {text!r}"


def record_steps(raw: Sequence[Mapping[str, Any]]) -> tuple[PlanStep, ...]:
    # Built directly, not parsed: invalid steps must reach record_safe_plan to be refused there.
    return tuple(PlanStep(item["action"], item.get("params", {})) for item in raw)


# ---------------------------------------------------------------------------------------------
# The case files themselves


def test_case_files_are_well_formed() -> None:
    for cases, allowed in ((ROBOT_CASES, SITUATION_KEYS | EXPECTATION_KEYS), (VOICE_CASES, VOICE_KEYS)):
        ids = [case["id"] for case in cases]
        assert len(ids) == len(set(ids)), "duplicate case ids"
        for case in cases:
            assert set(case) <= allowed, f"{case['id']}: unknown keys {set(case) - allowed}"
    assert len(ROBOT_CASES) >= 70
    assert len(VOICE_CASES) >= 45


def test_cases_cover_every_fault_code_and_model(planner: FallbackPlanner) -> None:
    covered = {_code(case.get("fault_code", "")) for case in ROBOT_CASES}
    assert set(FAULT_CODES) <= covered, f"fault codes without a case: {sorted(set(FAULT_CODES) - covered)}"
    prefixes = {re.match(r"[a-z]*", case["robot_id"].lower()).group() for case in ROBOT_CASES}  # type: ignore[union-attr]
    assert {"amr", "fl", "pk"} <= prefixes
    assert any(case["rule"].startswith("safe.generic") for case in ROBOT_CASES if "rule" in case)
    assert {True, False} <= {case.get("carrying_load", False) for case in ROBOT_CASES}


# ---------------------------------------------------------------------------------------------
# Robot cases


@pytest.mark.parametrize("case", ROBOT_CASES, ids=[case["id"] for case in ROBOT_CASES])
def test_robot_case(case: dict[str, Any], planner: FallbackPlanner, vocabulary: ActionVocabulary) -> None:
    if "record" in case:
        planner = FallbackPlanner.load(vocabulary=vocabulary)  # recording is state: keep it per case
        accepted = planner.record_safe_plan(case["robot_id"], record_steps(case["record"]))
        assert accepted is case["record_accepted"]

    situation = situation_of(case)
    plan = planner.plan(situation)
    names = actions(plan)

    check_invariants(
        plan,
        vocabulary,
        severity=derived_severity(case),
        carrying_load=situation.carrying_load,
        people=derived_people(case),
    )
    assert planner.plan(situation) == plan, "same input twice must give the identical plan"

    if "rule" in case:
        assert plan.rule_id == case["rule"], plan
    if "rule_prefix" in case:
        assert plan.rule_id.startswith(case["rule_prefix"]), plan
    if "first_action_in" in case:
        assert names[0] in case["first_action_in"], names
    for name in case.get("must_include", []):
        assert name in names, f"{name} missing from {names}"
    for name in case.get("must_not_include", []):
        assert name not in names, f"{name} must not be in {names}"
    for before, anchor in case.get("must_not_include_before", []):
        cut = names.index(anchor) if anchor in names else len(names)
        assert before not in names[:cut], f"{before} before {anchor} in {names}"
    for action, param, text in case.get("params_contain", []):
        values = [str(step.params.get(param, "")) for step in plan.steps if step.action == action]
        assert any(text in value for value in values), f"{action}.{param} should contain {text!r}: {values}"


def test_recorded_plan_is_the_safe_plan(vocabulary: ActionVocabulary) -> None:
    planner = FallbackPlanner.load(vocabulary=vocabulary)
    default = planner.safe_plan("amr-200")
    assert default and default[0].action == "stop"
    good = (PlanStep("stop"), PlanStep("wait", {"seconds": 5.0}), PlanStep("return_to_dock"))
    assert planner.record_safe_plan(" AMR-200 ", good)
    assert planner.safe_plan("amr-200") == good
    assert actions_of(planner.safe_plan("amr-200", carrying_load=True)) == [
        "stop",
        "hold_load",
        "wait",
        "return_to_dock",
    ]
    # An unsafe plan is refused and leaves the last good one in place.
    assert not planner.record_safe_plan("amr-200", (PlanStep("move_to", {"location": "dock"}),))
    assert planner.safe_plan("amr-200") == good
    assert not planner.record_safe_plan("", good)


def test_remembered_plans_follow_a_recorded_safe_plan_and_survive_odd_input(vocabulary: ActionVocabulary) -> None:
    planner = FallbackPlanner.load(vocabulary=vocabulary)
    unmatched = RobotSituation("amr-201", state="idle")  # no rule: the model family's safe plan
    first = planner.plan(unmatched)
    assert planner.plan(RobotSituation("amr-201", state="idle")) is first  # remembered
    good = (PlanStep("stop"), PlanStep("wait", {"seconds": 5.0}), PlanStep("return_to_dock"))
    assert planner.record_safe_plan("amr-201", good)
    after = planner.plan(unmatched)
    assert after.steps == good and after.rule_id != first.rule_id  # not the remembered plan from before
    # Untrusted fields of unhashable types still get a plan (the memo is skipped), the same one each time.
    odd = RobotSituation("amr-201", state=["person", "ahead"])  # type: ignore[arg-type]
    assert planner.plan(odd) == planner.plan(odd)


def actions_of(steps: Sequence[PlanStep]) -> list[str]:
    return [step.action for step in steps]


def test_two_planners_agree_on_every_case(vocabulary: ActionVocabulary) -> None:
    first, second = FallbackPlanner.load(vocabulary=vocabulary), FallbackPlanner.load()
    for case in ROBOT_CASES:
        if "record" not in case:
            assert first.plan(situation_of(case)) == second.plan(situation_of(case)), case["id"]
    for case in VOICE_CASES:
        assert first.answer(case["query"], case.get("intent")) == second.answer(case["query"], case.get("intent"))


def test_every_rule_is_safe_for_every_model_and_load(planner: FallbackPlanner, vocabulary: ActionVocabulary) -> None:
    """The loader checks this too; here it is checked through the public API with real situations."""
    book = planner.rulebook
    robots = {"amr": "amr-001", "fl": "fl-001", "pk": "pk-001", "generic": "zz-001"}
    for (code, model, carrying), rule in book.fault_rules.items():
        plan = planner.plan(RobotSituation(robots[model], fault_code=code, location="aisle B7", carrying_load=carrying))
        assert plan.rule_id == rule.id
        check_invariants(
            plan, vocabulary, severity=FAULT_CODES[code]["severity"], carrying_load=carrying, people=rule.people
        )
    for robot_id in robots.values():
        for carrying in (False, True):
            steps = planner.safe_plan(robot_id, carrying_load=carrying)
            assert vocabulary.validate(steps) == []
            assert check_plan_safety(steps, severity="major", carrying_load=carrying, people_involved=False) == []


def _fuzz_texts(seed: int, count: int) -> Iterator[str]:
    pool = [
        *"abcdefghijklmnopqrstuvwxyz0123456789 -_.,!?'\"{}%\\/\n\t",
        "\u0000",
        "\u001b",
        "\u202e",
        "\u200b",
        "é",
        "ß",
        "\u0415",  # Cyrillic capital IE, looks like E
        "\uff25",  # full-width E
        "\uff12",  # full-width 2
        "🔥",
        "person",
        " fire ",
        "E202",
        "E304",
        "spill",
        "blocked",
        "{code}",
        "{0}",
        "%s",
    ]
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))


def test_plan_never_fails_on_garbage(planner: FallbackPlanner, vocabulary: ActionVocabulary) -> None:
    rng = random.Random(7)
    texts = list(_fuzz_texts(1, 400))
    for index, text in enumerate(texts):
        battery = rng.choice([None, -5.0, 0.0, 3.0, 5.0, 12.0, 50.0, 101.0, math.nan, math.inf])
        carrying = index % 2 == 0
        situation = RobotSituation(
            robot_id=rng.choice(["amr-1", "fl-2", "pk-3", text]),
            task=texts[index - 1],
            fault_code=text,
            state=texts[index - 2],
            location=texts[index - 3],
            carrying_load=carrying,
            battery_pct=battery,
        )
        plan = planner.plan(situation)
        case = {"fault_code": text, "state": texts[index - 2], "task": texts[index - 1], "battery_pct": battery}
        check_invariants(
            plan, vocabulary, severity=derived_severity(case), carrying_load=carrying, people=derived_people(case)
        )


# ---------------------------------------------------------------------------------------------
# Voice cases


def check_spoken(answer: FallbackAnswer) -> None:
    text = answer.text
    assert text.strip() and answer.rule_id
    assert len(text.split()) < 60, text
    assert text.endswith((".", "!", "?")), text
    assert 1 <= len(re.findall(r"[.!?](?=\s|$)", text)) <= 3, text
    assert "unavailable" in text.lower(), text


@pytest.mark.parametrize("case", VOICE_CASES, ids=[case["id"] for case in VOICE_CASES])
def test_voice_case(case: dict[str, Any], planner: FallbackPlanner) -> None:
    answer = planner.answer(case["query"], case.get("intent"))
    check_spoken(answer)
    assert planner.answer(case["query"], case.get("intent")) == answer
    if "rule" in case:
        assert answer.rule_id == case["rule"], answer
    for phrase in case.get("must_contain", []):
        assert phrase.lower() in answer.text.lower(), f"{phrase!r} missing: {answer.text}"
    for phrase in case.get("must_not_contain", []):
        assert phrase.lower() not in answer.text.lower(), f"{phrase!r} present: {answer.text}"


def test_every_voice_rule_is_speakable(planner: FallbackPlanner) -> None:
    for rule in planner.rulebook.voice_rules:
        check_spoken(FallbackAnswer(rule.text, rule.id))
        if rule.tier == "emergency":
            assert "emergency services" in rule.text, rule.id
        if rule.tier == "security":
            assert "Lumo app" in rule.text and "PIN" in rule.text, rule.id


def test_answer_never_fails_on_garbage(planner: FallbackPlanner) -> None:
    intents = [None, "", "climate", "CLIMATE", "nope", "security_cameras", "{intent}"]
    for index, text in enumerate(_fuzz_texts(2, 400)):
        check_spoken(planner.answer(text, intents[index % len(intents)]))
