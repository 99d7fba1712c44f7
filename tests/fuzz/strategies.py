"""Fuzz inputs derived from the protobuf descriptors, so a new field is fuzzed the day it is added.

Two generators walk the same descriptors with the same edge values:

* `messages(cls)`: a Hypothesis strategy over every field of a message (scalars with their type's
  extremes, strings with unicode / NUL / whitespace / huge values, NaN and infinities, enum numbers the
  schema does not know, repeated fields, maps, nested messages, one member of each oneof, proto3
  `optional` presence).
* `random_message(cls, rng)`: the same walk driven by a seeded `random.Random`, for the cheap
  10k-case wire run (no Hypothesis bookkeeping in the memory measurement).

`mutate(data, rng)` turns a valid encoding into a broken one (bit flips, truncation, appended garbage,
unknown field numbers, wrong wire types, huge length prefixes, invalid UTF-8 in a string, deep group
nesting); `random_bytes(rng)` is plain noise.

`HINTS` adds a few values per field *name* that get past the first validation check (a known profile,
a known filter field), so the fuzzer reaches the code behind it; the generic values stay in the mix.
"""

from __future__ import annotations

import math
import random
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

FD = FieldDescriptor
MAX_DEPTH = 3
HUGE = 70_000  # characters: above every text limit, well under the 1 MiB message cap

INT_RANGES: dict[int, tuple[int, int]] = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1), FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
EDGE_STRINGS = ["", " ", "\x00", "a\x00b", "\t\n\r ", "\u200b", "\ufeff", "\u202e" + "evil", "ß" * 3, "🤖" * 5,
                "e\u0301" * 10, "x" * HUGE, "word " * 500, "Ω" * 2001, "-", "v000001", "v999999", "../../etc/passwd"]
EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 100.0, 100.1, math.nan, math.inf, -math.inf, 1e-45, 3.4e38, -3.4e38]

HINTS: dict[str, list[Any]] = {
    "profile": ["voice", "robot", "VOICE", " robot "],
    "query": ["how do I reset the thermostat", "forklift fault E42", "pallet jam"],
    "text": ["how do I reset the thermostat", "the charger light blinks red"],
    "robot_id": ["amr-017", "  amr-1  "],
    "fault_code": ["E42", "F-101", "E"],
    "locale": ["en-US", "de-DE"],
    "id": ["doc-00001", "doc-00900", "fuzz-1", "Bad Id"],
    "ids": ["doc-00001", "doc-00002", "nope-404"],
    "version": ["", "v000001", "v000002", "v1", "latest"],
    "steps_json": ["[]", "[{\"action\": \"stop\"}]", "{", "null", "[1, 2]", "{\"a\": 1}"],
    "values": ["home", "warehouse", "setup", "fix", "en-US"],
}
MAP_KEY_HINTS = ["intent", "domain", "locale", "INTENT", ""]


# ---------------------------------------------------------------------------- Hypothesis strategies
def _ints(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    lo, hi = INT_RANGES[fd.type]
    return st.one_of(st.sampled_from(sorted({lo, hi, 0, 1, max(lo, -1), 100, 101})), st.integers(lo, hi))


def _strings(fd: FieldDescriptor) -> st.SearchStrategy[str]:
    parts = [st.text(max_size=40), st.sampled_from(EDGE_STRINGS), st.text(max_size=3000)]
    if fd.name in HINTS:
        parts.insert(0, st.sampled_from(HINTS[fd.name]))
    return st.one_of(*parts)


def _scalar(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = fd.type
    if t in INT_RANGES:
        return _ints(fd)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats())
    if t == FD.TYPE_FLOAT:
        return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(width=32))
    if t == FD.TYPE_STRING:
        return _strings(fd)
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=200)
    if t == FD.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if t == FD.TYPE_MESSAGE:
        return messages(GetMessageClass(fd.message_type), depth + 1)
    raise NotImplementedError(f"field type {t} of {fd.full_name}")


