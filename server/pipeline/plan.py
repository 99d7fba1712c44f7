"""The robot plan pipeline (Plan): always an answer inside the deadline.

    safety rules first (people, hazards, battery): a rule plan, no retrieval needed
    retrieve (mandatory) -> plan: the best retrieved procedure for the fault, validated (mandatory)
                 \\ miss or failure -> the rule plan, computed up front (microseconds, no I/O)

The rule plan is computed before anything else, so a miss costs nothing but the hand-over.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from server.config import ProfileConfig
from server.fallback import FallbackPlan, RobotSituation
from server.generate.base import Source
from server.generate.sentences import split_sentences
from server.observability.metrics import observe_retrieved
from server.pipeline.budget import Budget
from server.pipeline.events import Mode, PlanResult, PlanSource
from server.pipeline.stage import Outcome, StageMissed, StageTiming, Trace, run_stage
from server.retrieval.checks import checked_search
from server.retrieval.sparse import Hit
from server.robot_plan import ActionVocabulary, PlanStep, PlanValidationError, check_plan_safety, hold_load_after_stop
from server.runtime import Runtime

# Rule tiers that win over any retrieved procedure: a person or hazard changes what is safe.
URGENT_RULE_PREFIXES = ("people.", "hazard.")
# Model families by robot-id prefix, as they are named in the warehouse KB (sharpens retrieval).
MODEL_NAMES = {"amr": "Kestrel AMR-500", "fl": "Heron FL-20 forklift", "pk": "Wren PK-3 picking arm"}
# How a procedure written for one model names it: such a procedure wins over a generic one.
MODEL_MARKERS = {"amr": "AMR-500", "fl": "FL-20", "pk": "PK-3"}


@dataclass(frozen=True, slots=True)
class Chosen:
    hit: Hit
    steps: tuple[PlanStep, ...]


class PlanPipeline:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # The plan stage's work; fault injection (server/faults.py) wraps it when [faults] is on.
        self.choose_stage = rt.faults.wrap_plan(self._choose_checked) if rt.faults is not None \
            else self._choose_checked

    async def _choose_checked(self, hits: list[Hit], s: RobotSituation) -> Chosen | None:
        return check_chosen(self.choose(hits, s), self.rt.vocabulary)

    def query_for(self, s: RobotSituation) -> str:
        code = s.fault_code.strip().upper()
        fault = self.rt.fault_codes.get(code)
        family = s.robot_id.split("-", 1)[0].lower()
        parts = [code, fault.name if fault else "", MODEL_NAMES.get(family, ""),
                 "carrying a load" if s.carrying_load else "", s.task, s.state]
        return " ".join(p for p in parts if p)

    async def run(self, s: RobotSituation, p: ProfileConfig, client_remaining_s: float | None) -> PlanResult:
        budget = Budget.start(p.total_ms / 1000, client_remaining_s=client_remaining_s,
                              reserve_s=p.fallback_reserve_ms / 1000)
        trace = Trace()
        rules = self.rt.planner.plan(s)  # deterministic, no I/O: ready before any stage can miss
        code = s.fault_code.strip().upper()
        if rules.rule_id.startswith(URGENT_RULE_PREFIXES) or _battery_overrides(rules, code):
            trace.skipped("retrieve", f"safety rule {rules.rule_id} applies before any retrieved procedure")
            return self._rules(rules, Mode.FULL, f"safety rule: {rules.reason}", trace, budget)

        loop = asyncio.get_running_loop()
        query = self.query_for(s)
        try:
            hits = await run_stage(
                "retrieve", lambda: loop.run_in_executor(self.rt.cpu, checked_search, self.rt.retriever, self.rt.kb,
                                                         query, max(p.default_k, 8), {"domain": ["warehouse"]}),
                budget=budget, stage_budget_s=p.retrieve_ms / 1000, trace=trace, mandatory=True)
            assert hits is not None
            observe_retrieved("plan", len(hits))
            # Procedures are chosen by fault code and model, which a relevance reranker cannot improve.
            trace.skipped("rerank", "not used for plans: the procedure is chosen by fault code and model")
            chosen = await run_stage("plan", lambda: self.choose_stage(hits, s), budget=budget,
                                     stage_budget_s=p.plan_ms / 1000, trace=trace, mandatory=True)
        except StageMissed as miss:
            t = miss.timing
            return self._rules(rules, Mode.FALLBACK, f"{t.stage} {t.detail}; rule plan {rules.rule_id}", trace,
                               budget, missed_stage=t.stage)
        if chosen is not None:
            first = split_sentences(chosen.hit.passage.text)[0]
            cite = Source(1, chosen.hit.passage.id, chosen.hit.passage.source, first[:200])
            what = f"procedure for {code or 'the situation'}: {chosen.hit.passage.source}"
            mode, reason, missed = Mode.FULL, f"retrieved {what}", ""
            model = self.rt.robot_model
            if model is not None:
                # Optional: a model may adapt the procedure to this robot's state. A late, malformed or
                # unsafe plan keeps the retrieved one, and the response says why.
                fault = self.rt.fault_codes.get(code)
                adapted = await run_stage(
                    "model", lambda: model.adapt(s, chosen.hit, chosen.steps, fault=fault,
                                                 time_s=budget.for_stage(p.model_ms / 1000)),
                    budget=budget, stage_budget_s=p.model_ms / 1000, trace=trace, mandatory=False)
                if adapted is not None:
                    return PlanResult(adapted, PlanSource.MODEL, Mode.FULL, f"model-adapted {what}",
                                      citations=[cite], timings=list(trace.timings), total_ms=budget.elapsed_ms())
                t = trace.timings[-1]
                mode, missed = Mode.DEGRADED, "model"
                reason = f"model {t.detail}; kept the retrieved {what}"
            return PlanResult(chosen.steps, PlanSource.RETRIEVED, mode, reason, missed_stage=missed,
                              citations=[cite], timings=list(trace.timings), total_ms=budget.elapsed_ms())
        if rules.rule_id.startswith("safe."):
            why = f"no procedure or rule matches fault {code!r}" if code else "no procedure or rule matches"
            return self._rules(rules, Mode.DEGRADED, f"{why}; robot's safe plan", trace, budget)
        return self._rules(rules, Mode.FULL, rules.reason, trace, budget)

    def choose(self, hits: list[Hit], s: RobotSituation) -> Chosen | None:
        """The best-ranked procedure written for this fault code that validates and passes the safety checks.

        Only a procedure for the *reported* fault is used: a procedure for a neighbouring fault can be
        unsafe, and the rule plan covers every code.
        """
        code = s.fault_code.strip().upper()
        if not code:
            return None
        fault = self.rt.fault_codes.get(code)
        if fault is None:
            return None
        family = s.robot_id.split("-", 1)[0].lower()
        # Stable sort: procedures naming this robot's model first, then model-neutral ones, then those
        # written for another model; each group in retrieval order.
        for hit in sorted(hits, key=lambda h: _model_fit(h.passage.text, family)):
            if hit.passage.fault_code != code or not hit.passage.steps:
                continue
            try:
                steps = self.rt.vocabulary.parse_steps(hit.passage.steps)
            except PlanValidationError:
                continue
            if s.carrying_load:
                steps = hold_load_after_stop(steps)
            if self.rt.vocabulary.validate(steps):
                continue
            if check_plan_safety(steps, severity=fault.severity, carrying_load=s.carrying_load,
                                 people_involved=False):
                continue
            return Chosen(hit, steps)
        return None

    def _rules(self, rules: FallbackPlan, mode: Mode, reason: str, trace: Trace, budget: Budget,
               missed_stage: str = "") -> PlanResult:
        t0 = time.perf_counter()
        trace.record(StageTiming("fallback" if mode is Mode.FALLBACK else "rules", (time.perf_counter() - t0) * 1000,
                                 0.0, Outcome.OK, f"rule {rules.rule_id}"))
        return PlanResult(rules.steps, PlanSource.RULES, mode, reason, missed_stage=missed_stage,
                          rule_id=rules.rule_id, timings=list(trace.timings), total_ms=budget.elapsed_ms())


def _model_fit(text: str, family: str) -> int:
    own = MODEL_MARKERS.get(family)
    if own is not None and own in text:
        return 0
    return 2 if any(m in text for m in MODEL_MARKERS.values()) else 1


def _battery_overrides(rules: FallbackPlan, reported: str) -> bool:
    """The planner replaced the reported fault with a battery fault (battery too low to act on it)."""
    return rules.rule_id.startswith("fault.E40") and not rules.rule_id.startswith(f"fault.{reported}")


def check_chosen(chosen: Chosen | None, vocabulary: ActionVocabulary) -> Chosen | None:
    """The plan stage's output, validated again (a faulty stage must fail, not hand the robot garbage)."""
    if chosen is None:
        return None
    if not isinstance(chosen, Chosen) or not chosen.steps:
        raise PlanValidationError([f"plan stage returned no valid plan: {chosen!r}"[:200]])
    problems = vocabulary.validate(chosen.steps)
    if problems:
        raise PlanValidationError(problems)
    return chosen
