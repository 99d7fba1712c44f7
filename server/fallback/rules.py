"""The fallback rule book: load `data/fallback/rules.toml` once, validate it, precompile it.

Everything that can go wrong with the rules goes wrong here, at startup, with a `RulesError` that
names the rule id and the field — never at request time. In particular every robot plan a rule can
produce (for each model family and load state it applies to) is rendered once with sample values and
must pass the action vocabulary and `check_plan_safety`, and every fault code of fault_codes.json must
have exactly one best rule for every model family, loaded or empty.

Text matching (`words`, `KeywordIndex`) lives here too: rules and requests must be normalised by the
same function or keywords silently stop matching.
"""

from __future__ import annotations

import json
import re
import string
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, TypeAlias, cast, get_args

from server.robot_plan import (
    HALT_ACTIONS,
    HOLD_LOAD,
    MAX_TEXT_PARAM_CHARS,
    SEVERITIES,
    ActionVocabulary,
    ParamValue,
    PlanStep,
    PlanValidationError,
    Severity,
    check_plan_safety,
)

_REPO_ROOT: Final = Path(__file__).resolve().parents[2]
DEFAULT_RULES_PATH: Final = _REPO_ROOT / "data/fallback/rules.toml"
DEFAULT_FAULT_CODES_PATH: Final = _REPO_ROOT / "data/kb/warehouse/fault_codes.json"

RobotTier: TypeAlias = Literal["people", "hazard", "situation"]
VoiceTier: TypeAlias = Literal["emergency", "security", "topic", "intent_default", "default"]
ROBOT_TIERS: Final[tuple[RobotTier, ...]] = get_args(RobotTier)
VOICE_TIERS: Final[tuple[VoiceTier, ...]] = get_args(VoiceTier)
MATCH_FIELDS: Final = frozenset({"state", "task"})
GENERIC_MODEL: Final = "generic"

# Values a plan template may use; the planner fills every one of them on every call.
PLACEHOLDERS: Final = frozenset({"robot_id", "model", "code", "fault_name", "location", "task", "battery"})
# Situation text is controller free text: only this much of each value reaches a plan.
MAX_CONTEXT_CHARS: Final = 48
MAX_REASON_CHARS: Final = 300
# Voice answers are spoken: short enough to listen to, long enough to be useful.
MAX_VOICE_WORDS: Final = 59
MAX_VOICE_SENTENCES: Final = 3
# Request text beyond this is not read: bounds matching time whatever a client sends.
MAX_TEXT_CHARS: Final = 2000

_WORD = re.compile(r"[^\W_]+")
_APOSTROPHES = str.maketrans("", "", "'\u2019\u02bc")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_FAULT_CODE = re.compile(r"E\d{3}")


class RulesError(ValueError):
    """The rules file (or the fault-code table) is malformed; the message names rule id and field."""


# ---------------------------------------------------------------------------------------------
# Text normalisation and keyword matching


def singular(word: str) -> str:
    """Light plural folding ("sparks" -> "spark", "batteries" -> "battery"); no real stemming,
    which would merge words that mean different things in a safety context."""
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes")):
        return word[:-2]
    return word[:-1]


def words(text: str) -> tuple[str, ...]:
    """Normalised words: NFKC, case-folded, apostrophes dropped ("won't" -> "wont"), split on
    anything that is not a letter or digit ("wi-fi" -> "wi fi"), plurals folded."""
    folded = unicodedata.normalize("NFKC", text[:MAX_TEXT_CHARS]).casefold().translate(_APOSTROPHES)
    return tuple(singular(word) for word in _WORD.findall(folded))


Phrase: TypeAlias = tuple[str, ...]


