"""The robot plan model tier through a real Plan call: a valid adapted plan is served as MODEL; a late,
malformed, out-of-vocabulary or unsafe one keeps the retrieved procedure, marked DEGRADED with why."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.generate.backend import DecodeLimits, Prompt, TextDelta
from server.generate.robot import RobotPlanModel
from server.proto import pb
from server.runtime import Runtime

ROBOT, FAULT = "amr-001", "E302"


class JsonBackend:
    name = "vllm"

    def __init__(self, text: str, delay_s: float = 0.0) -> None:
        self.text, self.delay_s = text, delay_s
        self.limits: list[DecodeLimits] = []
        self.prompts: list[Prompt] = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def stream(self, prompt: Prompt, limits: DecodeLimits, *, model: str,
                     adapter: str | None = None) -> AsyncIterator[TextDelta]:
        self.limits.append(limits)
        self.prompts.append(prompt)
        await asyncio.sleep(self.delay_s)
        for i in range(0, len(self.text), 8):
            yield TextDelta(self.text[i:i + 8])


def robot_model(runtime: Runtime, backend: JsonBackend) -> RobotPlanModel:
    g = runtime.cfg.generation
    return RobotPlanModel(g.robot, g, backend, runtime.vocabulary)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def retrieved_steps(runtime: Runtime) -> list[dict[str, Any]]:
    from server.fallback import RobotSituation
    from server.pipeline.plan import PlanPipeline

    result = asyncio.run(PlanPipeline(runtime).run(RobotSituation(robot_id=ROBOT, fault_code=FAULT),
                                                   runtime.cfg.profiles["robot"], None))
    assert result.source.value == "retrieved"
    return [s.as_dict() for s in result.steps]


async def test_valid_model_plan_is_served_as_model(make_server: Any, runtime: Runtime,
                                                   retrieved_steps: list[dict[str, Any]]) -> None:
    adapted = [*retrieved_steps, {"action": "notify_operator", "params": {"message": "recovered after E302"}}]
    backend = JsonBackend(json.dumps({"steps": adapted}))
    _, client = await make_server(robot_model=robot_model(runtime, backend))
    r = await client.plan(ROBOT, fault_code=FAULT, state="stopped in aisle 3")
    assert r.source == pb.MODEL and r.mode == pb.FULL, r.reason
    assert [s.action for s in r.steps][-1] == "notify_operator"
    assert backend.limits[-1].json_schema is not None, "the vocabulary schema constrains the output"
    user = backend.prompts[-1].messages[-1].content
    assert "E302" in user and "stopped in aisle 3" in user and "notify_operator(" in user
    assert any(t.stage == "model" and t.outcome == pb.OK for t in r.timings)


@pytest.mark.parametrize("text, why", [
    ("{\"steps\": [", "not JSON"),
    (json.dumps({"plan": []}), "no \"steps\""),
    (json.dumps({"steps": [{"action": "fly_away", "params": {}}]}), "outside the action vocabulary"),
    (json.dumps({"steps": [{"action": "release_brake", "params": {}}]}), "model plan rejected"),
])
async def test_bad_model_plan_keeps_the_retrieved_procedure(make_server: Any, runtime: Runtime,
                                                            retrieved_steps: list[dict[str, Any]],
                                                            text: str, why: str) -> None:
    _, client = await make_server(robot_model=robot_model(runtime, JsonBackend(text)))
    r = await client.plan(ROBOT, fault_code=FAULT)
    assert r.source == pb.RETRIEVED and r.mode == pb.DEGRADED and r.missed_stage == "model"
    assert why in r.reason and "kept the retrieved procedure" in r.reason
    assert [{"action": s.action} for s in r.steps] == [{"action": s["action"]} for s in retrieved_steps]


async def test_late_model_plan_keeps_the_retrieved_procedure_inside_the_deadline(
        make_server: Any, runtime: Runtime, retrieved_steps: list[dict[str, Any]]) -> None:
    slow = JsonBackend(json.dumps({"steps": retrieved_steps}), delay_s=1.0)
    _, client = await make_server(robot_model=robot_model(runtime, slow))
    r = await client.plan(ROBOT, fault_code=FAULT, timeout_s=0.15)
    assert r.source == pb.RETRIEVED and r.mode == pb.DEGRADED and r.missed_stage == "model"
    assert r.total_ms < 150
