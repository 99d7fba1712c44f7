"""Log setup: text or one JSON object per line, every record stamped with the request id and redacted.

`RedactFilter` is always on (installed on the handler, so it covers every logger): emails, phone numbers
and card-like numbers (13-19 digits passing the Luhn check) in the message, its arguments and any
traceback are replaced by [email], [phone] and [card]. It is deliberately conservative about what it calls
a phone number, so fault codes (E202), robot ids (fl-004), times (10:30), dates, versions (1.2.3) and
addresses (127.0.0.1:50051) stay readable.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

from server.errors import REQUEST_ID

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by single spaces or hyphens; redacted only if the Luhn check passes.
CARD = re.compile(r"(?<![\w.:/-])\d(?:[ -]?\d){12,18}(?![\w:/]|[.-]\d)")
_EDGE_BEFORE = r"(?<![\w.:/+-])"
_EDGE_AFTER = r"(?![\w:/]|[.-]\d)"
PHONE = re.compile(
    # international: +CC then 7-14 more digits grouped by spaces, dots, hyphens or a parenthesised area code
    rf"(?<![\w+])\+\d{{1,3}}(?:[\s.-]?\(?\d{{1,4}}\)?){{2,5}}{_EDGE_AFTER}"
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567
    rf"|{_EDGE_BEFORE}(?:\(\d{{3}}\)\s?|\d{{3}}[\s.-])\d{{3}}[\s.-]\d{{4}}{_EDGE_AFTER}"
    # national trunk prefix 0: 020 7946 0958, 06 12 34 56 78, 0151-1234-5678
    rf"|{_EDGE_BEFORE}0\d{{1,4}}(?:[\s-]\d{{2,4}}){{2,4}}{_EDGE_AFTER}")

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[card]" if 13 <= len(digits) <= 19 and luhn_ok(digits) else m.group(0)


def _phone(m: re.Match[str]) -> str:
    n = sum(c.isdigit() for c in m.group(0))
    return "[phone]" if 7 <= n <= 15 else m.group(0)


def redact(text: str) -> str:
    """`text` with emails, card-like numbers and phone numbers replaced (cheap when it has no digit or @)."""
    if "@" in text:
        text = EMAIL.sub("[email]", text)
    if any(c.isdigit() for c in text):
        text = CARD.sub(_card, text)
        text = PHONE.sub(_phone, text)
    return text


class RedactFilter(logging.Filter):
    """Redacts the formatted message (folding the args in), the traceback and string extra fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as logging does
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        for key, value in vars(record).items():
            if key not in _RESERVED and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class RequestIdFilter(logging.Filter):
    """Stamps `record.request_id` from the REQUEST_ID contextvar ('-' outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601, ms), level, logger, message, request_id, then any
    `extra=` fields, and exc for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", REQUEST_ID.get()),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def make_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """The process's root handler (replacing any): `serve` calls it once at startup."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = make_handler(log_format, stream)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
