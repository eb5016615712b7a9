"""Group membership operations: what `meshcast.group.membership` submits to ``#membership``.

A client's JOIN, LEAVE or disconnect, and each daemon's STATE after a view change, travel
as the payload of an AGREED group message to the reserved group ``#membership``; the
origin daemon is the message's source. All integers are big-endian; ``str8`` is
``len u8 | UTF-8 bytes`` (1..255 bytes here)::

    "MCGM" | op u8 | body
      JOIN 1, LEAVE 2, DISCONNECT 3:  member str8 | n u16 | n x group str8      (n >= 1)
      STATE 4:  t u32 | t x (group str8 | counter u64 | coordinator u32 |
                             m u32 | m x (member str8 | daemon u32))
                o u32 | o x (group str8 | k u32 | k x member str8)

* JOIN/LEAVE/DISCONNECT: `member` (a private name) joins or leaves the `n` groups.
* STATE: the sender's whole table (each group with its view counter, the daemon that
  made its latest change and its members with their daemons, in order), then, for each
  group, the sender's own clients in it, in the order they joined.

Theory of operation: docs/design/group.md, "Sessions and membership".
`encode_membership` refuses (``ValueError``) what `decode_membership` would refuse;
`decode_membership` raises only `DecodeError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from meshcast.errors import DecodeError

MAGIC = b"MCGM"


class OpKind(IntEnum):
    JOIN = 1
    LEAVE = 2
    DISCONNECT = 3
    STATE = 4


_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
MAX_NAME = 255  # bytes of a member or group name (a str8)
MAX_OP_GROUPS = 0xFFFF  # groups of one JOIN, LEAVE or DISCONNECT (a u16 count)
# the fewest bytes one entry of each list can take: a count beyond what the rest of the
# payload could hold is refused before any entry is read
_MIN_TABLE_ENTRY = 1 + 1 + _U64.size + _U32.size + _U32.size
_MIN_MEMBER = 1 + 1 + _U32.size
_MIN_OWN_ENTRY = 1 + 1 + _U32.size
_MIN_NAME = 1 + 1


@dataclass(frozen=True, slots=True)
class MembershipOp:
    """A JOIN, LEAVE or DISCONNECT of one member in some groups."""

    kind: OpKind  # JOIN, LEAVE or DISCONNECT
    member: str  # private name
    groups: tuple[str, ...]  # 1..MAX_OP_GROUPS


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One group as the announcing daemon's table had it when it sent a STATE."""

    group: str
    counter: int  # u64
    coordinator: int  # u32
    members: tuple[tuple[str, int], ...]  # (private name, daemon id) in order


@dataclass(frozen=True, slots=True)
class State:
    """A STATE operation: the sender's table, and its own clients' memberships."""

    table: tuple[StateEntry, ...]
    own: tuple[tuple[str, tuple[str, ...]], ...]  # group -> the sender's members, in order


MembershipRecord = MembershipOp | State


# ---------------------------------------------------------------- encoding


