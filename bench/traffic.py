"""What the bench sends (traffic kinds) and what it keeps from each response (per-phase statistics).

Traffic kinds, each one RPC as its real caller sends it:

    plan      robot controller: Plan with a 150 ms deadline, situations drawn from the warehouse KB
    ask       voice: Ask with a KB question; measures the first answer chunk and the whole answer
    retrieve  tools: Retrieve k=5 with a KB question
    empty     Plan whose state names a person: the safety rule answers before any stage runs, so this is
              our servicer with an (almost) empty pipeline, the figure to hold against the echo server
    miss      Plan under the `bench_miss` profile (retrieve budget 1 ms): retrieval always misses, so
              every answer is the fallback path; measures the time from the miss to the plan at the client
    mix       plan / ask / retrieve drawn per request by weight (default 60 / 20 / 20)

Latency is client-side from the request's intended send time (bench.load). Per response we also keep
the server's own figures: total_ms, each stage's elapsed time, the serving mode, the stage that missed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np

from bench.histogram import LatencyHistogram
from bench.load import Operation, Shot
from bench.slo import Measured
from clients.assistant import AssistantClient, PlanReply, StageTime, miss_offset_ms, plan_steps
from clients.robot_sim import RobotCall, SituationSource, safety_problems
from server.config import REPO_ROOT
from server.knowledge import load_golden
from server.proto import pb
from server.robot_plan import ActionVocabulary, PlanValidationError

KINDS = ("plan", "ask", "retrieve", "empty", "miss", "mix")
RPC_OF = {"plan": "Plan", "empty": "Plan", "miss": "Plan", "ask": "Ask", "retrieve": "Retrieve"}
# The profile that makes every Plan miss its retrieval stage. A server the bench starts gets it added to
# its config; a server given with --target needs it in its own config to run `miss` phases.
MISS_PROFILE = "bench_miss"
MISS_PROFILE_TOML = f"""
[profiles.{MISS_PROFILE}]   # added by `snaprag bench`: retrieval always misses, the fallback path answers
total_ms = 150
retrieve_ms = 1
plan_ms = 40
first_chunk_ms = 150
first_token_ms = 40
fallback_reserve_ms = 5
"""
PEOPLE_STATE = "stopped, a person is standing in front of the robot"
DEFAULT_MIX = {"plan": 0.6, "ask": 0.2, "retrieve": 0.2}
# Deadlines per RPC. Plan: the robot controller's. Ask / Retrieve: generous, so the tail is measured
# rather than cut off (their SLOs are checked on the measured latency, not by the deadline).
PLAN_DEADLINE_MS = 150.0
ASK_DEADLINE_S = 10.0
RETRIEVE_DEADLINE_S = 5.0


@dataclass(slots=True)
class Observation:
    """What one call returned (timestamps are perf_counter seconds)."""

    rpc: str
    kind: str
    code: str = "OK"
    first_chunk_at: float | None = None
    server_total_ms: float | None = None
    stages: tuple[StageTime, ...] = ()
    mode: str = ""
    miss_at_ms: float | None = None
    """Server time from the pipeline start to the missed stage giving up (None: nothing missed)."""
    invalid: bool = False
    """Plan: does not validate against the action vocabulary."""
    unsafe: bool = False
    """Plan: valid, but breaks a safety ordering rule for the situation sent (check_plan_safety)."""
    detail: str = ""


def kb_questions(kb: str, splits: Sequence[str] = ("dev", "train")) -> list[str]:
    return [q.question for s in splits for q in load_golden(REPO_ROOT / "data/kb" / kb, s)]


class Traffic:
    """Builds one operation per traffic kind against one client. Requests are drawn from seeded pools, so
    two targets measured with the same seed get the same requests in the same order."""

    def __init__(self, client: AssistantClient, *, seed: int = 0, plan_deadline_ms: float = PLAN_DEADLINE_MS,
                 mix: dict[str, float] | None = None, vocabulary: ActionVocabulary | None = None,
                 canned: bool = False) -> None:
        """`canned`: the target answers every call with the same recorded response (the echo server), so
        the timings it reports and the plans it returns say nothing about this request: only the
        client-side latency is kept."""
        self.client = client
        self.canned = canned
        self.seed = seed
        self.plan_deadline_s = plan_deadline_ms / 1000.0
        self.mix = dict(mix or DEFAULT_MIX)
        bad = set(self.mix) - {"plan", "ask", "retrieve"}
        if bad or not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix weights must be non-negative over plan, ask, retrieve; got {self.mix}")
        self.vocabulary = vocabulary or ActionVocabulary.load()
        rng = np.random.default_rng(seed)
        self.voice_questions = kb_questions("voice")
        self.retrieve_questions = self.voice_questions + kb_questions("warehouse")
        rng.shuffle(self.voice_questions)
        rng.shuffle(self.retrieve_questions)
        self.source = SituationSource(seed=seed)
        self.situations = [self.source.draw() for _ in range(512)]

    # ------------------------------------------------------------------ operations
    def operation(self, kind: str, *, max_count: int) -> Operation:
        if kind not in KINDS:
            raise ValueError(f"unknown traffic kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        if kind != "mix":
            return getattr(self, kind)  # type: ignore[no-any-return]
        names = list(self.mix)
        weights = np.asarray([self.mix[n] for n in names], dtype=float)
        drawn = np.random.default_rng(self.seed + 1).choice(len(names), size=max_count, p=weights / weights.sum())
        ops = {n: getattr(self, n) for n in names}

        async def mixed(i: int) -> Observation:
            obs: Observation = await ops[names[int(drawn[i % max_count])]](i)
            return obs

        return mixed

    def _server(self, obs: Observation, total_ms: float, timings: Any, mode: int) -> None:
        """Keep the server's own figures from a response (unless they are canned)."""
        obs.mode = pb.ServingMode.Name(mode)
        if not self.canned:
            obs.server_total_ms = total_ms
            obs.stages = tuple(StageTime.from_pb(t) for t in timings)
            obs.miss_at_ms = miss_offset_ms(obs.stages)

    async def plan(self, i: int) -> Observation:
        return await self._plan("plan", self.situations[i % len(self.situations)])

    async def empty(self, i: int) -> Observation:
        return await self._plan("empty", RobotCall(f"amr-{i % 40 + 1:03d}", state=PEOPLE_STATE))

    async def miss(self, i: int) -> Observation:
        s = self.situations[i % len(self.situations)]
        # no people / hazard words: the rules must not pre-empt retrieval, which has to run (and miss)
        return await self._plan("miss", replace(s, state="stopped in aisle"), profile=MISS_PROFILE)

    async def _plan(self, kind: str, call: RobotCall, profile: str = "") -> Observation:
        obs = Observation("Plan", kind)
        try:
            resp = await self.client.plan(call.robot_id, timeout_s=self.plan_deadline_s, profile=profile,
                                          **call.kwargs())
        except grpc.aio.AioRpcError as e:
            obs.code, obs.detail = e.code().name, e.details() or ""
            return obs
        self._server(obs, resp.total_ms, resp.timings, resp.mode)
        if self.canned:
            return obs
        try:
            steps = self.vocabulary.parse_steps(plan_steps(resp))
            obs.invalid = bool(self.vocabulary.validate(steps))
        except PlanValidationError as e:
            obs.invalid, obs.detail = True, str(e)[:200]
        if not obs.invalid:
            reply = PlanReply.from_pb(resp)
            obs.unsafe = bool(safety_problems(reply, call, self.source.severity.get(call.fault_code)))
        return obs

    async def ask(self, i: int) -> Observation:
        obs = Observation("Ask", "ask")
        q = self.voice_questions[i % len(self.voice_questions)]
        try:
            async for ev in self.client.ask_stream(q, timeout_s=ASK_DEADLINE_S):
                kind = ev.WhichOneof("event")
                if kind == "chunk" and obs.first_chunk_at is None:
                    obs.first_chunk_at = time.perf_counter()
                elif kind == "final":
                    self._server(obs, ev.final.total_ms, ev.final.timings, ev.final.mode)
        except grpc.aio.AioRpcError as e:
            obs.code, obs.detail = e.code().name, e.details() or ""
        return obs

    async def retrieve(self, i: int) -> Observation:
        obs = Observation("Retrieve", "retrieve")
        q = self.retrieve_questions[i % len(self.retrieve_questions)]
        try:
            resp = await self.client.retrieve(q, k=5, timeout_s=RETRIEVE_DEADLINE_S)
        except grpc.aio.AioRpcError as e:
            obs.code, obs.detail = e.code().name, e.details() or ""
            return obs
        self._server(obs, resp.total_ms, resp.timings, pb.FULL)
        return obs


