"""Group-layer messages: what `meshcast.group` engines say to each other.

They travel as the payload of overlay DATA messages (`meshcast.wire.overlay`), so the
overlay's source field names the sending daemon. All integers are big-endian; ``str8`` is
``len u8 | UTF-8 bytes``. Every message starts with one kind byte::

    0x10 DATA  service u8 | view_id 8s | msg_id u64 | ts u64 | seq u64 | aru u64 |
               msg_type u16 | sender str8 | n u16 | n x group str8 |
               f u16 | f x (dest u32 | fifo_seq u64) | v u16 | v x u64 | payload (the rest)
    0x11 NULL  view_id 8s | ts u64 | seq u64 | aru u64
    0x12 ACK   view_id 8s | flags u8 | n u16 |
               n x (member u32 | pruned u64 | causal u64 | total u64) |
               BLOCKED only: g u16 | g x group str8
    0x13 FLUSH target 8s | from_view 8s | incarnation u64 | round u64 | views u64 |
               part u32 | parts u32 |
               flags u8 | n u16 | n x (member u32 | total_prefix u64) |
               m u32 | m x (source u32 | len u32 | a DATA message of from_view) |
               with RETRY only: held_incarnation u64 | held_round u64 | h u16 | h x part u32
    0x14 BATCH n u16 | n x (len u32 | one DATA, NULL, ACK or FLUSH message)

* ``service``: the `ServiceLevel`; high bit (`SERVICE_CONFIRM`, 0x80): the sending client
  asked for a confirmation, so its daemon waits to deliver the message (the others owe it
  their timestamps at once, docs/design/group.md "Prompt answer").
* ``view_id``: the group view the message was sent in (`meshcast.group.view_id`).
* ``msg_id``: unique per sending daemon and view, from 1; duplicate detection for
  UNRELIABLE and RELIABLE messages.
* ``ts``: the sender's Lamport clock when it sent the message.
* ``seq``: the message's place in the sender's *stream*: the total-order stream
  (AGREED, SAFE and NULL messages share it) or the causal stream (CAUSAL); 0 otherwise.
* ``aru``: all-received-up-to: the sender has received every total-order message with a
  timestamp up to this one (SAFE stability, SPEC-NOTES 4.4).
* FIFO messages list, per destination daemon, the message's place in the sender's stream
  to that daemon (pruned traffic: each destination sees only its own messages, so it can
  only spot gaps in its own numbering). Other services send f = 0.
* CAUSAL messages carry the sender's vector of causal messages processed, one entry per
  member of the view in member order. Other services send v = 0.
* NULL: an idle daemon's timestamp and ARU, in its total-order stream, so that AGREED and
  SAFE messages of others can be ordered and declared stable.
* ACK: what the sender holds of each member's messages in the view: the prefix of its
  numbering to the sender (RELIABLE/FIFO), causal messages processed, total-order stream
  prefix. Lets every daemon forget the copies it keeps for a flush (stability). Flag
  0x01 BLOCKED: a local member of a `block` group cannot keep up; the g groups it is in
  follow (at most `MAX_BLOCKED_GROUPS`; g = 0: every group). Senders everywhere hold
  back their clients' messages to those groups until an ACK that no longer names them.
* FLUSH: one part of a daemon's flush towards the view with membership id ``target``
  (`meshcast.group.view_id`): the id of the view it installed last (``from_view``, zeros
  for none), its incarnation and flush round (increasing with every flush it starts: a
  FLUSH of an earlier (incarnation, round) is stale), how many views it
  has installed, its total-order stream prefixes, and the copies of ``from_view``
  messages that not every member may have (docs/design/group.md, "Virtual synchrony").
  Flag 0x01 RETRY: a *probe* from a daemon that still waits for the receiver's FLUSH:
  no carried messages, only the header, and which parts of the receiver's FLUSH (of its
  round ``held_incarnation``, ``held_round``) the prober holds; the receiver answers with
  the parts missing from that list (all of them for another round). A probe is no part
  of the prober's own FLUSH: its ``part``/``parts`` are 0/1 and ignored.

* BATCH: the group messages a daemon sends to the same destinations in one turn of its
  event loop, in the order it sent them: one overlay message instead of one each, so the
  overlay's per-message work (numbering, window, forwarding, acknowledgement) is paid once
  per batch. The receiver takes the messages one by one as if each had come alone; a
  batch holds 2..`MAX_BATCH_MESSAGES` messages and never another batch.

Theory of operation: docs/design/group.md. `encode_group` refuses (``ValueError``) what
`decode_group` would refuse; `decode_group` raises only `DecodeError`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from meshcast.errors import DecodeError
from meshcast.wire.client import ServiceLevel

KIND_DATA = 0x10
KIND_NULL = 0x11
KIND_ACK = 0x12
KIND_FLUSH = 0x13
KIND_BATCH = 0x14

VIEW_ID_SIZE = 8
DATA_HEAD = struct.Struct("!BB8sQQQQH")  # kind, service, view, msg_id, ts, seq, aru, msg_type
NULL_MESSAGE = struct.Struct("!B8sQQQ")  # kind, view, ts, seq, aru
COUNT = struct.Struct("!H")
FIFO_ENTRY = struct.Struct("!IQ")
ACK_HEAD = struct.Struct("!B8sBH")  # kind, view, flags, n
ACK_BLOCKED = 0x01
ACK_ENTRY = struct.Struct("!IQQQ")  # member, pruned, causal, total
FLUSH_HEAD = struct.Struct("!B8s8sQQQIIBH")  # kind, target, from, incarnation, round,
# views, part, parts, flags, n
FLUSH_RETRY = 0x01
PREFIX_ENTRY = struct.Struct("!IQ")  # member, total-order stream prefix
CARRIED_COUNT = struct.Struct("!I")
CARRIED_HEAD = struct.Struct("!II")  # source, length
PROBE_HEAD = struct.Struct("!QQH")  # held incarnation, held round, parts listed
PROBE_PART = struct.Struct("!I")
NO_VIEW = bytes(8)  # from_view of a daemon that never installed a view
CLOCK = struct.Struct("!Q")
BATCH_HEAD = struct.Struct("!BH")  # kind, n
BATCH_ITEM = struct.Struct("!I")  # length of the message that follows

MAX_GROUP_NAME = 255  # bytes (a str8)
MAX_GROUPS = 256  # groups one message is addressed to (the client protocol's limit)
MAX_FIFO_ENTRIES = 4096  # destination daemons of one FIFO message (the overlay's limit)
MAX_VECTOR = 4096  # entries of a causal vector: daemons in a view
MAX_BLOCKED_GROUPS = 256  # groups named by a BLOCKED ACK; more are sent as "every group"
MAX_BATCH_MESSAGES = 1024  # messages in one BATCH
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

_SERVICES = {int(s): s for s in ServiceLevel}
# high bit of a DATA message's service byte: the sending client asked for a confirmation,
# so its daemon waits to deliver the message (the others owe it their timestamps at once)
SERVICE_CONFIRM = 0x80


# Built per message at every daemon, like the per-message effects and records of the
# other layers (Deliver, Broadcast, Copy, the link's Header and Transmit, the overlay's
# Data, ...), which say "(GroupData)" for this: not frozen, though nothing changes one
# once built, and with __init__ written out. A frozen dataclass's __init__
# (object.__setattr__ per field) costs five times a plain one's (1.5 against 0.3 us for
# these 13 fields); and mypyc compiles a written-out __init__ but leaves the one
# @dataclass generates interpreted (68 against 239 ns for five fields, docs/compiled.md).
@dataclass(slots=True)
class GroupData:
    service: ServiceLevel
    view_id: bytes  # 8 bytes
    msg_id: int
    ts: int
    seq: int
    aru: int
    msg_type: int
    sender: str  # the sending client's private name
    groups: tuple[str, ...]
    fifo: tuple[tuple[int, int], ...]  # (destination daemon, fifo seq): FIFO only
    vector: tuple[int, ...]  # causal messages processed per view member: CAUSAL only
    payload: bytes
    confirm: bool = False  # the sender waits for its daemon's delivery (SERVICE_CONFIRM)

    def __init__(
        self,
        service: ServiceLevel,
        view_id: bytes,
        msg_id: int,
        ts: int,
        seq: int,
        aru: int,
        msg_type: int,
        sender: str,
        groups: tuple[str, ...],
        fifo: tuple[tuple[int, int], ...],
        vector: tuple[int, ...],
        payload: bytes,
        confirm: bool = False,
    ) -> None:
        self.service = service
        self.view_id = view_id
        self.msg_id = msg_id
        self.ts = ts
        self.seq = seq
        self.aru = aru
        self.msg_type = msg_type
        self.sender = sender
        self.groups = groups
        self.fifo = fifo
        self.vector = vector
        self.payload = payload
        self.confirm = confirm


@dataclass(frozen=True, slots=True)
class GroupNull:
    view_id: bytes  # 8 bytes
    ts: int
    seq: int
    aru: int


@dataclass(frozen=True, slots=True)
class GroupAck:
    view_id: bytes  # 8 bytes
    entries: tuple[tuple[int, int, int, int], ...]  # (member, pruned, causal, total)
    blocked: bool = False
    blocked_groups: tuple[str, ...] = ()  # with `blocked`: those groups; () = every group


@dataclass(frozen=True, slots=True)
class GroupFlush:
    view_id: bytes  # the membership id of the view being installed (the target)
    from_view: bytes  # the sender's last installed view (NO_VIEW: none)
    incarnation: int  # the sender's (a restarted daemon starts its rounds again)
    round: int  # the sender's flush round, increasing
    views: int  # views the sender has installed
    part: int  # 0 .. parts - 1
    parts: int
    prefixes: tuple[tuple[int, int], ...]  # (member of from_view, total-order prefix held)
    messages: tuple[tuple[int, bytes], ...]  # (source daemon, encoded DATA of from_view)
    retry: bool = False
    # a probe (retry) only: the receiver's (incarnation, round) the prober heard parts
    # of, and which parts it holds
    held_round: tuple[int, int] = (0, 0)
    held: tuple[int, ...] = ()


GroupMessage = GroupData | GroupNull | GroupAck | GroupFlush


def _check_u64(name: str, value: int) -> None:
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} {value} is not a u64")


_NONE = COUNT.pack(0)  # an empty FIFO list or vector


def _str8(name: str, text: str, *, allow_empty: bool) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 255 or (not raw and not allow_empty):
        raise ValueError(f"{name} must be {0 if allow_empty else 1}..255 bytes, got {len(raw)}")
    return bytes((len(raw),)) + raw


def encode_group(message: GroupMessage) -> bytes:
    """Encode one group message; ValueError if `decode_group` would refuse the result."""
    if len(message.view_id) != VIEW_ID_SIZE:
        raise ValueError("view_id must be 8 bytes")
    if isinstance(message, GroupAck):
        return _encode_ack(message)
    if isinstance(message, GroupFlush):
        return _encode_flush(message)
    ts, seq, aru = message.ts, message.seq, message.aru
    if not (0 <= ts <= U64_MAX and 0 <= seq <= U64_MAX and 0 <= aru <= U64_MAX):
        for name in ("ts", "seq", "aru"):
            _check_u64(name, getattr(message, name))  # raises for the first bad one
    if isinstance(message, GroupNull):
        return NULL_MESSAGE.pack(KIND_NULL, message.view_id, ts, seq, aru)
    return _encode_data(message)


def _encode_data(message: GroupData) -> bytes:
    """A DATA message: once per message sent, so the checks stay in line."""
    _check_u64("msg_id", message.msg_id)
    msg_type, groups, fifo, vector = message.msg_type, message.groups, message.fifo, message.vector
    if not 0 <= msg_type <= U16_MAX:
        raise ValueError(f"msg_type {msg_type} is not a u16")
    if not 1 <= len(groups) <= MAX_GROUPS:
        raise ValueError(f"a message names 1..{MAX_GROUPS} groups, got {len(groups)}")
    if len(fifo) > MAX_FIFO_ENTRIES or len(vector) > MAX_VECTOR:
        raise ValueError("too many FIFO entries or vector entries")
    parts = [
        DATA_HEAD.pack(
            KIND_DATA,
            int(message.service) | (SERVICE_CONFIRM if message.confirm else 0),
            message.view_id,
            message.msg_id,
            message.ts,
            message.seq,
            message.aru,
            msg_type,
        ),
        (_cached_names if len(groups) <= _CACHED_GROUPS else _names)(message.sender, groups),
    ]
    if fifo:
        if len({dest for dest, _ in fifo}) != len(fifo):
            raise ValueError("a FIFO destination is listed twice")
        parts.append(COUNT.pack(len(fifo)))
        for dest, number in fifo:
            if not 0 <= dest <= U32_MAX:
                raise ValueError(f"destination {dest} is not a u32")
            _check_u64("fifo seq", number)
            parts.append(FIFO_ENTRY.pack(dest, number))
    else:
        parts.append(_NONE)
    if vector:
        parts.append(COUNT.pack(len(vector)))
        for count in vector:
            _check_u64("vector entry", count)
            parts.append(CLOCK.pack(count))
    else:
        parts.append(_NONE)
    parts.append(message.payload)
    return b"".join(parts)


def _names(sender: str, groups: tuple[str, ...]) -> bytes:
    """The sender and group names of a DATA message (`groups`: 1..MAX_GROUPS, checked)."""
    parts = [_str8("sender", sender, allow_empty=True), COUNT.pack(len(groups))]
    parts += [_str8("group name", g, allow_empty=False) for g in groups]
    return b"".join(parts)


# the same sender sends to the same few groups message after message: remembered
# (at most 1,024 x 9 x 256 bytes; a ValueError is not remembered)
_CACHED_GROUPS = 8
_cached_names = lru_cache(maxsize=1024)(_names)


def _encode_ack(message: GroupAck) -> bytes:
    if len(message.entries) > MAX_VECTOR:
        raise ValueError(f"an ACK lists at most {MAX_VECTOR} members")
    flags = ACK_BLOCKED if message.blocked else 0
    parts = [ACK_HEAD.pack(KIND_ACK, message.view_id, flags, len(message.entries))]
    for member, *counts in message.entries:
        if not 0 <= member <= U32_MAX:
            raise ValueError(f"member {member} is not a u32")
        for count in counts:
            _check_u64("ACK count", count)
        parts.append(ACK_ENTRY.pack(member, *counts))
    if message.blocked:
        if len(message.blocked_groups) > MAX_BLOCKED_GROUPS:
            raise ValueError(f"a BLOCKED ACK names at most {MAX_BLOCKED_GROUPS} groups")
        parts.append(COUNT.pack(len(message.blocked_groups)))
        parts.extend(_str8("group name", g, allow_empty=False) for g in message.blocked_groups)
    elif message.blocked_groups:
        raise ValueError("only a BLOCKED ACK names groups")
    return b"".join(parts)


def _encode_flush(message: GroupFlush) -> bytes:
    if len(message.from_view) != VIEW_ID_SIZE:
        raise ValueError("from_view must be 8 bytes")
    _check_u64("incarnation", message.incarnation)
    _check_u64("round", message.round)
    _check_u64("views", message.views)
    if not 0 <= message.part < message.parts <= U32_MAX:
        raise ValueError(f"part {message.part} of {message.parts} is out of range")
    if len(message.prefixes) > MAX_VECTOR or len(message.messages) > U32_MAX:
        raise ValueError("too many prefixes or carried messages")
    parts = [
        FLUSH_HEAD.pack(
            KIND_FLUSH,
            message.view_id,
            message.from_view,
            message.incarnation,
            message.round,
            message.views,
            message.part,
            message.parts,
            FLUSH_RETRY if message.retry else 0,
            len(message.prefixes),
        )
    ]
    for member, prefix in message.prefixes:
        if not 0 <= member <= U32_MAX:
            raise ValueError(f"member {member} is not a u32")
        _check_u64("prefix", prefix)
        parts.append(PREFIX_ENTRY.pack(member, prefix))
    parts.append(CARRIED_COUNT.pack(len(message.messages)))
    for source, data in message.messages:
        if not 0 <= source <= U32_MAX or len(data) > U32_MAX:
            raise ValueError("carried message source or length out of range")
        parts.append(CARRIED_HEAD.pack(source, len(data)))
        parts.append(data)
    if message.retry:
        held_incarnation, held_round = message.held_round
        _check_u64("held incarnation", held_incarnation)
        _check_u64("held round", held_round)
        if len(message.held) > 0xFFFF or not all(0 <= p <= U32_MAX for p in message.held):
            raise ValueError("held parts out of range")
        parts.append(PROBE_HEAD.pack(held_incarnation, held_round, len(message.held)))
        parts.extend(PROBE_PART.pack(p) for p in message.held)
    elif message.held or message.held_round != (0, 0):
        raise ValueError("only a probe (retry) lists held parts")
    return b"".join(parts)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data = data
        self.pos = pos

    def take(self, size: int, what: str) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise DecodeError(f"group message truncated in {what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def count(self, what: str) -> int:
        (n,) = COUNT.unpack(self.take(COUNT.size, what))
        return int(n)

    def str8(self, what: str) -> str:
        (size,) = self.take(1, what)
        try:
            return self.take(size, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"group DATA {what} is not UTF-8") from exc


def encode_batch(messages: Sequence[bytes]) -> bytes:
    """One BATCH of encoded group messages (2..MAX_BATCH_MESSAGES, none a BATCH)."""
    if not 2 <= len(messages) <= MAX_BATCH_MESSAGES:
        raise ValueError(f"a batch holds 2..{MAX_BATCH_MESSAGES} messages, got {len(messages)}")
    parts = [BATCH_HEAD.pack(KIND_BATCH, len(messages))]
    pack = BATCH_ITEM.pack
    for message in messages:
        if not message or message[0] == KIND_BATCH:
            raise ValueError("a batch holds group messages, not batches or empty ones")
        parts += (pack(len(message)), message)
    return b"".join(parts)


def is_batch(payload: bytes) -> bool:
    return bool(payload) and payload[0] == KIND_BATCH


def split_batch(payload: bytes) -> list[bytes]:
    """The messages of a BATCH, in order, each still to be decoded (`decode_group`);
    raises `DecodeError` if the framing is wrong (nothing of a bad batch is taken)."""
    if len(payload) < BATCH_HEAD.size or payload[0] != KIND_BATCH:
        raise DecodeError("not a group BATCH")
    (_, n) = BATCH_HEAD.unpack_from(payload)
    if not 2 <= n <= MAX_BATCH_MESSAGES:
        raise DecodeError(f"a group BATCH of {n} messages")
    messages = []
    pos, size, unpack = BATCH_HEAD.size, len(payload), BATCH_ITEM.unpack_from
    for _ in range(n):
        if pos + BATCH_ITEM.size > size:
            raise DecodeError("group BATCH truncated")
        (length,) = unpack(payload, pos)
        pos += BATCH_ITEM.size
        end = pos + length
        if length == 0 or end > size:
            raise DecodeError("group BATCH message of a wrong length")
        if payload[pos] == KIND_BATCH:
            raise DecodeError("a group BATCH inside a BATCH")
        messages.append(payload[pos:end])
        pos = end
    if pos != size:
        raise DecodeError("bytes after the last message of a group BATCH")
    return messages


def decode_group(message: bytes) -> GroupMessage:
    """Parse one group message; raises `DecodeError` on anything malformed."""
    if not message:
        raise DecodeError("empty group message")
    kind = message[0]
    if kind == KIND_NULL:
        if len(message) != NULL_MESSAGE.size:
            raise DecodeError("group NULL has the wrong size")
        _, view_id, ts, seq, aru = NULL_MESSAGE.unpack(message)
        return GroupNull(view_id, ts, seq, aru)
    if kind == KIND_ACK:
        return _decode_ack(message)
    if kind == KIND_FLUSH:
        return _decode_flush(message)
    if kind != KIND_DATA:
        raise DecodeError(f"unknown group message kind 0x{kind:02x}")
    if len(message) < DATA_HEAD.size:
        raise DecodeError("truncated group DATA header")
    try:
        data = _decode_data_fast(message)
    except (IndexError, struct.error, UnicodeDecodeError):
        data = None
    return data if data is not None else _decode_data(message)


def _decode_names(raw: bytes) -> tuple[str, tuple[str, ...]]:
    """A names section (sender, groups) whose lengths were checked; UnicodeDecodeError
    if a name is not UTF-8."""
    pos = 1 + raw[0]
    sender = raw[1:pos].decode("utf-8")
    (n,) = COUNT.unpack_from(raw, pos)
    pos += COUNT.size
    groups = []
    for _ in range(n):
        end = pos + 1 + raw[pos]
        groups.append(raw[pos + 1 : end].decode("utf-8"))
        pos = end
    return sender, tuple(groups)


# a sender sends to the same groups message after message: each section decoded once
_decoded_names = lru_cache(maxsize=1024)(_decode_names)


def _decode_data_fast(message: bytes) -> GroupData | None:
    """A well-formed DATA message, decoded with plain offsets (once per message at every
    daemon); None, or an exception, for anything else: `_decode_data` then says what is
    wrong, so the errors are its own."""
    _, service, view_id, msg_id, ts, seq, aru, msg_type = DATA_HEAD.unpack_from(message)
    level = _SERVICES.get(service & ~SERVICE_CONFIRM)
    size = len(message)
    start = DATA_HEAD.size
    pos = start + 1 + message[start]  # past the sender
    (n,) = COUNT.unpack_from(message, pos)
    pos += COUNT.size
    if level is None or not 1 <= n <= MAX_GROUPS:
        return None
    for _ in range(n):
        length = message[pos]
        if not length:
            return None
        pos += 1 + length
    if pos > size:
        return None
    sender, groups = _decoded_names(message[start:pos])
    (f,) = COUNT.unpack_from(message, pos)
    pos += COUNT.size
    fifo: tuple[tuple[int, int], ...] = ()
    if f:
        end = pos + f * FIFO_ENTRY.size
        if f > MAX_FIFO_ENTRIES or end > size:
            return None
        fifo = tuple(FIFO_ENTRY.iter_unpack(message[pos:end]))
        if len({d for d, _ in fifo}) != f:
            return None
        pos = end
    (v,) = COUNT.unpack_from(message, pos)
    pos += COUNT.size
    vector: tuple[int, ...] = ()
    if v:
        end = pos + v * CLOCK.size
        if v > MAX_VECTOR or end > size:
            return None
        vector = tuple(c for (c,) in CLOCK.iter_unpack(message[pos:end]))
        pos = end
    return GroupData(
        level,
        view_id,
        msg_id,
        ts,
        seq,
        aru,
        msg_type,
        sender,
        groups,
        fifo,
        vector,
        message[pos:],
        bool(service & SERVICE_CONFIRM),
    )


def _decode_data(message: bytes) -> GroupData:
    """A DATA message, checked step by step: the reference, and the source of the errors."""
    _, service, view_id, msg_id, ts, seq, aru, msg_type = DATA_HEAD.unpack_from(message)
    level = _SERVICES.get(service & ~SERVICE_CONFIRM)
    if level is None:
        raise DecodeError(f"group DATA with unknown service {service}")
    reader = _Reader(message, DATA_HEAD.size)
    sender = reader.str8("sender")
    n = reader.count("group count")
    if not 1 <= n <= MAX_GROUPS:
        raise DecodeError(f"group DATA names {n} groups")
    groups = []
    for _ in range(n):
        name = reader.str8("group name")
        if not name:
            raise DecodeError("group DATA with an empty group name")
        groups.append(name)
    f = reader.count("FIFO count")
    if f > MAX_FIFO_ENTRIES:
        raise DecodeError(f"group DATA with {f} FIFO entries")
    raw = reader.take(f * FIFO_ENTRY.size, "FIFO entries")
    fifo = tuple((int(d), int(s)) for d, s in FIFO_ENTRY.iter_unpack(raw))
    if len({d for d, _ in fifo}) != f:
        raise DecodeError("group DATA lists a FIFO destination twice")
    v = reader.count("vector count")
    if v > MAX_VECTOR:
        raise DecodeError(f"group DATA with {v} vector entries")
    raw = reader.take(v * CLOCK.size, "vector")
    vector = tuple(int(c) for (c,) in CLOCK.iter_unpack(raw))
    payload = message[reader.pos :]
    return GroupData(
        level,
        view_id,
        msg_id,
        ts,
        seq,
        aru,
        msg_type,
        sender,
        tuple(groups),
        fifo,
        vector,
        payload,
        bool(service & SERVICE_CONFIRM),
    )


def _decode_ack(message: bytes) -> GroupAck:
    if len(message) < ACK_HEAD.size:
        raise DecodeError("truncated group ACK")
    _, view_id, flags, n = ACK_HEAD.unpack_from(message)
    end = ACK_HEAD.size + n * ACK_ENTRY.size
    if flags & ~ACK_BLOCKED:
        raise DecodeError(f"group ACK with unknown flags 0x{flags:02x}")
    blocked = bool(flags & ACK_BLOCKED)
    if len(message) < end or (len(message) != end and not blocked):
        raise DecodeError("group ACK has the wrong size")
    entries = tuple(
        (int(m), int(p), int(c), int(t))
        for m, p, c, t in ACK_ENTRY.iter_unpack(message[ACK_HEAD.size : end])
    )
    groups: list[str] = []
    if blocked:
        reader = _Reader(message, end)
        g = reader.count("blocked group count")
        if g > MAX_BLOCKED_GROUPS:
            raise DecodeError(f"group ACK names {g} blocked groups, more than {MAX_BLOCKED_GROUPS}")
        for _ in range(g):
            name = reader.str8("blocked group name")
            if not name:
                raise DecodeError("group ACK names an empty blocked group")
            groups.append(name)
        if reader.pos != len(message):
            raise DecodeError("group ACK has the wrong size")
    return GroupAck(view_id, entries, blocked, tuple(groups))


def _decode_flush(message: bytes) -> GroupFlush:
    if len(message) < FLUSH_HEAD.size:
        raise DecodeError("truncated group FLUSH header")
    head = FLUSH_HEAD.unpack_from(message)
    _, target, from_view, incarnation, round_, views, part, parts, flags, n = head
    if not part < parts:
        raise DecodeError(f"group FLUSH part {part} of {parts}")
    if flags & ~FLUSH_RETRY:
        raise DecodeError(f"group FLUSH with unknown flags 0x{flags:02x}")
    reader = _Reader(message, FLUSH_HEAD.size)
    raw = reader.take(n * PREFIX_ENTRY.size, "prefixes")
    prefixes = tuple((int(m), int(p)) for m, p in PREFIX_ENTRY.iter_unpack(raw))
    (m,) = CARRIED_COUNT.unpack(reader.take(CARRIED_COUNT.size, "message count"))
    carried: list[tuple[int, bytes]] = []
    for _ in range(m):
        source, size = CARRIED_HEAD.unpack(reader.take(CARRIED_HEAD.size, "carried message"))
        carried.append((int(source), reader.take(size, "carried message")))
    held_round = (0, 0)
    held: tuple[int, ...] = ()
    if flags & FLUSH_RETRY:
        held_incarnation, held_round_, h = PROBE_HEAD.unpack(reader.take(PROBE_HEAD.size, "probe"))
        held_round = (int(held_incarnation), int(held_round_))
        raw = reader.take(h * PROBE_PART.size, "held parts")
        held = tuple(int(p) for (p,) in PROBE_PART.iter_unpack(raw))
    if reader.pos != len(message):
        raise DecodeError("trailing bytes after group FLUSH")
    return GroupFlush(
        target,
        from_view,
        incarnation,
        round_,
        views,
        part,
        parts,
        prefixes,
        tuple(carried),
        bool(flags),
        held_round,
        held,
    )
