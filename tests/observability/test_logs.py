"""Structured JSON logs with the caller's request id, and PII redaction on every log line."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from server.observability.logs import JsonFormatter, RedactFilter, luhn_ok, make_handler, redact


@pytest.mark.parametrize(("text", "expected"), [
    ("mail me at jane.doe+kb@example.co.uk please", "mail me at [email] please"),
    ("card 4111 1111 1111 1111 declined", "card [card] declined"),
    ("card 4111-1111-1111-1111", "card [card]"),
    ("pan=5500005555555559.", "pan=[card]."),
    ("call +44 20 7946 0958 now", "call [phone] now"),
    ("call (555) 123-4567", "call [phone]"),
    ("call 555-123-4567 or 555.123.4567", "call [phone] or [phone]"),
    ("ring 020 7946 0958", "ring [phone]"),
    ("tel +1-800-555-0199", "tel [phone]"),
])
def test_pii_is_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "robot fl-004 fault E202 at 10:30 in aisle A12",
    "amr-017 E303 loaded, battery 42.5 %",
    "snaprag 0.1.0 grpcio 1.85.1 protobuf 7.36.2",
    "serving on 127.0.0.1:50051, metrics 0.0.0.0:9464",
    "2026-11-21T14:46:09Z took 123.4 ms, 1234567 tokens",
    "order 1234567890123 (13 digits, not a Luhn number)",
    "request 3f2a9c0d1e4b5a67 trace 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "ttft_ms=12.5 tokens=12 ungrounded=0 trims=0 version v000003",
])
def test_operational_text_is_not_redacted(text: str) -> None:
    assert redact(text) == text


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")


def test_filter_redacts_args_traceback_and_extras() -> None:
    out = io.StringIO()
    logger = logging.getLogger("tests.redact")
    logger.propagate, logger.level = False, logging.INFO
    handler = make_handler("json", out)
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("bad user bob@example.com")
        except ValueError:
            logger.exception("lookup %s failed for %s", "4111111111111111", "+1 555 123 4567", extra={"who": "a@b.io"})
    finally:
        logger.removeHandler(handler)
    line = json.loads(out.getvalue())
    assert line["message"] == "lookup [card] failed for [phone]"
    assert line["who"] == "[email]" and "[email]" in line["exc"] and "bob@" not in line["exc"]
    assert line["level"] == "error" and line["logger"] == "tests.redact" and line["request_id"] == "-"


def test_text_format_carries_the_request_id() -> None:
    from server.errors import REQUEST_ID

    out = io.StringIO()
    logger = logging.getLogger("tests.text")
    logger.propagate, logger.level = False, logging.INFO
    handler = make_handler("text", out)
    logger.addHandler(handler)
    token = REQUEST_ID.set("abc123")
    try:
        logger.info("hello %s", "x@y.com")
    finally:
        REQUEST_ID.reset(token)
        logger.removeHandler(handler)
    assert "[abc123]: hello [email]" in out.getvalue()


async def test_json_lines_carry_the_request_id_sent_in_metadata(make_server: Any) -> None:
    _, client = await make_server()
    out = io.StringIO()
    handler = make_handler("json", out)
    root, server_log = logging.getLogger(), logging.getLogger("server")
    old_level = server_log.level
    server_log.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        client.metadata = (("x-request-id", "req-obs-42"),)
        answer = await client.ask("how do i reset my smart plug")
    finally:
        root.removeHandler(handler)
        server_log.setLevel(old_level)
    assert answer.final.request_id == "req-obs-42"
    lines = [json.loads(x) for x in out.getvalue().splitlines() if x.strip()]
    mine = [x for x in lines if x["request_id"] == "req-obs-42"]
    assert mine, lines
    assert all({"ts", "level", "logger", "message", "request_id"} <= set(x) for x in lines)
    assert any(x["logger"] == "server.pipeline.answer" and x["message"].startswith("generation ") for x in mine)


def test_formatter_and_filter_are_plain_logging_objects() -> None:
    assert isinstance(JsonFormatter(), logging.Formatter) and isinstance(RedactFilter(), logging.Filter)
