"""Deterministic rule-based fallback: robot plans and spoken answers when the pipeline misses.

    planner = FallbackPlanner.load()            # reads data/fallback/rules.toml once; no I/O after
    planner.plan(RobotSituation("fl-004", fault_code="E202", carrying_load=True))
    planner.answer("how do i reset my smart plug", intent="troubleshooting")

Errors: RulesError (a ValueError) at load for a malformed rules file, naming the rule id and field.
plan() and answer() never raise on any situation or query.
"""

from server.fallback.planner import FallbackAnswer, FallbackPlan, FallbackPlanner, RobotSituation
from server.fallback.rules import RulesError

__all__ = ["FallbackAnswer", "FallbackPlan", "FallbackPlanner", "RobotSituation", "RulesError"]
