"""What a pipeline produces, independent of the wire format (the servicer maps these to protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from server.generate.base import GenerationRecord, Source
from server.pipeline.stage import StageTiming
from server.retrieval.sparse import Hit
from server.robot_plan import PlanStep


class Mode(Enum):
    FULL = "full"
    DEGRADED = "degraded"
    FALLBACK = "fallback"


class PlanSource(Enum):
    RETRIEVED = "retrieved"
    MODEL = "model"
    RULES = "rules"


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    text: str
    index: int
    markers: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class CitationsEvent:
    sources: list[Source]


@dataclass(frozen=True, slots=True)
class TimingEvent:
    timing: StageTiming


@dataclass(frozen=True, slots=True)
class FinalEvent:
    mode: Mode
    reason: str
    missed_stage: str
    timings: list[StageTiming]
    answer_text: str
    generator: str
    total_ms: float
    first_chunk_ms: float
    early_retrieval_used: bool = False
    interrupted: bool = False
    generation: GenerationRecord | None = None


AnswerEvent = ChunkEvent | CitationsEvent | TimingEvent | FinalEvent


@dataclass(frozen=True, slots=True)
class PlanResult:
    steps: tuple[PlanStep, ...]
    source: PlanSource
    mode: Mode
    reason: str
    missed_stage: str = ""
    rule_id: str = ""
    citations: list[Source] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    total_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class RetrieveResult:
    hits: list[Hit]
    timings: list[StageTiming]
    total_ms: float
