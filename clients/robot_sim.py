"""`snaprag robot`: a warehouse robot controller asking for plans at a fixed rate.

    snaprag robot                                   10 plans/s for 10 s against make run's server
    snaprag robot --rate 50 --count 500 -v          print every plan
    snaprag robot --fault E202 --fault E303         only these fault codes

Each tick sends one Plan with the controller's deadline (150 ms by default), whether or not earlier
calls have answered: a controller does not wait for a slow server, so neither does the simulator, and
latency is measured from the tick (the intended send time). Situations are drawn, seeded, from the
warehouse KB: a fault code from data/kb/warehouse/fault_codes.json, a robot of one of the three model
families, a load, a battery level and a free-text state.

Every plan is validated against the action vocabulary (data/kb/warehouse/actions.json, via
server.robot_plan.ActionVocabulary). The summary counts DEADLINE_EXCEEDED and other errors, FALLBACK
answers (a stage missed; the rule planner answered), RULES plans and invalid plans; a valid plan is also
checked against the safety ordering rules (server.robot_plan.check_plan_safety) for the situation sent.
Exit code 1 when any call failed or any plan was invalid or unsafe, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from clients.assistant import AssistantClient, PlanReply
from clients.options import add_connection_args, client_from_args
from server.robot_plan import ActionVocabulary, PlanValidationError, check_plan_safety

REPO = Path(__file__).resolve().parents[1]
FAULT_CODES_PATH = REPO / "data/kb/warehouse/fault_codes.json"
# Robot id prefixes of the demo fleet's three model families (server/pipeline/plan.py MODEL_NAMES).
FAMILIES = ("amr", "fl", "pk")
STATES = ("", "stopped in aisle", "alarm beeping on the console", "stopped mid-route", "lift not responding",
          "slow to respond", "error light blinking", "obstacle ahead", "stopped near the dock",
          "a person is walking past")  # the last one exercises the people safety rules
TASKS = ("", "move pallet P-113 from A12 to S3", "deliver tote to S3", "pick tote T-88 from A12",
         "return empty pallet to staging", "replenish bin B7")
LOCATIONS = ("aisle A12", "aisle B3", "dock 2", "staging lane S3", "charging bay 1", "cross-aisle C")
# A controller's deadline for a recovery plan: the robot is standing still while it waits.
DEFAULT_DEADLINE_MS = 150.0
# How long to wait for calls still in flight after the last tick (their own deadlines end them sooner).
DRAIN_GRACE_S = 2.0


@dataclass(frozen=True)
class RobotCall:
    """One Plan request's fields (the kwargs of AssistantClient.plan)."""

    robot_id: str
    fault_code: str = ""
    task: str = ""
    state: str = ""
    location: str = ""
    carrying_load: bool = False
    battery_pct: float | None = None

    def kwargs(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("robot_id")
        return d


class SituationSource:
    """Seeded draws of robot situations from the warehouse KB's fault codes."""

    def __init__(self, *, seed: int = 0, faults: Sequence[str] = (), fault_codes_path: Path = FAULT_CODES_PATH) -> None:
        table = json.loads(fault_codes_path.read_text(encoding="utf-8"))["codes"]
        self.severity: dict[str, str] = {code: entry["severity"] for code, entry in table.items()}
        codes = sorted(table)
        if faults:
            unknown = sorted(set(faults) - set(codes))
            if unknown:
                raise ValueError(f"unknown fault code(s) {', '.join(unknown)}; the KB has {', '.join(codes)}")
            codes = list(faults)
        self.codes = codes
        self.rng = random.Random(seed)

    def draw(self) -> RobotCall:
        r = self.rng
        family = r.choice(FAMILIES)
        robot = f"{family}-{r.randint(1, 40):03d}"
        # Forklifts carry pallets most of the time; AMRs sometimes carry totes; arms hold picks briefly.
        load_p = {"fl": 0.6, "amr": 0.3, "pk": 0.2}[family]
        return RobotCall(robot_id=robot, fault_code=r.choice(self.codes), task=r.choice(TASKS),
                         state=r.choice(STATES), location=r.choice(LOCATIONS), carrying_load=r.random() < load_p,
                         battery_pct=round(r.uniform(8.0, 100.0), 1) if r.random() < 0.7 else None)


def plan_problems(vocabulary: ActionVocabulary, reply: PlanReply) -> list[str]:
    """Why a plan does not fit the vocabulary ([] when it does). Parses the wire form, so a wrong type or
    an unknown action is caught exactly as a robot would meet it."""
    raw = [{"action": s.action, "params": dict(s.params)} for s in reply.steps]
    try:
        steps = vocabulary.parse_steps(raw)
    except PlanValidationError as e:
        return list(e.problems)
    return vocabulary.validate(steps)


# State words that mean people are involved (the fallback planner's people rules know many more).
PEOPLE_WORDS = ("person", "people", "worker", "someone")


def safety_problems(reply: PlanReply, call: RobotCall, severity: str | None) -> list[str]:
    """The ordering invariants of server.robot_plan.check_plan_safety for this situation ([] = safe)."""
    people = any(w in f"{call.state} {call.task}".lower() for w in PEOPLE_WORDS)
    return check_plan_safety(reply.steps, severity=severity, carrying_load=call.carrying_load, people_involved=people)


@dataclass
class RobotReport:
    calls: int = 0
    ok: int = 0
    deadline_exceeded: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    invalid: int = 0
    unsafe: int = 0
    """Vocabulary-valid plans that break a safety ordering rule for the situation sent."""
    invalid_examples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    late_sends_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def fallbacks(self) -> int:
        return self.modes["FALLBACK"]

    def percentiles(self) -> dict[str, float]:
        if not self.latencies_ms:
            return {}
        a = np.asarray(self.latencies_ms)
        return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
                "p99": float(np.percentile(a, 99)), "max": float(a.max())}

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "ok": self.ok, "deadline_exceeded": self.deadline_exceeded,
                "errors": dict(self.errors), "fallbacks": self.fallbacks, "modes": dict(self.modes),
                "sources": dict(self.sources), "invalid_plans": self.invalid, "unsafe_plans": self.unsafe,
                "invalid_examples": self.invalid_examples[:5], "latency_ms": self.percentiles(),
                "max_send_lag_ms": max(self.late_sends_ms, default=0.0), "wall_s": round(self.wall_s, 3)}