def _str8(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if not 1 <= len(raw) <= MAX_NAME:
        raise ValueError(f"{what} {text!r} must be 1..{MAX_NAME} bytes of UTF-8")
    return _U8.pack(len(raw)) + raw


def _uint(layout: struct.Struct, value: int, what: str) -> bytes:
    try:
        return layout.pack(value)
    except struct.error:
        raise ValueError(f"{what} {value} does not fit in {layout.size} bytes") from None


def encode_membership(record: MembershipRecord) -> bytes:
    """Encode one operation; ValueError if `decode_membership` would refuse the result."""
    if isinstance(record, MembershipOp):
        if record.kind not in (OpKind.JOIN, OpKind.LEAVE, OpKind.DISCONNECT):
            raise ValueError(f"a MembershipOp is a JOIN, LEAVE or DISCONNECT, not {record.kind}")
        if not 1 <= len(record.groups) <= MAX_OP_GROUPS:
            raise ValueError(
                f"an operation names 1..{MAX_OP_GROUPS} groups, got {len(record.groups)}"
            )
        parts = [MAGIC, _U8.pack(record.kind), _str8(record.member, "member")]
        parts.append(_U16.pack(len(record.groups)))
        parts.extend(_str8(g, "group") for g in record.groups)
        return b"".join(parts)
    parts = [MAGIC, _U8.pack(OpKind.STATE), _uint(_U32, len(record.table), "table size")]
    for e in record.table:
        parts += [
            _str8(e.group, "group"),
            _uint(_U64, e.counter, "counter"),
            _uint(_U32, e.coordinator, "coordinator"),
            _uint(_U32, len(e.members), "member count"),
        ]
        for name, daemon in e.members:
            parts += [_str8(name, "member"), _uint(_U32, daemon, "daemon")]
    parts.append(_uint(_U32, len(record.own), "own groups"))
    for group, members in record.own:
        parts += [_str8(group, "group"), _uint(_U32, len(members), "member count")]
        parts.extend(_str8(m, "member") for m in members)
    return b"".join(parts)


# ---------------------------------------------------------------- decoding


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def uint(self, layout: struct.Struct, what: str) -> int:
        end = self.pos + layout.size
        if end > len(self.data):
            raise DecodeError(f"membership operation truncated in {what}")
        (value,) = layout.unpack_from(self.data, self.pos)
        self.pos = end
        return int(value)

    def count(self, layout: struct.Struct, least_bytes: int, what: str) -> int:
        """A count of entries of at least `least_bytes` each, checked against the rest."""
        n = self.uint(layout, what)
        if n * least_bytes > len(self.data) - self.pos:
            raise DecodeError(f"membership operation claims {n} {what}, more than it holds")
        return n

    def str8(self, what: str) -> str:
        size = self.uint(_U8, what)
        if size == 0:
            raise DecodeError(f"membership operation has an empty {what}")
        end = self.pos + size
        if end > len(self.data):
            raise DecodeError(f"membership operation truncated in {what}")
        try:
            text = self.data[self.pos : end].decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"membership operation {what} is not UTF-8") from None
        self.pos = end
        return text


def decode_membership(payload: bytes) -> MembershipRecord:
    """Parse one operation; raises `DecodeError` (only) on anything malformed."""
    if not payload.startswith(MAGIC):
        raise DecodeError("not a membership operation (no MCGM magic)")
    r = _Reader(payload, len(MAGIC))
    op = r.uint(_U8, "op")
    record: MembershipRecord
    if op in (OpKind.JOIN, OpKind.LEAVE, OpKind.DISCONNECT):
        member = r.str8("member")
        n = r.count(_U16, _MIN_NAME, "groups")
        if n == 0:
            raise DecodeError("membership operation names no group")
        record = MembershipOp(OpKind(op), member, tuple(r.str8("group") for _ in range(n)))
    elif op == OpKind.STATE:
        table = []
        for _ in range(r.count(_U32, _MIN_TABLE_ENTRY, "table entries")):
            group = r.str8("group")
            counter = r.uint(_U64, "counter")
            coordinator = r.uint(_U32, "coordinator")
            members = tuple(
                (r.str8("member"), r.uint(_U32, "daemon"))
                for _ in range(r.count(_U32, _MIN_MEMBER, "members"))
            )
            table.append(StateEntry(group, counter, coordinator, members))
        own = []
        for _ in range(r.count(_U32, _MIN_OWN_ENTRY, "own groups")):
            group = r.str8("group")
            own.append(
                (group, tuple(r.str8("member") for _ in range(r.count(_U32, _MIN_NAME, "members"))))
            )
        record = State(tuple(table), tuple(own))
    else:
        raise DecodeError(f"unknown membership operation {op}")
    if r.pos != len(payload):
        raise DecodeError(f"{len(payload) - r.pos} trailing bytes after a membership operation")
    return record


__all__ = [
    "MAGIC",
    "MAX_NAME",
    "MAX_OP_GROUPS",
    "MembershipOp",
    "MembershipRecord",
    "OpKind",
    "State",
    "StateEntry",
    "decode_membership",
    "encode_membership",
]
