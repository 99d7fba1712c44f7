"""Request deserialisation that never fails the call with INTERNAL.

protobuf rejects a string field holding invalid UTF-8 with an opaque DecodeError, and grpc reports a
failing deserializer as INTERNAL. We catch it here and hand the servicer a `MalformedRequest` that
names the offending field (found by walking the wire format against the message descriptor), which
the servicer turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from server.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    field: str
    reason: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(self.field, self.reason)


def safe_deserializer(cls: type[Message]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError:
            bad = _find_bad_utf8(data, cls.DESCRIPTOR, prefix="")
            if bad:
                return MalformedRequest(bad, "is not valid UTF-8; send text as UTF-8")
            return MalformedRequest("request", f"is not a valid {cls.DESCRIPTOR.full_name} message")
    return deserialize


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _find_bad_utf8(buf: bytes, desc: Descriptor, prefix: str) -> str | None:
    """Dotted path of the first string field holding invalid UTF-8, or None."""
    pos = 0
    seen: dict[int, int] = {}  # occurrences so far of each repeated message field, for `name[i]`
    try:
        while pos < len(buf):
            key, pos = _varint(buf, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(buf, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(buf, pos)
                chunk, pos = buf[pos:pos + length], pos + length
                fd = desc.fields_by_number.get(number)
                if fd is None:
                    continue
                name = f"{prefix}{fd.name}"
                if fd.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return name
                elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                    inner = fd.message_type
                    if inner.GetOptions().map_entry:
                        found = _find_bad_utf8(chunk, inner, prefix=f"{name}.")
                        if found:
                            return found.replace(f"{name}.key", f"{name} (a key)").replace(f"{name}.value", name)
                    else:
                        if fd.is_repeated:
                            seen[number] = seen.get(number, -1) + 1
                            name = f"{name}[{seen[number]}]"
                        found = _find_bad_utf8(chunk, inner, prefix=f"{name}.")
                        if found:
                            return found
            else:
                return None
    except ValueError:
        return None
    return None