async def run_robot(client: AssistantClient, source: SituationSource, vocabulary: ActionVocabulary, *,
                    rate: float, count: int, duration_s: float, deadline_ms: float = DEFAULT_DEADLINE_MS,
                    on_result: Callable[[RobotCall, PlanReply | None, str, float, list[str]], None] | None = None,
                    ) -> RobotReport:
    """`count` Plan calls, one every 1/`rate` s, stopping early at `duration_s`. Never more than both."""
    if rate <= 0 or count < 1 or duration_s <= 0:
        raise ValueError("--rate, --count and --duration must be positive")
    report = RobotReport()
    start = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(call: RobotCall, intended: float) -> None:
        code = "OK"
        reply: PlanReply | None = None
        try:
            reply = await client.plan_reply(call.robot_id, timeout_s=deadline_ms / 1000.0, **call.kwargs())
        except grpc.aio.AioRpcError as e:
            code = e.code().name
        latency = (time.perf_counter() - intended) * 1000.0
        report.calls += 1
        report.latencies_ms.append(latency)
        problems: list[str] = []
        if reply is None:
            if code == "DEADLINE_EXCEEDED":
                report.deadline_exceeded += 1
            else:
                report.errors[code] += 1
        else:
            report.ok += 1
            report.modes[reply.mode] += 1
            report.sources[reply.source] += 1
            problems = plan_problems(vocabulary, reply)
            if problems:
                report.invalid += 1
            else:
                problems = [f"unsafe: {p}" for p in safety_problems(reply, call, source.severity.get(call.fault_code))]
                report.unsafe += bool(problems)
            if problems:
                report.invalid_examples.append(f"{call.robot_id} {call.fault_code}: {'; '.join(problems)}")
        if on_result is not None:
            on_result(call, reply, code, latency, problems)

    for i in range(count):
        intended = start + i / rate
        if intended - start >= duration_s:
            break
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        report.late_sends_ms.append(max(0.0, (time.perf_counter() - intended) * 1000.0))
        task = asyncio.create_task(one(source.draw(), intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=deadline_ms / 1000.0 + DRAIN_GRACE_S)
    for t in tasks:  # only a call ignoring its own deadline can still be here
        t.cancel()
    report.wall_s = time.perf_counter() - start
    return report


def _line(call: RobotCall, reply: PlanReply | None, code: str, latency: float, problems: list[str]) -> str:
    what = f"{call.robot_id:<7} {call.fault_code or '-':<5} {'loaded' if call.carrying_load else 'empty ':<6}"
    if reply is None:
        return f"[{latency:7.1f} ms] {what} -> {code}"
    actions = ", ".join(s.action for s in reply.steps)
    flag = f"  REJECTED: {'; '.join(problems)}" if problems else ""
    return f"[{latency:7.1f} ms] {what} -> {reply.source:<9} {reply.mode:<8} {actions}{flag}"


def _print_summary(r: RobotReport, rate: float, deadline_ms: float) -> None:
    pct = r.percentiles()
    lat = "  ".join(f"{k} {v:.1f} ms" for k, v in pct.items())
    print(f"\nrobot controller: {r.calls} Plan calls at {rate:g}/s over {r.wall_s:.1f} s, deadline {deadline_ms:g} ms")
    print(f"  latency from the tick: {lat}")
    print(f"  ok {r.ok}   DEADLINE_EXCEEDED {r.deadline_exceeded}   other errors {sum(r.errors.values())}"
          + (f" ({dict(r.errors)})" if r.errors else ""))
    print(f"  modes {dict(r.modes)}   sources {dict(r.sources)}   fallbacks {r.fallbacks}")
    print(f"  invalid plans {r.invalid}   unsafe plans {r.unsafe}"
          + "".join(f"\n    {x}" for x in r.invalid_examples[:5]))
    lag = max(r.late_sends_ms, default=0.0)
    if lag > 50:
        print(f"  note: the simulator itself sent up to {lag:.0f} ms late (busy machine); those ms are counted")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="snaprag robot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=10.0, help="Plan calls per second (default 10)")
    ap.add_argument("--count", type=int, default=100, help="most calls to send (default 100)")
    ap.add_argument("--duration", type=float, default=60.0, help="stop sending after this many seconds (default 60)")
    ap.add_argument("--deadline-ms", type=float, default=DEFAULT_DEADLINE_MS,
                    help=f"gRPC deadline of each Plan call (default {DEFAULT_DEADLINE_MS:g})")
    ap.add_argument("--fault", action="append", default=[], help="draw only these fault codes (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="situation draws are reproducible per seed (default 0)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every plan as it arrives")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_connection_args(ap)
    return ap


async def _main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    vocabulary = ActionVocabulary.load()
    source = SituationSource(seed=args.seed, faults=args.fault)
    total = min(args.count, int(args.rate * args.duration) + 1)
    bar = None if (args.verbose or args.json) else tqdm(total=total, desc="plans", unit="call", file=sys.stderr,
                                                          leave=False, disable=None)

    def on_result(call: RobotCall, reply: PlanReply | None, code: str, latency: float, problems: list[str]) -> None:
        if args.verbose:
            print(_line(call, reply, code, latency, problems), flush=True)
        elif bar is not None:
            bar.update(1)

    async with client_from_args(args, timeout_s=args.deadline_ms / 1000.0) as client:
        report = await run_robot(client, source, vocabulary, rate=args.rate, count=args.count,
                                 duration_s=args.duration, deadline_ms=args.deadline_ms, on_result=on_result)
    if bar is not None:
        bar.close()
    if report.calls and report.errors.get("UNAVAILABLE") == report.calls:
        print(f"snaprag robot: no server at {args.target} (UNAVAILABLE); start one with `make run`, or pass "
              "--target", file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_summary(report, args.rate, args.deadline_ms)
    return 1 if (report.invalid or report.unsafe or report.deadline_exceeded or report.errors) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except ValueError as e:
        print(f"snaprag robot: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
