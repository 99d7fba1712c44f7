"""The deterministic fallback planner: robot plans and spoken answers from precompiled rules.

It answers when retrieval or generation misses its budget or fails, so it must never fail itself:
no I/O after `load`, no exceptions on any situation or query text, and the same input always gives
the same output (the only state is the per-robot last-known safe plan, which callers set).

Robot plan precedence (first that applies wins):

1. people / collision: a fault code whose rule is marked `people` (E304, E305, E600, E603), else a
   `people` keyword rule on state or task ("person", "worker", "collision", "hit", ...).
2. hazard keyword rules on state ("smoke", "fire alarm", "spill", "sparks", ...).
3. the fault code's rule for the robot's model family and load state. A battery at or below the
   critical (low) threshold counts as the battery-critical (battery-low) fault; when both a reported
   code and the battery apply, the more severe one wins, the reported code on a tie.
4. situation keyword rules on state or task ("blocked", "lost", "stuck", ...).
5. the robot's last-known safe plan (record_safe_plan), else its model family's default safe plan.

A loaded robot always gets hold_load right after its stop (precompiled per rule), and every rule was
checked at load against the vocabulary and check_plan_safety for every model and load state.
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from server.fallback.rules import (
    GENERIC_MODEL,
    MAX_CONTEXT_CHARS,
    FaultCode,
    KeywordIndex,
    RobotRule,
    RobotTier,
    RuleBook,
    VoiceRule,
    load_fault_codes,
    load_rules,
    words,
)
from server.robot_plan import (
    ActionVocabulary,
    PlanStep,
    check_plan_safety,
    hold_load_after_stop,
)

RECORDED_RULE_ID: Final = "safe.recorded"
# record_safe_plan is fed by clients; bound the memory it can take (oldest robot forgotten first).
MAX_RECORDED_ROBOTS: Final = 4096
MEMO_SIZE: Final = 4096
"""Robot situations whose plan is remembered. A fleet reports the same few faults and states over and over
(the Plan handler asks the planner first on every call, on the event loop); the memo is emptied when full
and whenever a recorded safe plan changes what an unmatched situation gets."""

# "E202", "e202", " E202 ", "E-202", "E 202"; NFKC folds full-width letters and digits first.
_FAULT_CODE = re.compile(r"E[\s_-]?(\d{3})")
_ROBOT_PREFIX = re.compile(r"[^\W\d_]+")
_SEVERITY_RANK: Final = {"critical": 0, "major": 1, "minor": 2}
_URGENT_TIERS: Final[tuple[RobotTier, ...]] = ("people", "hazard")
_REFUSAL_TIERS: Final = ("emergency", "security")


@dataclass(frozen=True, slots=True)
class RobotSituation:
    """What the robot controller told us. Every field is untrusted free text."""

    robot_id: str  # "amr-017", "fl-004", "pk-002": model family from the prefix; unknown -> generic
    task: str = ""  # "pick tote T-88 from A12"
    fault_code: str = ""  # "E202" or ""; case and surrounding spaces are ignored
    state: str = ""  # "stopped in aisle A12, pallet on forks, person nearby"
    location: str = ""
    carrying_load: bool = False
    battery_pct: float | None = None  # 0..100; anything else (NaN, -1 sentinels) is ignored


@dataclass(frozen=True, slots=True)
class FallbackPlan:
    steps: tuple[PlanStep, ...]
    rule_id: str
    reason: str  # one human sentence: why this plan


@dataclass(frozen=True, slots=True)
class FallbackAnswer:
    text: str  # spoken: 1-3 sentences, under 60 words
    rule_id: str


class FallbackPlanner:
    """Rule-based robot plans and voice answers; build with `load()` once at startup."""

    __slots__ = (
        "_book",
        "_default_answer",
        "_families",
        "_intent_defaults",
        "_memo",
        "_memo_epoch",
        "_model_names",
        "_record_lock",
        "_recorded",
        "_tier_indexes",
        "_vocabulary",
        "_voice_keywords",
        "_voice_requires",
    )

    def __init__(self, rulebook: RuleBook, vocabulary: ActionVocabulary) -> None:
        self._book = rulebook
        self._vocabulary = vocabulary
        self._families = {prefix: family for family in rulebook.models for prefix in family.prefixes}
        self._model_names = {family.id: family.name for family in rulebook.models}
        self._tier_indexes: Mapping[RobotTier, KeywordIndex] = {
            tier: KeywordIndex([rule.keywords for rule in rules]) for tier, rules in rulebook.keyword_rules.items()
        }
        voice = rulebook.voice_rules
        self._voice_keywords = KeywordIndex([rule.keywords for rule in voice])
        self._voice_requires = KeywordIndex([rule.requires for rule in voice])
        self._intent_defaults = {rule.intent: rule for rule in voice if rule.tier == "intent_default"}
        self._default_answer = next(rule for rule in voice if rule.tier == "default")
        # robot key -> (plan for an empty robot, plan for a loaded one); insertion order = age
        self._recorded: dict[str, tuple[tuple[PlanStep, ...], tuple[PlanStep, ...]]] = {}
        self._record_lock = threading.Lock()
        self._memo: dict[RobotSituation, FallbackPlan] = {}
        self._memo_epoch = 0  # bumped by record_safe_plan: a plan computed before it is not remembered

    @classmethod
    def load(
        cls,
        rules_path: Path | None = None,
        vocabulary: ActionVocabulary | None = None,
        fault_codes_path: Path | None = None,
    ) -> FallbackPlanner:
        """Read and validate everything now; RulesError / ValueError on a bad file."""
        vocabulary = ActionVocabulary.load() if vocabulary is None else vocabulary
        rulebook = load_rules(rules_path, vocabulary=vocabulary, fault_codes=load_fault_codes(fault_codes_path))
        return cls(rulebook, vocabulary)

    @property
    def rulebook(self) -> RuleBook:
        return self._book

    # --- robot plans ---------------------------------------------------------------------------

    def plan(self, situation: RobotSituation) -> FallbackPlan:
        """The rule plan for `situation`: the same situation always gets the same plan (until a recorded
        safe plan changes), so it is remembered."""
        try:
            found = self._memo.get(situation)
        except TypeError:  # a field of an unhashable type (untrusted input): plan it without the memo
            return self._plan(situation)
        if found is None:
            epoch = self._memo_epoch
            found = self._plan(situation)
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            if epoch == self._memo_epoch:
                self._memo[situation] = found
        return found

    def _plan(self, situation: RobotSituation) -> FallbackPlan:
        robot_key = _robot_key(situation.robot_id)
        model = self._model_of(robot_key)
        loaded = bool(situation.carrying_load)  # anything truthy is a load: hold_load is never harmful
        reported = _fault_code(situation.fault_code)
        fault = self._book.fault_codes.get(reported)
        state_words = words(_text(situation.state))
        task_words = words(_text(situation.task))

        rule: RobotRule | None = None
        if fault is not None and self._book.fault_rules[(fault.code, model, loaded)].people:
            rule = self._book.fault_rules[(fault.code, model, loaded)]
        for tier in _URGENT_TIERS:
            rule = rule or self._keyword_rule(tier, model, loaded, state_words, task_words)
        effective = fault if rule else self._effective_fault(fault, _battery(situation.battery_pct))
        if rule is None and effective is not None:
            rule = self._book.fault_rules[(effective.code, model, loaded)]
        rule = rule or self._keyword_rule("situation", model, loaded, state_words, task_words)

        context = self._context(situation, model, reported, effective)
        if rule is None:
            recorded = self._recorded.get(robot_key)
            if recorded is not None:
                why = "its fault code is not recognised" if reported else "nothing specific was reported"
                reason = f"No rule matched because {why}, so {context['robot_id']} runs its last-known safe plan."
                return FallbackPlan(recorded[1] if loaded else recorded[0], RECORDED_RULE_ID, reason)
            rule = self._book.safe_plans[model]
        steps, reason = rule.plan.render(context, carrying_load=loaded)
        return FallbackPlan(steps, rule.id, reason)

    def record_safe_plan(self, robot_id: str, steps: Sequence[PlanStep]) -> bool:
        """Remember `steps` as the robot's last-known safe plan, if it is one.

        Refused (False) unless it fits the vocabulary and passes check_plan_safety as if for a major
        fault (it starts with a stop), both empty and loaded: it will be used when nothing is known.
        hold_load is stripped and re-added for loaded robots, so the plan is load-agnostic.
        """
        key = _robot_key(robot_id)
        try:
            candidate = tuple(steps)
        except TypeError:
            return False
        if not key or self._vocabulary.validate(candidate):
            return False
        empty = tuple(step for step in candidate if step.action != "hold_load")
        loaded = hold_load_after_stop(empty)
        if not empty or any(
            check_plan_safety(variant, severity="major", carrying_load=carrying, people_involved=False)
            for variant, carrying in ((empty, False), (loaded, True))
        ):
            return False
        with self._record_lock:
            self._recorded.pop(key, None)
            if len(self._recorded) >= MAX_RECORDED_ROBOTS:
                del self._recorded[next(iter(self._recorded))]
            self._recorded[key] = (empty, loaded)
            self._memo_epoch += 1  # plans that fell back to this robot's safe plan change
            self._memo.clear()
        return True

    def safe_plan(self, robot_id: str, *, carrying_load: bool = False) -> tuple[PlanStep, ...]:
        """The robot's last-known safe plan, else its model family's default."""
        key = _robot_key(robot_id)
        recorded = self._recorded.get(key)
        if recorded is not None:
            return recorded[1] if carrying_load else recorded[0]
        model = self._model_of(key)
        context = self._context(RobotSituation(robot_id=_text(robot_id)), model, "", None)
        steps, _ = self._book.safe_plans[model].plan.render(context, carrying_load=carrying_load)
        return steps

    def _model_of(self, robot_key: str) -> str:
        prefix = _ROBOT_PREFIX.match(robot_key)
        family = self._families.get(prefix.group()) if prefix else None
        return family.id if family else GENERIC_MODEL

    def _keyword_rule(
        self, tier: RobotTier, model: str, loaded: bool, state_words: tuple[str, ...], task_words: tuple[str, ...]
    ) -> RobotRule | None:
        """The first rule of the tier, in file order, whose keywords occur in a field it reads."""
        index = self._tier_indexes[tier]
        in_state = index.matched(state_words) if state_words else {}
        in_task = index.matched(task_words) if task_words else {}
        if not in_state and not in_task:
            return None
        rules = self._book.keyword_rules[tier]
        for number in sorted(in_state.keys() | in_task.keys()):
            rule = rules[number]
            if (
                (number in in_state and "state" in rule.match_in) or (number in in_task and "task" in rule.match_in)
            ) and rule.applies(model, loaded):
                return rule
        return None

    def _effective_fault(self, reported: FaultCode | None, battery: float | None) -> FaultCode | None:
        """The reported fault, or the battery's fault when that is strictly more severe (a tie goes
        to the reported code: it names the actual failure)."""
        book = self._book
        battery_code = None
        if battery is not None:
            if battery <= book.battery_critical_pct:
                battery_code = book.battery_critical_code
            elif battery <= book.battery_low_pct:
                battery_code = book.battery_low_code
        battery_fault = book.fault_codes.get(battery_code) if battery_code else None
        if reported is None or battery_fault is None:
            return reported or battery_fault
        worse = _SEVERITY_RANK[battery_fault.severity] < _SEVERITY_RANK[reported.severity]
        return battery_fault if worse else reported

    def _context(
        self, situation: RobotSituation, model: str, reported: str, effective: FaultCode | None
    ) -> dict[str, str]:
        """Placeholder values for plan templates: sanitised, bounded, never empty."""
        if effective is not None:
            code, fault_name = effective.code, effective.name
        elif reported:
            code = f"{reported} (unrecognised)" if _FAULT_CODE.fullmatch(reported) else "unrecognised code"
            fault_name = "unrecognised fault code"
        else:
            code, fault_name = "no fault code", "no fault code"
        battery = _battery(situation.battery_pct)
        return {
            "robot_id": _clean(situation.robot_id) or "unknown robot",
            "model": self._model_names.get(model, "robot of unknown model"),
            "code": code,
            "fault_name": fault_name,
            "location": _clean(situation.location) or "current position",
            "task": _clean(situation.task) or "current task",
            "battery": f"battery {battery:.3g}%" if battery is not None else "battery level unknown",
        }

    # --- voice answers -------------------------------------------------------------------------

    def answer(self, query: str, intent: str | None = None) -> FallbackAnswer:
        """The spoken fallback answer.

        Precedence: emergency rules, then security refusals (both regardless of intent, first match
        in file order); then the best topic rule of the given intent, then the best topic rule of
        any intent (most keywords matched, file order on ties); then the intent's default; then the
        generic default.
        """
        query_words = words(_text(query))
        wanted = intent.strip().lower() if isinstance(intent, str) else None
        rules = self._book.voice_rules
        scores = self._voice_keywords.matched(query_words) if query_words else {}
        required = self._voice_requires.matched(query_words) if scores else {}
        matched = sorted(n for n in scores if not rules[n].requires or n in required)

        for tier in _REFUSAL_TIERS:
            for number in matched:
                if rules[number].tier == tier:
                    return _spoken(rules[number])
        topics = [n for n in matched if rules[n].tier == "topic"]
        for pool in ([n for n in topics if rules[n].intent == wanted] if wanted else [], topics):
            if pool:
                best = min(pool, key=lambda n: (-(scores[n] + required.get(n, 0)), n))
                return _spoken(rules[best])
        fallback = self._intent_defaults.get(wanted) if wanted else None
        return _spoken(fallback or self._default_answer)


def _spoken(rule: VoiceRule) -> FallbackAnswer:
    return FallbackAnswer(rule.text, rule.id)


def _text(value: object) -> str:
    """Situation fields come from the wire; anything that is not a string reads as empty."""
    return value if isinstance(value, str) else ""


def _clean(value: object) -> str:
    """Printable, single-spaced, bounded: control, format (bidi overrides, zero-width) and other
    invisible characters must not reach an operator console or a pager."""
    text = _text(value)[: MAX_CONTEXT_CHARS * 4]
    if not text.isprintable():  # C fast path for the usual clean ASCII / Unicode text
        text = "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in text)
    return " ".join(text.split())[:MAX_CONTEXT_CHARS]


def _robot_key(robot_id: object) -> str:
    """The identity of a robot: NFKC, case-folded, cleaned, so "AMR-017" and " amr-017 " match."""
    return unicodedata.normalize("NFKC", _clean(robot_id)).casefold()


def _fault_code(raw: object) -> str:
    """Canonical "E202" for anything that spells a code, else the cleaned raw text ("" if none)."""
    text = unicodedata.normalize("NFKC", _clean(raw)).upper()
    found = _FAULT_CODE.fullmatch(text)
    return f"E{found.group(1)}" if found else text


def _battery(value: object) -> float | None:
    """A usable battery percentage, or None: bools, NaN, infinities and out-of-range sentinels
    (-1 for "unknown" is common) say nothing about the battery."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or not 0 <= value <= 100:
        return None
    return float(value)