class KeywordIndex:
    """Which entries (rules) have one of their keyword phrases in a word sequence.

    Indexed by a phrase's first word, so a lookup costs one dict probe per input word, whatever
    the number of rules.
    """

    __slots__ = ("_by_first",)

    def __init__(self, entries: Sequence[Sequence[Phrase]]) -> None:
        by_first: dict[str, list[tuple[Phrase, int, int]]] = {}
        for entry, phrases in enumerate(entries):
            for number, phrase in enumerate(phrases):
                by_first.setdefault(phrase[0], []).append((phrase, entry, number))
        self._by_first: Mapping[str, tuple[tuple[Phrase, int, int], ...]] = {
            first: tuple(items) for first, items in by_first.items()
        }

    def matched(self, text_words: Sequence[str]) -> dict[int, int]:
        """entry -> number of distinct keyword phrases of that entry found in `text_words`."""
        found: dict[int, set[int]] = {}
        for at, word in enumerate(text_words):
            for phrase, entry, number in self._by_first.get(word, ()):
                if len(phrase) == 1 or tuple(text_words[at : at + len(phrase)]) == phrase:
                    found.setdefault(entry, set()).add(number)
        return {entry: len(numbers) for entry, numbers in found.items()}


# ---------------------------------------------------------------------------------------------
# Rule types


@dataclass(frozen=True, slots=True)
class FaultCode:
    code: str
    name: str
    subsystem: str
    severity: Severity


@dataclass(frozen=True, slots=True)
class ModelFamily:
    id: str
    name: str
    prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StepTemplate:
    """A plan step whose str parameters may hold {placeholders}; `fixed` when none do."""

    action: str
    params: tuple[tuple[str, ParamValue], ...]
    templated: frozenset[str]
    fixed: PlanStep | None

    def render(self, context: Mapping[str, str]) -> PlanStep:
        if self.fixed is not None:
            return self.fixed
        return PlanStep(
            self.action,
            {
                name: (str(value).format_map(context)[:MAX_TEXT_PARAM_CHARS] if name in self.templated else value)
                for name, value in self.params
            },
        )


_HOLD_LOAD_TEMPLATE: Final = StepTemplate("hold_load", (), frozenset(), HOLD_LOAD)


@dataclass(frozen=True, slots=True)
class PlanTemplate:
    """A rule's plan for an empty robot and, precompiled, for a loaded one (hold_load after stop)."""

    empty: tuple[StepTemplate, ...]
    loaded: tuple[StepTemplate, ...]
    reason: str

    def render(self, context: Mapping[str, str], *, carrying_load: bool) -> tuple[tuple[PlanStep, ...], str]:
        steps = self.loaded if carrying_load else self.empty
        reason = self.reason.format_map(context)[:MAX_REASON_CHARS]
        return tuple(step.render(context) for step in steps), reason


@dataclass(frozen=True, slots=True)
class RobotRule:
    """A safe_plan, fault_rule or keyword_rule of the rules file."""

    id: str
    kind: str
    plan: PlanTemplate
    tier: RobotTier | None = None
    code: str = ""
    people: bool = False
    models: frozenset[str] | None = None  # None: every model family
    carrying_load: bool | None = None  # None: loaded or empty
    keywords: tuple[Phrase, ...] = ()
    match_in: frozenset[str] = frozenset()

    def applies(self, model: str, carrying_load: bool) -> bool:
        return (self.models is None or model in self.models) and (
            self.carrying_load is None or self.carrying_load == carrying_load
        )


