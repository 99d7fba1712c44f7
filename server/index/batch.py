"""Validating an upsert batch, all-or-nothing: every problem is found before anything is applied.

A batch is one Upsert stream (or one `--batch` of a JSONL file in the CLI). Each passage must have an
id of [a-z0-9][a-z0-9-]* (at most 128 characters), non-empty text of at most [index]
max_passage_chars characters, valid UTF-8 everywhere, a confidence in [0, 1], well-formed steps, and
an id that appears once in the batch. The first problem is reported with the passage's position
(`passages[i]`, counted over the whole stream) or JSONL line and the field; nothing of the batch is
applied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from server.errors import InvalidArgument
from server.knowledge import ID_PATTERN, KnowledgeBaseError, Passage, parse_passage

MAX_ID_CHARS = 128


def field_name(where: str, name: str) -> str:
    """`passages[3].text` for a stream position, `FILE:LINE field 'text'` for a JSONL line."""
    return f"{where}.{name}" if where.endswith("]") else f"{where} field '{name}'"


def passage_from_fields(fields: dict[str, Any], where: str, max_chars: int) -> Passage:
    """One passage from plain fields (an AdminPassage or a JSONL object); InvalidArgument names `where`."""
    text = fields.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(field_name(where, "text"), "is empty or missing; every passage needs its text")
    if len(text) > max_chars:
        raise InvalidArgument(field_name(where, "text"), f"is {len(text)} characters; the limit is {max_chars} "
                              "([index] max_passage_chars): split the passage")
    if "\x00" in text:
        raise InvalidArgument(field_name(where, "text"), "contains a NUL character")
    pid = fields.get("id")
    if not isinstance(pid, str) or not pid:
        raise InvalidArgument(field_name(where, "id"), "is empty or missing")
    if len(pid) > MAX_ID_CHARS or not ID_PATTERN.match(pid):
        raise InvalidArgument(field_name(where, "id"), f"{pid[:80]!r} must match {ID_PATTERN.pattern} and be at "
                              f"most {MAX_ID_CHARS} characters")
    obj = {"intent": "", "domain": "", "locale": "", "source": "", "confidence": 1.0, **fields}
    try:
        return parse_passage(obj, where)
    except KnowledgeBaseError as e:
        # "<where>: field 'x' has the wrong type (...)" -> field named, same wording as the KB loader.
        msg = str(e).removeprefix(f"{where}: ")
        raise InvalidArgument(where, msg) from None


def check_unique(passages: Sequence[Passage], where: Sequence[str]) -> None:
    first: dict[str, int] = {}
    for i, p in enumerate(passages):
        if p.id in first:
            raise InvalidArgument(field_name(where[i], "id"), f"{p.id!r} is already {where[first[p.id]]} in this "
                                  "batch; send each id once per batch (a later batch replaces it)")
        first[p.id] = i


def admin_passage_fields(msg: Any, where: str) -> dict[str, Any]:
    """An AdminPassage message as plain fields (steps parsed from steps_json)."""
    fields: dict[str, Any] = {"id": msg.id.strip(), "text": msg.text, "intent": msg.intent, "domain": msg.domain,
                              "locale": msg.locale, "source": msg.source, "fault_code": msg.fault_code}
    if msg.HasField("confidence"):
        fields["confidence"] = float(msg.confidence)
    if msg.steps_json.strip():
        try:
            fields["steps"] = json.loads(msg.steps_json)
        except json.JSONDecodeError as e:
            raise InvalidArgument(field_name(where, "steps_json"),
                                  f"is not valid JSON ({e.msg} at column {e.colno})") from None
    return fields


def read_jsonl(path: Path, max_chars: int) -> Iterator[tuple[int, Passage]]:
    """(line number, passage) for each non-blank line; InvalidArgument names `FILE:LINE` and the field.
    Lines are decoded one by one, so invalid UTF-8 is reported with its line too."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidArgument(where, f"not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                      "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(where, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise InvalidArgument(where, "expected a JSON object")
            yield lineno, passage_from_fields(obj, where, max_chars)