def _value(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(fd):
        key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        keys = st.one_of(st.sampled_from(MAP_KEY_HINTS), _scalar(key_fd, depth)) \
            if key_fd.type == FD.TYPE_STRING else _scalar(key_fd, depth)
        return st.dictionaries(keys, _scalar(value_fd, depth), max_size=4)
    if fd.is_repeated:
        return st.lists(_scalar(fd, depth), max_size=6)
    return _scalar(fd, depth)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def _groups(desc: Descriptor) -> tuple[list[FieldDescriptor], list[list[FieldDescriptor]]]:
    """Plain fields, and the members of each oneof (a proto3 `optional` is a oneof of one)."""
    in_oneof = {f.name for o in desc.oneofs for f in o.fields}
    return [f for f in desc.fields if f.name not in in_oneof], [list(o.fields) for o in desc.oneofs]


def messages(cls: type[Message], depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of `cls`: every plain field set or left unset, at most one member of each oneof."""
    desc = cls.DESCRIPTOR
    if depth > MAX_DEPTH:
        return st.just(cls())
    plain, oneofs = _groups(desc)
    optional = {f.name: _value(f, depth) for f in plain}
    choices = [st.one_of(st.none(), *[st.tuples(st.just(f.name), _value(f, depth)) for f in members])
               for members in oneofs]

    @st.composite
    def build(draw: Any) -> Message:
        fields = draw(st.fixed_dictionaries({}, optional=optional))
        for choice in choices:
            picked = draw(choice)
            if picked is not None:
                fields[picked[0]] = picked[1]
        return make(cls, fields)

    return build()


def make(cls: type[Message], fields: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in fields.items():
        fd = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name) if fd.type == FD.TYPE_MESSAGE or fd.is_repeated else None
        if _is_map(fd):
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif fd.is_repeated:
            for v in value:
                if isinstance(v, Message):
                    target.add().CopyFrom(v)
                else:
                    target.append(v)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


# ---------------------------------------------------------------------------- seeded random walk
def _random_scalar(fd: FieldDescriptor, rng: random.Random, depth: int) -> Any:
    t = fd.type
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        return rng.choice([lo, hi, 0, 1, rng.randint(lo, hi), rng.randint(0, 200)])
    if t == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return rng.choice(EDGE_FLOATS) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)
    if t == FD.TYPE_STRING:
        r = rng.random()
        if r < 0.3 and fd.name in HINTS:
            return rng.choice(HINTS[fd.name])
        if r < 0.5:
            return rng.choice(EDGE_STRINGS)
        return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xA0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(rng.randint(0, 30)))
    if t == FD.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 40))
    if t == FD.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return rng.choice(known) if rng.random() < 0.7 else rng.randint(-(2**31), 2**31 - 1)
    if t == FD.TYPE_MESSAGE:
        return random_message(GetMessageClass(fd.message_type), rng, depth + 1)
    raise NotImplementedError(f"field type {t} of {fd.full_name}")


def random_message(cls: type[Message], rng: random.Random, depth: int = 0) -> Message:
    plain, oneofs = _groups(cls.DESCRIPTOR)
    fields: dict[str, Any] = {}
    if depth <= MAX_DEPTH:
        for fd in plain:
            if rng.random() < 0.5:
                continue
            if _is_map(fd):
                kf, vf = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
                fields[fd.name] = {(rng.choice(MAP_KEY_HINTS) if rng.random() < 0.5 and kf.type == FD.TYPE_STRING
                                    else _random_scalar(kf, rng, depth)): _random_scalar(vf, rng, depth)
                                   for _ in range(rng.randint(0, 3))}
            elif fd.is_repeated:
                fields[fd.name] = [_random_scalar(fd, rng, depth) for _ in range(rng.randint(0, 4))]
            else:
                fields[fd.name] = _random_scalar(fd, rng, depth)
        for members in oneofs:
            if rng.random() < 0.6:
                fd = rng.choice(members)
                fields[fd.name] = _random_scalar(fd, rng, depth)
    return make(cls, fields)


# ---------------------------------------------------------------------------- bytes on the wire
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 2, 3, 5, 8, 16, 64, 300, 5000]))


def _field_numbers(cls: type[Message] | None) -> list[int]:
    return [f.number for f in cls.DESCRIPTOR.fields] if cls is not None else [1]


def mutate(data: bytes, rng: random.Random, cls: type[Message] | None = None) -> bytes:
    """One of a dozen ways to break (or oddly extend) a valid encoding of `cls`."""
    numbers = _field_numbers(cls) or [1]
    kind = rng.randrange(12)
    buf = bytearray(data)
    if kind == 0 and buf:  # bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == 1 and buf:  # truncation
        return bytes(buf[:rng.randrange(len(buf))])
    if kind == 2:  # appended garbage
        return bytes(buf) + rng.randbytes(rng.randint(1, 32))
    if kind == 3:  # an unknown field number, any valid wire type
        number = rng.choice([99, 1000, 536870911, rng.randint(16, 2**29 - 1)])
        wire = rng.choice([0, 1, 2, 5])
        payload = {0: varint(rng.getrandbits(64)), 1: rng.randbytes(8), 5: rng.randbytes(4)}.get(wire)
        if payload is None:
            blob = rng.randbytes(rng.randint(0, 20))
            payload = varint(len(blob)) + blob
        return bytes(buf) + key(number, wire) + payload
    if kind == 4:  # a known field with the wrong wire type
        return bytes(buf) + key(rng.choice(numbers), rng.choice([0, 1, 5])) + rng.randbytes(8)
    if kind == 5:  # a huge length prefix
        return bytes(buf) + key(rng.choice(numbers), 2) + varint(rng.choice([2**31, 2**32 + 5, 2**63, 2**64 - 1,
                                                                           10**6])) + b"abc"
    if kind == 6:  # invalid UTF-8 where a string (or a nested message) goes
        bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"abc\x80", b"\xf4\x90\x80\x80"])
        return bytes(buf) + key(rng.choice(numbers), 2) + varint(len(bad)) + bad
    if kind == 7:  # reserved / invalid wire types 6 and 7, and field number 0
        return bytes(buf) + rng.choice([key(rng.choice(numbers), 6), key(rng.choice(numbers), 7), b"\x00", b"\x02\x00"])
    if kind == 8:  # deeply nested unknown groups (decoder recursion limit)
        depth = rng.choice([50, 101, 200, 5000])
        return bytes(buf) + key(77, 3) * depth + key(77, 4) * depth
    if kind == 9:  # an over-long varint
        return bytes(buf) + key(rng.choice(numbers), 0) + b"\xff" * rng.randint(10, 20) + b"\x01"
    if kind == 10 and len(buf) > 1:  # bytes shuffled
        i, j = sorted(rng.sample(range(len(buf)), 2))
        buf[i:j] = bytes(reversed(buf[i:j]))
        return bytes(buf)
    return bytes(buf) + bytes(buf)  # the message twice (repeated fields merge, scalars: last wins)


@st.composite
def wire_bytes(draw: Any, cls: type[Message]) -> bytes:
    """Hypothesis: random bytes, or a valid encoding of `cls` broken by `mutate`."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    base = draw(messages(cls)).SerializeToString()
    return mutate(base, random.Random(draw(st.integers(0, 2**32))), cls)
