"""Unit tests: plan types, the action-vocabulary validator, check_plan_safety, and the rules loader
rejecting malformed rule files with a message that names the rule id and field."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from server.fallback import FallbackPlanner, RobotSituation, RulesError
from server.robot_plan import (
    ActionVocabulary,
    ParamValue,
    PlanStep,
    PlanValidationError,
    check_plan_safety,
    hold_load_after_stop,
)

REPO = Path(__file__).resolve().parents[2]
RULES_TEXT = (REPO / "data/fallback/rules.toml").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def vocabulary() -> ActionVocabulary:
    return ActionVocabulary.load()


def problems_of(vocabulary: ActionVocabulary, raw: Any) -> tuple[str, ...]:
    with pytest.raises(PlanValidationError) as caught:
        vocabulary.parse_steps(raw)
    return caught.value.problems


# ---------------------------------------------------------------------------------------------
# PlanStep


def test_plan_step_is_immutable_and_hashable() -> None:
    params = {"distance_m": 1.0}
    step = PlanStep("reverse", params)
    params["distance_m"] = 9.0  # the caller's dict is copied, not shared
    assert step.params["distance_m"] == 1.0
    with pytest.raises(TypeError):
        step.params["distance_m"] = 2.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        step.action = "stop"  # type: ignore[misc]
    assert step == PlanStep("reverse", {"distance_m": 1.0})
    assert hash(step) == hash(PlanStep("reverse", {"distance_m": 1.0}))
    assert len({step, PlanStep("reverse", {"distance_m": 1.0}), PlanStep("stop")}) == 2
    assert PlanStep("stop").params == {}
    assert step.as_dict() == {"action": "reverse", "params": {"distance_m": 1.0}}


# ---------------------------------------------------------------------------------------------
# ActionVocabulary


def test_load_reads_every_action(vocabulary: ActionVocabulary) -> None:
    data = json.loads((REPO / "data/kb/warehouse/actions.json").read_text(encoding="utf-8"))
    assert vocabulary.names == frozenset(data["actions"])
    assert vocabulary.spec("reverse").params == {"distance_m": float}


def test_parse_valid_plan_canonicalises_floats(vocabulary: ActionVocabulary) -> None:
    steps = vocabulary.parse_steps(
        [
            {"action": "stop"},
            {"action": "wait", "params": {"seconds": 5}},
            {"action": "reverse", "params": {"distance_m": 2.0}},
            {"action": "retry_task", "params": {"max_attempts": 2}},
            {"action": "request_assistance", "params": {"reason": "E202 at A12"}},
        ]
    )
    assert [step.action for step in steps] == ["stop", "wait", "reverse", "retry_task", "request_assistance"]
    assert isinstance(steps[1].params["seconds"], float)  # int accepted for a float param
    assert isinstance(steps[3].params["max_attempts"], int)
    assert vocabulary.validate(steps) == []


def test_unknown_action_names_the_valid_choices(vocabulary: ActionVocabulary) -> None:
    (problem,) = problems_of(vocabulary, [{"action": "fly", "params": {}}])
    assert problem.startswith("steps[0].action: unknown action 'fly'")
    assert "valid actions:" in problem
    for name in ("emergency_stop", "request_assistance", "stop"):
        assert name in problem
    with pytest.raises(KeyError, match="valid actions"):
        vocabulary.spec("fly")


def test_missing_param(vocabulary: ActionVocabulary) -> None:
    (problem,) = problems_of(vocabulary, [{"action": "stop"}, {"action": "reverse", "params": {}}])
    assert problem == "steps[1].params.distance_m: missing required parameter (float)"


def test_extra_param(vocabulary: ActionVocabulary) -> None:
    (problem,) = problems_of(vocabulary, [{"action": "stop", "params": {"speed": 1}}])
    assert problem == "steps[0].params.speed: unexpected parameter; stop takes no parameters"


def test_wrong_type_names_step_index_and_field(vocabulary: ActionVocabulary) -> None:
    raw: list[dict[str, Any]] = [
        {"action": "stop"},
        {"action": "wait", "params": {"seconds": 1}},
        {"action": "reverse", "params": {"distance_m": "far"}},
    ]
    with pytest.raises(PlanValidationError, match=r"steps\[2\]\.params\.distance_m: expected float, got 'far'"):
        vocabulary.parse_steps(raw)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            {"action": "retry_task", "params": {"max_attempts": True}},
            "steps[0].params.max_attempts: expected int, got True",
        ),
        ({"action": "wait", "params": {"seconds": False}}, "steps[0].params.seconds: expected float, got False"),
        ({"action": "lower_load", "params": {"height_mm": 1.5}}, "steps[0].params.height_mm: expected int, got 1.5"),
        ({"action": "move_to", "params": {"location": 3}}, "steps[0].params.location: expected str, got 3"),
        ({"action": "move_to", "params": {"location": "  "}}, "steps[0].params.location: expected a non-empty str"),
    ],
    ids=["bool-for-int", "bool-for-float", "float-for-int", "int-for-str", "blank-str"],
)
def test_type_errors(vocabulary: ActionVocabulary, step: dict[str, Any], expected: str) -> None:
    assert problems_of(vocabulary, [step]) == (expected,)


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        ({"action": "reverse", "params": {"distance_m": 2.5}}, "steps[0].params.distance_m: must be <= 2.0 m, got 2.5"),
        ({"action": "wait", "params": {"seconds": -1}}, "steps[0].params.seconds: must be >= 0, got -1"),
        ({"action": "lower_load", "params": {"height_mm": -10}}, "steps[0].params.height_mm: must be >= 0"),
        ({"action": "set_speed_limit", "params": {"mps": float("nan")}}, "expected a finite float"),
        ({"action": "wait", "params": {"seconds": float("inf")}}, "expected a finite float"),
        ({"action": "notify_operator", "params": {"message": "x" * 201}}, "at most 200 characters"),
    ],
    ids=["reverse-too-far", "negative-wait", "negative-height", "nan", "inf", "long-text"],
)
def test_limits(vocabulary: ActionVocabulary, step: dict[str, Any], fragment: str) -> None:
    (problem,) = problems_of(vocabulary, [step])
    assert fragment in problem


def test_reverse_at_the_limit_is_fine(vocabulary: ActionVocabulary) -> None:
    assert vocabulary.parse_steps([{"action": "reverse", "params": {"distance_m": 2}}])[0].params["distance_m"] == 2.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("stop", "steps: expected a list of steps, got 'stop'"),
        ([], "steps: a plan needs at least one step"),
        ([{"action": "stop"}] * 33, "steps: at most 32 steps, got 33"),
        (["stop"], "steps[0]: expected an object with 'action' and 'params', got 'stop'"),
        ([{"action": 7}], "steps[0].action: expected str, got 7"),
        ([{"action": "wait", "params": [5]}], "steps[0].params: expected an object, got [5]"),
    ],
    ids=["string", "empty", "too-long", "step-not-object", "action-not-str", "params-not-object"],
)
def test_structure_errors(vocabulary: ActionVocabulary, raw: Any, expected: str) -> None:
    assert problems_of(vocabulary, raw) == (expected,)


def test_extra_step_field_and_every_problem_reported(vocabulary: ActionVocabulary) -> None:
    problems = problems_of(
        vocabulary,
        [
            {"action": "stop", "why": "because"},
            {"action": "reverse", "params": {"distance_m": 5.0}},
            {"action": "jump"},
        ],
    )
    assert problems[0] == "steps[0].why: unexpected field; a step has only 'action' and 'params'"
    assert problems[1].startswith("steps[1].params.distance_m: must be <= 2.0")
    assert problems[2].startswith("steps[2].action: unknown action 'jump'")
    error = PlanValidationError(problems)
    assert isinstance(error, ValueError) and str(error) == "; ".join(problems)


def test_validate_built_steps(vocabulary: ActionVocabulary) -> None:
    assert vocabulary.validate([PlanStep("stop"), PlanStep("wait", {"seconds": 3.0})]) == []
    assert vocabulary.validate([PlanStep("stop"), PlanStep("reverse", {"distance_m": 4.0})]) == [
        "steps[1].params.distance_m: must be <= 2.0 m, got 4.0"
    ]
    assert vocabulary.validate([PlanStep("retry_task", {"max_attempts": True})]) == [
        "steps[0].params.max_attempts: expected int, got True"
    ]
    assert vocabulary.validate([]) == ["steps: a plan needs at least one step"]
    assert vocabulary.validate(["stop"]) == ["steps[0]: expected a PlanStep, got 'stop'"]  # type: ignore[list-item]


def test_vocabulary_rejects_unknown_param_type() -> None:
    with pytest.raises(ValueError, match=r"actions\.fly\.params\.height: unknown type 'meters'"):
        ActionVocabulary.from_json({"actions": {"fly": {"params": {"height": "meters"}}}})


# ---------------------------------------------------------------------------------------------
# check_plan_safety


def plan(*names: str) -> tuple[PlanStep, ...]:
    params: dict[str, dict[str, ParamValue]] = {
        "reverse": {"distance_m": 1.0},
        "move_to": {"location": "dock"},
        "wait": {"seconds": 1.0},
        "request_assistance": {"reason": "help"},
        "lower_load": {"height_mm": 0},
        "reset_fault": {"code": "E100"},
        "retry_task": {"max_attempts": 1},
    }
    return tuple(PlanStep(name, params.get(name, {})) for name in names)


def safety(
    steps: Sequence[PlanStep], severity: str | None = None, carrying: bool = False, people: bool = False
) -> list[str]:
    return check_plan_safety(steps, severity=severity, carrying_load=carrying, people_involved=people)


def test_safe_plans_pass() -> None:
    assert safety(plan("stop", "request_assistance", "move_to"), "critical", people=True) == []
    assert (
        safety(plan("stop", "hold_load", "wait", "request_assistance", "lower_load"), "critical", carrying=True) == []
    )
    assert safety(plan("set_speed_limit", "return_to_dock"), "minor") == []
    assert safety(plan("stop", "reset_fault", "release_brake", "move_to"), "major") == []


def test_people_require_stop_first_and_no_motion_before_help() -> None:
    assert safety(plan("move_to", "stop", "request_assistance"), people=True)[0].startswith(
        "steps[0].action: must be stop or emergency_stop when people are involved, got 'move_to'"
    )
    assert safety(plan("stop", "reverse", "request_assistance"), people=True) == [
        "steps[1].action: reverse before request_assistance while people are involved"
    ]
    assert safety(plan("stop", "wait"), people=True) == [
        "steps: request_assistance is required when people are involved"
    ]


def test_critical_and_major_faults() -> None:
    assert safety(plan("stop", "reset_fault", "request_assistance"), "critical") == [
        "steps[1].action: reset_fault before request_assistance while the fault is critical"
    ]
    assert safety(plan("pause_task", "stop"), "major") == [
        "steps[0].action: must be stop or emergency_stop when the fault is major, got 'pause_task'"
    ]
    assert safety(plan("pause_task", "stop"), "minor") == []


def test_emergency_stop_gates_motion_until_help() -> None:
    assert safety(plan("emergency_stop", "retry_task")) == [
        "steps[1].action: retry_task before request_assistance while drive power was cut by emergency_stop"
    ]
    assert safety(plan("emergency_stop", "request_assistance", "retry_task")) == []


def test_release_brake_needs_reset_or_technician() -> None:
    assert safety(plan("stop", "release_brake")) == [
        "steps[1].action: release_brake before reset_fault or request_assistance"
    ]


def test_loaded_robot_invariants() -> None:
    assert "steps[0].action: lower_load before any stop while carrying a load" in safety(
        plan("lower_load", "stop"), carrying=True
    )
    assert safety(plan("stop", "wait", "hold_load"), carrying=True) == [
        "steps[1].action: wait before hold_load while carrying a load"
    ]
    assert safety(plan("stop", "wait"), carrying=False) == []


def test_empty_plan_and_bad_severity() -> None:
    assert safety(()) == ["steps: empty plan; a fallback must at least stop the robot"]
    with pytest.raises(ValueError, match="unknown severity 'fatal'"):
        safety(plan("stop"), "fatal")


def test_hold_load_after_stop() -> None:
    loaded = hold_load_after_stop(plan("stop", "wait"))
    assert [step.action for step in loaded] == ["stop", "hold_load", "wait"]
    assert hold_load_after_stop(loaded) == loaded
    assert [step.action for step in hold_load_after_stop(plan("return_to_dock"))] == ["hold_load", "return_to_dock"]


# ---------------------------------------------------------------------------------------------
# rules.py: malformed rules files are rejected at load, naming the rule id and field


def load_with(tmp_path: Path, text: str, fault_codes: dict[str, Any] | None = None) -> FallbackPlanner:
    rules = tmp_path / "rules.toml"
    rules.write_text(text, encoding="utf-8")
    codes_path = None
    if fault_codes is not None:
        codes_path = tmp_path / "fault_codes.json"
        codes_path.write_text(json.dumps(fault_codes), encoding="utf-8")
    return FallbackPlanner.load(rules, fault_codes_path=codes_path)


def extra_fault_rule(rule_id: str, body: str) -> str:
    return RULES_TEXT + f'\n[[fault_rule]]\nid = "{rule_id}"\n{body}\n'


def test_shipped_rules_load(tmp_path: Path) -> None:
    planner = load_with(tmp_path, RULES_TEXT)  # the reference text itself is valid
    assert planner.plan(RobotSituation("amr-1", fault_code="E100")).rule_id == "fault.E100"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            RULES_TEXT.replace(
                '{ action = "reboot_subsystem", params = { subsystem = "drive" } },', '{ action = "fly_away" },'
            ),
            ["fault_rule 'fault.E102'", "'steps'", "unknown action 'fly_away'"],
        ),
        (
            RULES_TEXT.replace(
                '{ action = "set_speed_limit", params = { mps = 0.3 } },\n  { action = "reset_fault"',
                '{ action = "set_speed_limit", params = { mps = "slow" } },\n  { action = "reset_fault"',
            ),
            ["fault_rule 'fault.E103'", "steps[1].params.mps: expected float, got 'slow'"],
        ),
        (
            extra_fault_rule(
                "fault.E202.pk",
                'code = "E202"\nmodels = ["pk"]\nreason = "Go."\n'
                'steps = [{ action = "move_to", params = { location = "dock" } }, { action = "stop" }]',
            ),
            ["fault_rule 'fault.E202.pk'", "unsafe", "must be stop or emergency_stop"],
        ),
        (
            extra_fault_rule(
                "fault.E100.pk",
                'code = "E100"\nmodels = ["pk"]\nreason = "Stop at {place}."\nsteps = [{ action = "stop" }]',
            ),
            ["fault_rule 'fault.E100.pk'", "'reason'", "unknown placeholder {place}"],
        ),
        (
            extra_fault_rule(
                "fault.E100.pk",
                'code = "E100"\nmodels = ["pk"]\ncarrying = true\nreason = "Stop."\nsteps = [{ action = "stop" }]',
            ),
            ["fault_rule 'fault.E100.pk'", "field 'carrying'", "unknown field"],
        ),
        (
            extra_fault_rule(
                "fault.E100", 'code = "E100"\nmodels = ["pk"]\nreason = "Stop."\nsteps = [{ action = "stop" }]'
            ),
            ["fault_rule 'fault.E100'", "duplicate rule id"],
        ),
        (
            extra_fault_rule(
                "fault.E100.pk",
                'code = "E100"\nmodels = ["pk"]\nreason = "Stop."\n'
                'steps = [{ action = "stop" }, { action = "hold_load" }]',
            ),
            ["fault_rule 'fault.E100.pk'", "steps[1]", "hold_load is added automatically"],
        ),
        (
            extra_fault_rule(
                "fault.E401.amr",
                'code = "E401"\nmodels = ["amr"]\nreason = "Stop."\n'
                'steps = [{ action = "stop" }, { action = "request_assistance", params = { reason = "x" } }]',
            ),
            ["ambiguous", "fault.E401.amr", "amr robot on E401"],
        ),
        (
            extra_fault_rule(
                "fault.E100.xx", 'code = "E100"\nmodels = ["xx"]\nreason = "Stop."\nsteps = [{ action = "stop" }]'
            ),
            ["fault_rule 'fault.E100.xx'", "field 'models'", "unknown ['xx']"],
        ),
        (
            extra_fault_rule("fault.E555", 'code = "E555"\nreason = "Stop."\nsteps = [{ action = "stop" }]'),
            ["fault_rule 'fault.E555'", "field 'code'", "not in fault_codes.json"],
        ),
        (
            RULES_TEXT
            + '\n[[voice_rule]]\nid = "voice.too_long"\ntier = "topic"\nkeywords = ["x"]\ntext = "'
            + "word " * 70
            + 'end."\n',
            ["voice_rule 'voice.too_long'", "field 'text'", "at most 59 words"],
        ),
        (
            RULES_TEXT
            + '\n[[voice_rule]]\nid = "voice.no_stop"\ntier = "topic"\nkeywords = ["x"]\ntext = "No full stop"\n',
            ["voice_rule 'voice.no_stop'", "field 'text'", "ends with"],
        ),
        (
            RULES_TEXT + '\n[[keyword_rule]]\nid = "people.bad"\ntier = "people"\nmatch_in = ["state"]\n'
            'keywords = ["ghost"]\nreason = "Go."\nsteps = [{ action = "stop" }, '
            '{ action = "move_to", params = { location = "x" } }, '
            '{ action = "request_assistance", params = { reason = "x" } }]\n',
            ["keyword_rule 'people.bad'", "move_to before request_assistance while people are involved"],
        ),
        (RULES_TEXT.replace("schema = 1", "schema = 1\n[[fault_rule\n"), ["not valid TOML"]),
    ],
    ids=[
        "unknown-action",
        "wrong-param-type",
        "unsafe-critical-plan",
        "unknown-placeholder",
        "typo-field",
        "duplicate-id",
        "hold-load-without-load",
        "ambiguous-variants",
        "unknown-model",
        "unknown-code",
        "voice-too-long",
        "voice-no-punctuation",
        "people-rule-moves-first",
        "bad-toml",
    ],
)
def test_malformed_rules_are_rejected(tmp_path: Path, text: str, fragments: list[str]) -> None:
    with pytest.raises(RulesError) as caught:
        load_with(tmp_path, text)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


def test_fault_code_without_rule_is_rejected(tmp_path: Path) -> None:
    codes = json.loads((REPO / "data/kb/warehouse/fault_codes.json").read_text(encoding="utf-8"))
    codes["codes"]["E999"] = {"name": "New fault", "subsystem": "drive", "severity": "major"}
    with pytest.raises(RulesError, match="fault code E999 has no rule for an empty amr robot"):
        load_with(tmp_path, RULES_TEXT, codes)
