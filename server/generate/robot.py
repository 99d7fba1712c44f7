"""The robot plan model tier: a model adapts the retrieved procedure to the robot's situation.

Output is JSON constrained to the action vocabulary (`ActionVocabulary.json_schema()`, enforced by
vLLM's structured outputs; a backend without constrained decoding just generates and is checked the
same way). Whatever comes back is parsed, validated against the vocabulary and the safety invariants,
and given the same load-holding rule as a retrieved procedure. The retrieved passage goes through the
injection filter first, and a text parameter (a message, a reason) that reproduces the system prompt
fails the plan like any other invalid output (server/generate/injection.py). Anything that fails raises
`PlanModelError` with the reason; the plan pipeline then keeps the retrieved procedure (or the rules).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping

from server.config import GenerationConfig, TaskPolicy
from server.fallback import RobotSituation
from server.fallback.rules import FaultCode
from server.generate.backend import DecodeLimits, StreamStats, TextBackend, guarded
from server.generate.injection import InjectionFilter, PromptLeakGuard
from server.generate.prompt import ROBOT_SYSTEM, VOICE_SYSTEM, PromptBuilder, approx_tokens
from server.retrieval.sparse import Hit
from server.robot_plan import ActionVocabulary, PlanStep, PlanValidationError, check_plan_safety, hold_load_after_stop


class PlanModelError(Exception):
    """The model's plan is late, malformed, outside the vocabulary or unsafe; the message says which."""


class RobotPlanModel:
    def __init__(self, policy: TaskPolicy, cfg: GenerationConfig, backend: TextBackend, vocabulary: ActionVocabulary,
                 count_tokens: Callable[[str], int] = approx_tokens) -> None:
        self.policy = policy
        self.backend = backend
        self.vocabulary = vocabulary
        self.prompts = PromptBuilder(cfg.prompt, count_tokens, system=ROBOT_SYSTEM)
        self.schema = vocabulary.json_schema()
        self.last_stats: StreamStats | None = None
        g = cfg.grounding
        guard = PromptLeakGuard((ROBOT_SYSTEM, VOICE_SYSTEM), n=g.leak_ngram, share=g.leak_share)
        self.leak_guard = guard if g.leak_guard else None
        self.injection = InjectionFilter(guard) if g.filter_injections else None

    def situation_text(self, s: RobotSituation, procedure: tuple[PlanStep, ...], fault: FaultCode | None) -> str:
        steps = json.dumps({"steps": [st.as_dict() for st in procedure]}, separators=(",", ":"))
        fault_text = f"{fault.code} ({fault.name}, {fault.severity})" if fault else (s.fault_code or "none")
        return (f"Robot {s.robot_id}; fault {fault_text}; carrying a load: {'yes' if s.carrying_load else 'no'}; "
                f"task: {s.task or '-'}; state: {s.state or '-'}; location: {s.location or '-'}.\n"
                f"Retrieved procedure [1] as JSON: {steps}\nActions:\n{self.vocabulary.describe()}")

    async def adapt(self, s: RobotSituation, hit: Hit, procedure: tuple[PlanStep, ...], *, fault: FaultCode | None,
                    time_s: float) -> tuple[PlanStep, ...]:
        """The model's plan for `s`, validated; raises PlanModelError. Runs under `time_s` for the first
        token (the stage's own timeout bounds the whole call)."""
        if self.injection is not None:
            screened, _ = self.injection.screen([hit])
            # A passage that was all injection leaves the procedure JSON (in `extra`) to go on.
            hit = screened[0] if screened else dataclasses.replace(hit, passage=dataclasses.replace(hit.passage,
                                                                                                   text=""))
        prompt = self.prompts.build("Write the recovery plan for this robot now.", [hit],
                                    extra=self.situation_text(s, procedure, fault))
        limits = DecodeLimits(max_tokens=self.policy.max_tokens, first_token_s=time_s, stall_s=time_s,
                              json_schema=self.schema)
        stats = StreamStats()
        self.last_stats = stats
        parts = [d.text async for d in guarded(
            self.backend.stream(prompt, limits, model=self.policy.model, adapter=self.policy.adapter or None),
            limits, stats)]
        return self.validate("".join(parts), s, fault)

    def validate(self, text: str, s: RobotSituation, fault: FaultCode | None) -> tuple[PlanStep, ...]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanModelError(f"model output is not JSON ({e.msg} at {e.pos})") from None
        raw = data.get("steps") if isinstance(data, Mapping) else None
        if raw is None:
            raise PlanModelError("model output has no \"steps\" list")
        try:
            steps = self.vocabulary.parse_steps(raw)
        except PlanValidationError as e:
            raise PlanModelError(f"model plan outside the action vocabulary: {e}") from None
        if self.leak_guard is not None:
            for step in steps:
                for name, value in step.params.items():
                    why = self.leak_guard.check(value) if isinstance(value, str) else ""
                    if why:
                        raise PlanModelError(f"model plan rejected: {step.action}.{name} {why}")
        if s.carrying_load:
            steps = hold_load_after_stop(steps)
        problems = self.vocabulary.validate(steps) + check_plan_safety(
            steps, severity=fault.severity if fault else None, carrying_load=s.carrying_load, people_involved=False)
        if problems:
            raise PlanModelError("model plan rejected: " + "; ".join(problems[:3]))
        return steps


__all__ = ["PlanModelError", "RobotPlanModel"]
