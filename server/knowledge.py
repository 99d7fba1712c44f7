"""The embedded knowledge bases: passages and golden question sets, loaded from JSONL.

Loading is strict: a malformed line stops startup with the file, line and field named, because a
half-loaded knowledge base would serve silently wrong answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
FILTER_FIELDS = ("intent", "domain", "locale")


class KnowledgeBaseError(ValueError):
    """A knowledge-base file is missing or malformed; the message names file, line and field."""


@dataclass(frozen=True, slots=True)
class Passage:
    id: str
    text: str
    intent: str
    domain: str
    locale: str
    confidence: float
    source: str
    fault_code: str = ""
    # Warehouse procedures: raw [{"action", "params"}] steps, validated by the Plan stage.
    steps: tuple[Mapping[str, Any], ...] = ()

    def field_value(self, name: str) -> str:
        return str(getattr(self, name))


@dataclass(frozen=True, slots=True)
class GoldenQuestion:
    id: str
    question: str
    relevant: tuple[str, ...]
    intent: str = ""


@dataclass(slots=True)
class KnowledgeBase:
    passages: list[Passage] = field(default_factory=list)
    by_id: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.passages)

    def values(self, name: str) -> set[str]:
        """Distinct values of a filter field (for validating filters and listing the valid ones)."""
        return {p.field_value(name) for p in self.passages}


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": str, "text": str, "intent": str, "domain": str, "locale": str, "confidence": (int, float), "source": str,
}


def _parse_passage(obj: Any, where: str) -> Passage:
    if not isinstance(obj, dict):
        raise KnowledgeBaseError(f"{where}: expected a JSON object")
    for name, typ in _REQUIRED.items():
        if name not in obj:
            raise KnowledgeBaseError(f"{where}: missing field '{name}'")
        if not isinstance(obj[name], typ) or isinstance(obj[name], bool):
            raise KnowledgeBaseError(f"{where}: field '{name}' has the wrong type ({type(obj[name]).__name__})")
    if not ID_PATTERN.match(obj["id"]):
        raise KnowledgeBaseError(f"{where}: id {obj['id']!r} must match {ID_PATTERN.pattern}")
    if not obj["text"].strip():
        raise KnowledgeBaseError(f"{where}: field 'text' is empty")
    confidence = float(obj["confidence"])
    if not 0.0 <= confidence <= 1.0:
        raise KnowledgeBaseError(f"{where}: confidence {confidence} is outside [0, 1]")
    steps = obj.get("steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise KnowledgeBaseError(f"{where}: 'steps' must be a list of {{action, params}} objects")
    return Passage(
        id=obj["id"], text=obj["text"].strip(), intent=obj["intent"], domain=obj["domain"], locale=obj["locale"],
        confidence=confidence, source=obj["source"], fault_code=str(obj.get("fault_code", "")).upper(),
        steps=tuple(steps),
    )


def parse_passage(obj: Any, where: str) -> Passage:
    """One passage object in our schema (data/README.md); KnowledgeBaseError names `where` and the field."""
    return _parse_passage(obj, where)


def _jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise KnowledgeBaseError(f"{where}: not valid JSON ({e.msg})") from e


def _parse_beir(obj: dict[str, Any], where: str) -> Passage:
    """A BEIR corpus line: {"_id", "title", "text"} (no metadata: confidence 1, empty filters)."""
    pid = obj.get("_id")
    if not isinstance(pid, str) or not pid.strip() or len(pid) > 128:
        raise KnowledgeBaseError(f"{where}: field '_id' must be a non-empty string of at most 128 characters")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise KnowledgeBaseError(f"{where}: field 'text' is missing or empty")
    title = obj.get("title") or ""
    if not isinstance(title, str):
        raise KnowledgeBaseError(f"{where}: field 'title' must be a string")
    return Passage(id=pid.strip(), text=text.strip(), intent="", domain="", locale="", confidence=1.0,
                   source=title.strip())


def load_corpus_records(path: Path) -> Iterable[Passage]:
    """Passages from one JSONL file: our schema (data/README.md) or a BEIR corpus.jsonl (`_id`, `title`, `text`)."""
    if not path.exists():
        raise KnowledgeBaseError(f"{path}: no such file")
    for where, obj in _jsonl(path):
        if isinstance(obj, dict) and "_id" in obj and "id" not in obj:
            yield _parse_beir(obj, where)
        else:
            yield _parse_passage(obj, where)


def knowledge_base_from(records: Iterable[Passage]) -> KnowledgeBase:
    kb = KnowledgeBase()
    for p in records:
        if p.id in kb.by_id:
            raise KnowledgeBaseError(f"duplicate passage id {p.id!r}")
        kb.by_id[p.id] = len(kb.passages)
        kb.passages.append(p)
    return kb


def load_knowledge_base(folders: Sequence[Path]) -> KnowledgeBase:
    kb = KnowledgeBase()
    for folder in folders:
        files = sorted(folder.glob("passages*.jsonl"))
        if not files:
            raise KnowledgeBaseError(f"{folder}: no passages*.jsonl files (knowledge_base.paths in the config)")
        for path in files:
            for where, obj in _jsonl(path):
                p = _parse_passage(obj, where)
                if p.id in kb.by_id:
                    raise KnowledgeBaseError(f"{where}: duplicate passage id {p.id!r}")
                kb.by_id[p.id] = len(kb.passages)
                kb.passages.append(p)
    return kb


def load_golden(folder: Path, split: str) -> list[GoldenQuestion]:
    """Golden questions of one split ("train" or "dev") from golden_<split>*.jsonl in a KB folder."""
    out: list[GoldenQuestion] = []
    for path in sorted(folder.glob(f"golden_{split}*.jsonl")):
        for where, obj in _jsonl(path):
            try:
                out.append(GoldenQuestion(id=obj["id"], question=obj["question"], relevant=tuple(obj["relevant"]),
                                          intent=obj.get("intent", "")))
            except (KeyError, TypeError) as e:
                raise KnowledgeBaseError(f"{where}: golden question needs id, question, relevant ({e})") from e
    return out
