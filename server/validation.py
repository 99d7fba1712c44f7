"""Request validation: every check names the field and the limit, and raises InvalidArgument."""

from __future__ import annotations

from collections.abc import Mapping

from server.config import Config, ProfileConfig
from server.errors import InvalidArgument
from server.knowledge import FILTER_FIELDS, KnowledgeBase

SHOWN_CHARS = 64
"""At most this much of a caller's value is echoed in an error message: the message travels back as the
grpc-message trailer, and one over the peer's metadata limit (8 KiB soft, 16 KiB hard by default) makes the
client see RESOURCE_EXHAUSTED "received metadata size exceeds ..." instead of our status."""


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` quoted for an error message, cut to `limit` characters (with its full length) when longer."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def query_text(value: str, field: str, max_chars: int) -> str:
    text = value.strip()
    if not text:
        raise InvalidArgument(field, "is empty; send the user's question as text")
    if len(text) > max_chars:
        raise InvalidArgument(field, f"is {len(text)} characters; the limit is {max_chars}")
    if "\x00" in text:
        raise InvalidArgument(field, "contains a NUL character")
    return text


def bounded_text(value: str, field: str, max_chars: int) -> str:
    text = value.strip()
    if len(text) > max_chars:
        raise InvalidArgument(field, f"is {len(text)} characters; the limit is {max_chars}")
    return text


def profile(cfg: Config, name: str, default: str) -> tuple[str, ProfileConfig]:
    chosen = name.strip() or default
    if chosen not in cfg.profiles:
        valid = ", ".join(sorted(cfg.profiles))
        raise InvalidArgument("profile", f"unknown profile {shown(chosen)}; valid profiles: {valid}")
    return chosen, cfg.profiles[chosen]


def top_k(k: int, default: int, max_k: int) -> int:
    if k == 0:
        return default
    if not 1 <= k <= max_k:
        raise InvalidArgument("k", f"must be in 1..{max_k} (or 0 for the default of {default}), got {k}")
    return k


def filters(raw: Mapping[str, object], kb: KnowledgeBase, field: str = "filters") -> dict[str, list[str]]:
    """Map<string, FilterValues> -> {field: [values]}; unknown fields or values are rejected by name."""
    out: dict[str, list[str]] = {}
    for key in sorted(raw):
        if key not in FILTER_FIELDS:
            raise InvalidArgument(f"{field}", f"unknown filter field {shown(key)}; valid fields: "
                                  f"{', '.join(FILTER_FIELDS)}")
        values = [v.strip() for v in getattr(raw[key], "values", [])]
        if not values:
            raise InvalidArgument(f"{field}[{key}]", "has no values; send at least one or leave the field out")
        known = kb.values(key)
        for v in values:
            if v not in known:
                listed = ", ".join(sorted(known))
                raise InvalidArgument(f"{field}[{key}]", f"unknown value {shown(v)}; known values: {listed}")
        out[key] = values
    return out


def locale(value: str, kb: KnowledgeBase) -> str:
    loc = value.strip()
    if loc and len(loc) > 35:
        raise InvalidArgument("locale", f"is {len(loc)} characters; a BCP-47 tag is at most 35")
    return loc