class PhaseStats:
    """Everything one phase measured, warm-up excluded: HDR histograms and counters."""

    def __init__(self) -> None:
        self.latency: dict[str, LatencyHistogram] = {}
        """SLO metrics (bench.slo.METRICS) plus "ask" (whole answer) and per-kind e2e ("kind:empty", ...)."""
        self.server_total: dict[str, LatencyHistogram] = {}
        self.stages: dict[str, LatencyHistogram] = {}
        """"RPC/stage" -> the server-reported elapsed time of that stage (OK responses only)."""
        self.overhead: dict[str, LatencyHistogram] = {}
        """RPC -> client e2e minus the server's pipeline time: transport, queueing, (de)serialisation."""
        self.admitted: dict[str, LatencyHistogram] = {}
        """The SLO metrics ("plan", "retrieve", "first_chunk") over OK calls only: what admitted callers got."""
        self.refused: dict[str, LatencyHistogram] = {}
        """RPC -> e2e latency of the calls admission control refused (RESOURCE_EXHAUSTED): how fast a no came."""
        self.send_lag = LatencyHistogram()
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.invalid_plans = 0
        self.unsafe_plans = 0
        self.plans = 0
        self.warmup = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.error_examples: list[str] = []

    def _h(self, table: dict[str, LatencyHistogram], key: str) -> LatencyHistogram:
        h = table.get(key)
        if h is None:
            h = table[key] = LatencyHistogram()
        return h

    def add(self, shot: Shot, *, measured: bool) -> None:
        if not measured:
            self.warmup += 1
            return
        obs: Observation | None = shot.result
        self.send_lag.record_ms(max(0.0, shot.send_lag_ms))
        self.first_at = shot.intended if self.first_at is None else min(self.first_at, shot.intended)
        self.last_at = shot.done if self.last_at is None else max(self.last_at, shot.done)
        if obs is None:  # the operation itself raised or was cancelled at the end of the drain
            rpc, kind, code = "unknown", "unknown", "CLIENT_ERROR"
        else:
            rpc, kind, code = obs.rpc, obs.kind, obs.code
        e2e = shot.latency_ms
        self.calls[rpc] += 1
        self.codes[f"{rpc} {code}"] += 1
        self._h(self.latency, f"kind:{kind}").record_ms(e2e)
        metric = {"Plan": "plan", "Retrieve": "retrieve", "Ask": "ask"}.get(rpc)
        if metric:
            self._h(self.latency, metric).record_ms(e2e)
        if code == "RESOURCE_EXHAUSTED":
            self._h(self.refused, rpc).record_ms(e2e)
        if code != "OK" or obs is None:
            self.errors[rpc] += 1
            if len(self.error_examples) < 5:
                self.error_examples.append(f"{rpc} {code}: {(obs.detail if obs else shot.error)[:160]}")
            if rpc == "Ask":  # no chunk arrived: the wait until the failure is what the user got
                self._h(self.latency, "first_chunk").record_ms(e2e)
            return
        self.modes[f"{rpc} {obs.mode}"] += 1
        if metric and metric != "ask":
            self._h(self.admitted, metric).record_ms(e2e)
        if rpc == "Ask":
            if obs.first_chunk_at is not None:
                first_ms = (obs.first_chunk_at - shot.intended) * 1000.0
                self._h(self.latency, "first_chunk").record_ms(first_ms)
                self._h(self.admitted, "first_chunk").record_ms(first_ms)
        if rpc == "Plan":
            self.plans += 1
            self.invalid_plans += int(obs.invalid)
            self.unsafe_plans += int(obs.unsafe)
            if obs.miss_at_ms is not None and obs.mode == "FALLBACK":
                self._h(self.latency, "fallback_after_miss").record_ms(max(0.0, e2e - obs.miss_at_ms))
        if obs.server_total_ms is not None:
            self._h(self.server_total, rpc).record_ms(obs.server_total_ms)
            self._h(self.overhead, rpc).record_ms(max(0.0, e2e - obs.server_total_ms))
        for t in obs.stages:
            if t.outcome in ("OK", "MISSED_BUDGET", "FAILED"):
                self._h(self.stages, f"{rpc}/{t.stage}").record_ms(t.elapsed_ms)

    @property
    def achieved_rate(self) -> float:
        n = sum(self.calls.values())
        if not n or self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return 0.0
        return n / (self.last_at - self.first_at)

    def measured(self) -> Measured:
        slo_latency = {k: h for k, h in self.latency.items() if k in ("plan", "fallback_after_miss", "first_chunk",
                                                                      "retrieve")}
        return Measured(latency=slo_latency, calls=dict(self.calls), errors=dict(self.errors),
                        invalid_plans=self.invalid_plans, unsafe_plans=self.unsafe_plans, plans=self.plans)

    def measured_admitted(self) -> Measured:
        """The admitted calls only: latency over OK calls, and as errors every status but RESOURCE_EXHAUSTED
        (a clean refusal is the designed answer to overload; anything else is a failure)."""
        errors = {rpc: n - sum(c for key, c in self.codes.items() if key == f"{rpc} RESOURCE_EXHAUSTED")
                  for rpc, n in self.errors.items()}
        return Measured(latency=dict(self.admitted), calls=dict(self.calls), errors=errors,
                        invalid_plans=self.invalid_plans, unsafe_plans=self.unsafe_plans, plans=self.plans)

    def to_dict(self, *, encoded: bool = True) -> dict[str, Any]:
        def table(t: dict[str, LatencyHistogram]) -> dict[str, Any]:
            return {k: h.summary(encoded=encoded) for k, h in sorted(t.items())}

        return {"calls": dict(self.calls), "errors": dict(self.errors), "codes": dict(self.codes),
                "modes": dict(self.modes), "plans": self.plans, "invalid_plans": self.invalid_plans,
                "unsafe_plans": self.unsafe_plans,
                "warmup_excluded": self.warmup, "achieved_rate_per_s": round(self.achieved_rate, 2),
                "latency_ms": table(self.latency), "server_total_ms": table(self.server_total),
                "stage_ms": table(self.stages), "overhead_ms": table(self.overhead),
                "admitted_ms": table(self.admitted), "refused_ms": table(self.refused),
                "send_lag_ms": self.send_lag.summary(), "error_examples": self.error_examples}