@dataclass(frozen=True, slots=True)
class VoiceRule:
    id: str
    tier: VoiceTier
    text: str
    intent: str | None = None
    keywords: tuple[Phrase, ...] = ()
    requires: tuple[Phrase, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleBook:
    """The validated, precompiled rules. Read-only after load_rules()."""

    models: tuple[ModelFamily, ...]
    battery_critical_pct: float  # at or below: planned as battery_critical_code
    battery_low_pct: float  # at or below: planned as battery_low_code
    battery_critical_code: str
    battery_low_code: str
    fault_codes: Mapping[str, FaultCode]
    safe_plans: Mapping[str, RobotRule]  # model id -> default safe plan
    fault_rules: Mapping[tuple[str, str, bool], RobotRule]  # (code, model, carrying_load) -> rule
    keyword_rules: Mapping[RobotTier, tuple[RobotRule, ...]]  # file order within each tier
    voice_intents: frozenset[str]
    voice_rules: tuple[VoiceRule, ...]  # file order


# ---------------------------------------------------------------------------------------------
# Loading


def load_fault_codes(path: Path | None = None) -> Mapping[str, FaultCode]:
    path = DEFAULT_FAULT_CODES_PATH if path is None else path
    with path.open("rb") as handle:
        data = json.load(handle)
    codes = data.get("codes") if isinstance(data, Mapping) else None
    if not isinstance(codes, Mapping) or not codes:
        raise RulesError(f"{path.name}: expected a non-empty 'codes' object")
    table: dict[str, FaultCode] = {}
    for code, entry in codes.items():
        where = f"{path.name}: codes.{code}"
        if not _FAULT_CODE.fullmatch(str(code)):
            raise RulesError(f"{where}: a fault code is 'E' and three digits")
        if not isinstance(entry, Mapping) or entry.get("severity") not in SEVERITIES:
            raise RulesError(f"{where}.severity: expected one of {', '.join(SEVERITIES)}")
        table[code] = FaultCode(
            code, str(entry.get("name", code)), str(entry.get("subsystem", "")), cast(Severity, entry["severity"])
        )
    return MappingProxyType(table)


def load_rules(
    path: Path | None = None,
    *,
    vocabulary: ActionVocabulary,
    fault_codes: Mapping[str, FaultCode],
) -> RuleBook:
    """Parse, validate and precompile the rules file; RulesError on the first problem found."""
    path = DEFAULT_RULES_PATH if path is None else path
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise RulesError(f"{path.name}: not valid TOML: {error}") from error
    return _Loader(path.name, vocabulary, fault_codes).load(data)


_TOP_LEVEL: Final = frozenset(
    {"schema", "battery", "model", "safe_plan", "fault_rule", "keyword_rule", "voice", "voice_rule"}
)


class _Loader:
    def __init__(self, source: str, vocabulary: ActionVocabulary, fault_codes: Mapping[str, FaultCode]) -> None:
        self.source = source
        self.vocabulary = vocabulary
        self.fault_codes = fault_codes
        self.ids: set[str] = set()
        self.model_ids: frozenset[str] = frozenset()

    def fail(self, where: str, problem: str) -> RulesError:
        return RulesError(f"{self.source}: {where}: {problem}")

    def load(self, data: Mapping[str, object]) -> RuleBook:
        self.reject_unknown("top level", data, _TOP_LEVEL)
        if data.get("schema") != 1:
            raise self.fail("schema", f"expected 1, got {data.get('schema')!r}")
        battery = self.table(data.get("battery"), "[battery]")
        self.reject_unknown("[battery]", battery, {"critical_pct", "critical_code", "low_pct", "low_code"})
        critical_pct = self.percent(battery, "critical_pct", "[battery]")
        low_pct = self.percent(battery, "low_pct", "[battery]")
        if low_pct < critical_pct:
            raise self.fail("[battery] field 'low_pct'", f"must be >= critical_pct ({critical_pct})")
        critical_code, low_code = (self.str_field(battery, key, "[battery]") for key in ("critical_code", "low_code"))
        for key, code in (("critical_code", critical_code), ("low_code", low_code)):
            if code not in self.fault_codes:
                raise self.fail(f"[battery] field '{key}'", f"{code!r} is not in fault_codes.json")

        models = tuple(self.model(entry) for entry in self.tables(data, "model"))
        self.model_ids = frozenset(model.id for model in models) | {GENERIC_MODEL}
        prefixes = [prefix for model in models for prefix in model.prefixes]
        if len(prefixes) != len(set(prefixes)):
            raise self.fail("[[model]] field 'prefixes'", "a prefix belongs to exactly one model family")

        safe_plans: dict[str, RobotRule] = {}
        for entry in self.tables(data, "safe_plan"):
            rule = self.safe_plan(entry)
            model = next(iter(rule.models or ()))
            if model in safe_plans:
                raise self.fail(
                    f"safe_plan '{rule.id}' field 'model'", f"{model!r} already has safe_plan '{safe_plans[model].id}'"
                )
            safe_plans[model] = rule
        missing = sorted(self.model_ids - safe_plans.keys())
        if missing:
            raise self.fail("[[safe_plan]]", f"no safe_plan for model families: {', '.join(missing)}")

        fault_rules = self.resolve_fault_rules([self.fault_rule(entry) for entry in self.tables(data, "fault_rule")])
        keyword_rules = [self.keyword_rule(entry) for entry in self.tables(data, "keyword_rule")]
        by_tier = {tier: tuple(rule for rule in keyword_rules if rule.tier == tier) for tier in ROBOT_TIERS}

        voice = self.table(data.get("voice"), "[voice]")
        self.reject_unknown("[voice]", voice, {"intents"})
        intents = frozenset(self.str_list(voice, "intents", "[voice]"))
        voice_rules = tuple(self.voice_rule(entry, intents) for entry in self.tables(data, "voice_rule"))
        self.check_voice_coverage(voice_rules)

        return RuleBook(
            models=models,
            battery_critical_pct=critical_pct,
            battery_low_pct=low_pct,
            battery_critical_code=critical_code,
            battery_low_code=low_code,
            fault_codes=self.fault_codes,
            safe_plans=MappingProxyType(safe_plans),
            fault_rules=MappingProxyType(fault_rules),
            keyword_rules=MappingProxyType(by_tier),
            voice_intents=intents,
            voice_rules=voice_rules,
        )

    # --- generic field readers -----------------------------------------------------------------

    def reject_unknown(self, where: str, table: Mapping[str, object], allowed: Iterable[str]) -> None:
        """Unknown keys are typos ("carrying" for "carrying_load") that would silently widen a rule."""
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise self.fail(f"{where} field '{unknown[0]}'", f"unknown field; valid: {', '.join(sorted(allowed))}")

    def table(self, value: object, where: str) -> Mapping[str, object]:
        if not isinstance(value, Mapping):
            raise self.fail(where, "expected a table")
        return value

    def tables(self, data: Mapping[str, object], key: str) -> list[Mapping[str, object]]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
            raise self.fail(f"[[{key}]]", "expected an array of tables")
        return value

    def str_field(self, table: Mapping[str, object], key: str, where: str) -> str:
        value = table.get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{where} field '{key}'", f"expected a non-empty string, got {value!r}")
        return value

    def str_list(self, table: Mapping[str, object], key: str, where: str, *, required: bool = True) -> list[str]:
        value = table.get(key)
        if value is None and not required:
            return []
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(item, str) and item.strip() for item in value)
        ):
            raise self.fail(f"{where} field '{key}'", "expected a non-empty list of non-empty strings")
        return value

    def percent(self, table: Mapping[str, object], key: str, where: str) -> float:
        value = table.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise self.fail(f"{where} field '{key}'", f"expected a number in 0..100, got {value!r}")
        return float(value)

    def rule_id(self, table: Mapping[str, object], kind: str) -> str:
        rule_id = self.str_field(table, "id", f"[[{kind}]]")
        if rule_id in self.ids:
            raise self.fail(f"{kind} '{rule_id}' field 'id'", "duplicate rule id")
        self.ids.add(rule_id)
        return rule_id

    def phrases(self, table: Mapping[str, object], key: str, where: str, *, required: bool) -> tuple[Phrase, ...]:
        out: list[Phrase] = []
        for keyword in self.str_list(table, key, where, required=required):
            phrase = words(keyword)
            if not phrase:
                raise self.fail(f"{where} field '{key}'", f"keyword {keyword!r} has no letters or digits")
            out.append(phrase)
        return tuple(out)

    def models_field(self, table: Mapping[str, object], where: str) -> frozenset[str] | None:
        if "models" not in table:
            return None
        models = frozenset(self.str_list(table, "models", where))
        unknown = sorted(models - self.model_ids)
        if unknown:
            raise self.fail(f"{where} field 'models'", f"unknown {unknown}; valid: {', '.join(sorted(self.model_ids))}")
        return models

    def load_field(self, table: Mapping[str, object], where: str) -> bool | None:
        value = table.get("carrying_load")
        if value is not None and not isinstance(value, bool):
            raise self.fail(f"{where} field 'carrying_load'", f"expected true or false, got {value!r}")
        return value

    # --- robot rules ---------------------------------------------------------------------------

    def model(self, table: Mapping[str, object]) -> ModelFamily:
        model_id = self.str_field(table, "id", "[[model]]")
        where = f"model '{model_id}'"
        self.reject_unknown(where, table, {"id", "name", "prefixes"})
        if model_id == GENERIC_MODEL:
            raise self.fail(f"{where} field 'id'", f"{GENERIC_MODEL!r} is reserved for robots of no listed family")
        prefixes = tuple(prefix.strip().lower() for prefix in self.str_list(table, "prefixes", where))
        if not all(prefix.isalpha() for prefix in prefixes):
            raise self.fail(
                f"{where} field 'prefixes'", "a prefix is letters only (the part of robot_id before the number)"
            )
        return ModelFamily(model_id, self.str_field(table, "name", where), prefixes)

    def plan_template(self, table: Mapping[str, object], where: str, *, carrying: bool | None) -> PlanTemplate:
        reason = self.str_field(table, "reason", where)
        self.placeholders(reason, f"{where} field 'reason'")
        if not reason.rstrip().endswith((".", "!")):
            raise self.fail(f"{where} field 'reason'", "one sentence, ending with a full stop")
        raw_steps = table.get("steps")
        if not isinstance(raw_steps, list):
            raise self.fail(f"{where} field 'steps'", "expected an array of {action = ..., params = {...}}")
        try:
            steps = self.vocabulary.parse_steps(raw_steps)
        except PlanValidationError as error:
            raise self.fail(f"{where} field 'steps'", str(error)) from None
        templates: list[StepTemplate] = []
        for index, step in enumerate(steps):
            if step.action == "hold_load" and carrying is not True:
                raise self.fail(
                    f"{where} field 'steps[{index}]'",
                    "hold_load is added automatically for loaded robots; "
                    "a rule that lists it must set carrying_load = true",
                )
            templated = frozenset(
                name
                for name, value in step.params.items()
                if isinstance(value, str) and self.placeholders(value, f"{where} field 'steps[{index}].params.{name}'")
            )
            fixed = (
                None
                if templated
                else PlanStep(step.action, {k: v.format() if isinstance(v, str) else v for k, v in step.params.items()})
            )
            templates.append(StepTemplate(step.action, tuple(step.params.items()), templated, fixed))
        empty = tuple(templates)
        return PlanTemplate(empty, _with_hold_load(empty), reason)

    def placeholders(self, template: str, where: str) -> bool:
        """Whether `template` has {placeholders}; all of them must be known names."""
        try:
            fields = [
                (name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None
            ]
        except ValueError as error:
            raise self.fail(where, f"bad braces in {template!r}: {error}; write {{{{ for a literal brace") from None
        for name, spec, conv in fields:
            if name not in PLACEHOLDERS or spec or conv:
                raise self.fail(
                    where,
                    f"unknown placeholder {{{name}}}; valid: {', '.join(sorted(PLACEHOLDERS))} "
                    "(plain names, no format spec)",
                )
        return bool(fields)

    def check_plan(self, rule: RobotRule, severity: str | None, people: bool) -> None:
        """Render the rule for every model and load state it applies to; vocabulary + safety."""
        context = _sample_context()
        for model in sorted(self.model_ids):
            for carrying in (False, True):
                if not rule.applies(model, carrying):
                    continue
                steps, _ = rule.plan.render(context, carrying_load=carrying)
                problems = self.vocabulary.validate(steps) or check_plan_safety(
                    steps, severity=severity, carrying_load=carrying, people_involved=people
                )
                if problems:
                    raise self.fail(
                        f"{rule.kind} '{rule.id}' field 'steps'",
                        f"unsafe for {_robot(model, carrying)}: {'; '.join(problems)}",
                    )

    def safe_plan(self, table: Mapping[str, object]) -> RobotRule:
        rule_id = self.rule_id(table, "safe_plan")
        where = f"safe_plan '{rule_id}'"
        self.reject_unknown(where, table, {"id", "model", "reason", "steps"})
        model = self.str_field(table, "model", where)
        if model not in self.model_ids:
            raise self.fail(
                f"{where} field 'model'", f"unknown model {model!r}; valid: {', '.join(sorted(self.model_ids))}"
            )
        rule = RobotRule(
            rule_id, "safe_plan", self.plan_template(table, where, carrying=None), models=frozenset({model})
        )
        # Used when nothing is known: it must hold for a major fault (stop first, then wait for help).
        self.check_plan(rule, "major", people=False)
        return rule

    def fault_rule(self, table: Mapping[str, object]) -> RobotRule:
        rule_id = self.rule_id(table, "fault_rule")
        where = f"fault_rule '{rule_id}'"
        self.reject_unknown(where, table, {"id", "code", "people", "models", "carrying_load", "reason", "steps"})
        code = self.str_field(table, "code", where)
        fault = self.fault_codes.get(code)
        if fault is None:
            raise self.fail(f"{where} field 'code'", f"{code!r} is not in fault_codes.json")
        people = table.get("people", False)
        if not isinstance(people, bool):
            raise self.fail(f"{where} field 'people'", f"expected true or false, got {people!r}")
        carrying = self.load_field(table, where)
        rule = RobotRule(
            rule_id,
            "fault_rule",
            self.plan_template(table, where, carrying=carrying),
            code=code,
            people=people,
            models=self.models_field(table, where),
            carrying_load=carrying,
        )
        self.check_plan(rule, fault.severity, people)
        return rule

    def keyword_rule(self, table: Mapping[str, object]) -> RobotRule:
        rule_id = self.rule_id(table, "keyword_rule")
        where = f"keyword_rule '{rule_id}'"
        self.reject_unknown(
            where, table, {"id", "tier", "match_in", "keywords", "models", "carrying_load", "reason", "steps"}
        )
        tier = self.str_field(table, "tier", where)
        if tier not in ROBOT_TIERS:
            raise self.fail(f"{where} field 'tier'", f"unknown tier {tier!r}; valid: {', '.join(ROBOT_TIERS)}")
        match_in = frozenset(self.str_list(table, "match_in", where))
        if not match_in <= MATCH_FIELDS:
            raise self.fail(f"{where} field 'match_in'", f"valid fields: {', '.join(sorted(MATCH_FIELDS))}")
        carrying = self.load_field(table, where)
        rule = RobotRule(
            rule_id,
            "keyword_rule",
            self.plan_template(table, where, carrying=carrying),
            tier=tier,
            people=tier == "people",
            models=self.models_field(table, where),
            carrying_load=carrying,
            keywords=self.phrases(table, "keywords", where, required=True),
            match_in=match_in,
        )
        # People and hazard rules answer situations at least as dangerous as a critical fault.
        self.check_plan(rule, "critical" if tier in ("people", "hazard") else None, people=tier == "people")
        return rule

    def resolve_fault_rules(self, rules: list[RobotRule]) -> dict[tuple[str, str, bool], RobotRule]:
        """For every (code, model, load) the one most specific rule; ambiguity is an error.

        Rule X beats Y when X constrains everything Y does (models and/or carrying_load) and more.
        Two rules that constrain different things (one a model, the other the load) and both apply
        are ambiguous: the operator must add a rule that constrains both.
        """
        resolved: dict[tuple[str, str, bool], RobotRule] = {}
        for code in sorted(self.fault_codes):
            for model in sorted(self.model_ids):
                for carrying in (False, True):
                    candidates = [rule for rule in rules if rule.code == code and rule.applies(model, carrying)]
                    if not candidates:
                        raise self.fail(
                            "[[fault_rule]]", f"fault code {code} has no rule for {_robot(model, carrying)}"
                        )
                    best = max(candidates, key=lambda rule: len(_constraints(rule)))
                    rivals = [r for r in candidates if r is not best and not _constraints(r) < _constraints(best)]
                    if rivals:
                        raise self.fail(
                            f"fault_rule '{best.id}' field 'models'/'carrying_load'",
                            f"ambiguous with '{rivals[0].id}' for {_robot(model, carrying)} on {code}",
                        )
                    resolved[(code, model, carrying)] = best
        return resolved

    # --- voice rules ---------------------------------------------------------------------------

    def voice_rule(self, table: Mapping[str, object], intents: frozenset[str]) -> VoiceRule:
        rule_id = self.rule_id(table, "voice_rule")
        where = f"voice_rule '{rule_id}'"
        self.reject_unknown(where, table, {"id", "tier", "intent", "keywords", "requires", "text"})
        tier = self.str_field(table, "tier", where)
        if tier not in VOICE_TIERS:
            raise self.fail(f"{where} field 'tier'", f"unknown tier {tier!r}; valid: {', '.join(VOICE_TIERS)}")
        intent = table.get("intent")
        if intent is not None and intent not in intents:
            raise self.fail(
                f"{where} field 'intent'", f"unknown intent {intent!r}; valid: {', '.join(sorted(intents))}"
            )
        if (tier == "intent_default") != (intent is not None) and tier != "topic":
            raise self.fail(
                f"{where} field 'intent'",
                "required for tier intent_default, not allowed for emergency/security/default",
            )
        keyworded = tier in ("emergency", "security", "topic")
        if not keyworded and ("keywords" in table or "requires" in table):
            raise self.fail(f"{where} field 'keywords'", f"a {tier} rule matches anything; it takes no keywords")
        text = " ".join(self.str_field(table, "text", where).split())
        if not text.endswith((".", "!", "?")):
            raise self.fail(f"{where} field 'text'", "a spoken answer ends with . ! or ?")
        if len(text.split()) > MAX_VOICE_WORDS:
            raise self.fail(f"{where} field 'text'", f"at most {MAX_VOICE_WORDS} words, got {len(text.split())}")
        if len(_SENTENCE_END.findall(text)) > MAX_VOICE_SENTENCES:
            raise self.fail(f"{where} field 'text'", f"at most {MAX_VOICE_SENTENCES} sentences")
        return VoiceRule(
            rule_id,
            tier,
            text,
            intent,
            self.phrases(table, "keywords", where, required=keyworded),
            self.phrases(table, "requires", where, required=False),
        )

    def check_voice_coverage(self, rules: Sequence[VoiceRule]) -> None:
        defaults = [rule.id for rule in rules if rule.tier == "default"]
        if len(defaults) != 1:
            raise self.fail("[[voice_rule]]", f'exactly one rule with tier = "default", got {defaults}')
        seen: dict[str, str] = {}
        for rule in rules:
            if rule.tier == "intent_default" and rule.intent is not None:
                if rule.intent in seen:
                    raise self.fail(
                        f"voice_rule '{rule.id}' field 'intent'",
                        f"intent {rule.intent!r} already has intent_default '{seen[rule.intent]}'",
                    )
                seen[rule.intent] = rule.id


def _constraints(rule: RobotRule) -> frozenset[str]:
    return frozenset(
        name
        for name, constrained in (
            ("models", rule.models is not None),
            ("carrying_load", rule.carrying_load is not None),
        )
        if constrained
    )


def _with_hold_load(steps: tuple[StepTemplate, ...]) -> tuple[StepTemplate, ...]:
    """Template-level twin of robot_plan.hold_load_after_stop, so loaded plans cost nothing extra."""
    if any(step.action == "hold_load" for step in steps):
        return steps
    at = next((i + 1 for i, step in enumerate(steps) if step.action in HALT_ACTIONS), 0)
    return (*steps[:at], _HOLD_LOAD_TEMPLATE, *steps[at:])


def _robot(model: str, carrying_load: bool) -> str:
    return f"a loaded {model} robot" if carrying_load else f"an empty {model} robot"


def _sample_context() -> dict[str, str]:
    """Worst-case values: every placeholder at its maximum length."""
    return {name: "x" * MAX_CONTEXT_CHARS for name in PLACEHOLDERS}
