"""Client ↔ daemon protocol: the frames a client library and its daemon exchange.

Spoken over a stream (a Unix-domain socket or TCP). Every frame is length-prefixed::

    0        4      5
    | length | type | body ...             length = 1 + len(body), 1 <= length <= max frame size
    | u32    | u8   |

All integers are big-endian. Strings are UTF-8 with a length prefix: ``str8`` is
``len u8 | bytes``, ``str16`` is ``len u16 | bytes``. Bodies by type (direction in brackets)::

    0x01 HELLO       [c→d] magic "MCCP" | min_version u16 | max_version u16 | flags u16 | name str8
                           (v3: flag TOKEN 0x0002 = token str8 follows the name)
    0x02 JOIN        [c→d] request_id u32 | policy u8 | group str8
    0x03 LEAVE       [c→d] request_id u32 | group str8
    0x04 MULTICAST   [c→d] request_id u32 | service u8 | msg_type u16 | n u16 | n x group str8 |
                           payload (the rest)          (v2: service bit 0x80 = CONFIRM)
    0x05 STATUS      [c→d] request_id u32
    0x06 REPLICATE   [c→d] token u32 | path str16 | targets str16 | dest str16 | rate f64 |
                           strategy u8 | variant u8 | tree u8 | max_connections u8 | flags u8
                           (v5; flags bit 0x01 = capacity-aware) [| buddy str16 (v6)]
    0x07 SET_RATE    [c→d] token u32 | rid u64 | rate f64    (v6: a running replication's cap)
    0x41 WELCOME     [d→c] magic "MCCP" | version u16 | private_name str8 |
                           max_message_size u32 | max_group_name u8 | max_groups_per_client u32
    0x42 MESSAGE     [d→c] service u8 | msg_type u16 | sender str8 | n u16 | n x group str8 |
                           payload (the rest)
    0x43 MEMBERSHIP  [d→c] group str8 | view_counter u64 | view_coordinator u32 | cause u8 |
                           n u32 | n x member str8 | m u32 | m x who str8
    0x44 ERROR       [d→c] code u16 | request_id u32 | text str16
    0x45 STATUS_REPLY
                 [d→c] request_id u32 | report (the rest: UTF-8 JSON text of one object)
    0x46 CONFIRMED   [d→c] request_id u32                  (v2: a CONFIRM MULTICAST is delivered)
    0x47 REPLICATION [d→c] token u32 | final u8 | report (the rest: UTF-8 JSON of one object)
                           (v5: progress, then one final report, of a REPLICATE)
    0x48 BLOB_HELD   [d→c] rid u64 | flags u8 | size u64 | group str8 | origin str8 | name str16 |
                           digest_len u8 | digest bytes | h u16 | h x daemon str8 |
                           m u16 | m x (daemon str8 | held_bytes u64 | reason str8)
                           (v6: a replication to a group ended; flags bit 0x01 = complete)
    0x81 PING        [both] nonce u64
    0x82 PONG        [both] nonce u64 (echoes the PING)
    0x83 GOODBYE     [both] (empty)

The handshake, the meaning of every field, the error codes and the slow-receiver policies
are in docs/client-protocol.md. `encode` refuses (``ValueError``) any frame that `decode`
would refuse, so a frame that encodes always decodes to an equal frame. Decoders raise
only `DecodeError`, naming the frame type and what is wrong.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag, StrEnum
from functools import lru_cache
from typing import Literal, TypeVar

from meshcast.errors import DecodeError

# ---------------------------------------------------------------- protocol constants

MAGIC = b"MCCP"  # first bytes of HELLO and WELCOME bodies: "meshcast client protocol"
# the newest version this module speaks (2: CONFIRM, CONFIRMED, TRANSITIONAL; 3: HELLO's
# token, UNAUTHENTICATED, ACCESS_DENIED; 4: BUSY; 5: REPLICATE, REPLICATION; 6: BLOB_HELD,
# SET_RATE, REPLICATE's buddy)
VERSION = 6
MIN_VERSION = 1  # the oldest version this module speaks

LENGTH = struct.Struct("!I")
LENGTH_SIZE = LENGTH.size  # 4
U8_MAX = 0xFF
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

# Protocol ceilings: hard limits of the format itself. A daemon's configured limits
# (`DaemonLimits`, announced in WELCOME) are at most these.
MAX_CLIENT_NAME = 32  # bytes (UTF-8) of the name a client asks for in HELLO
MAX_TOKEN = 128  # bytes of the access token a HELLO may carry (v3): printable ASCII
TOKEN_VERSION = 3  # the first version whose HELLO may carry a token
BUSY_VERSION = 4  # the first version that can be told BUSY (older sessions get INTERNAL_ERROR)
REPLICATE_VERSION = 5  # the first version with REPLICATE and REPLICATION
BLOB_HELD_VERSION = 6  # the first version sent BLOB_HELD (older sessions are not)
SET_RATE_VERSION = 6  # the first version with SET_RATE and REPLICATE's buddy
MAX_DAEMON_NAME = 64  # bytes of the daemon part of a private name (config names: 64 chars)
MAX_PRIVATE_NAME = 2 + MAX_CLIENT_NAME + MAX_DAEMON_NAME  # "#client#daemon": 98 bytes
MAX_GROUP_NAME = 255  # bytes of a group name (a str8)
MAX_DEST_GROUPS = 256  # groups named in one MULTICAST or MESSAGE
MAX_MEMBERS = 65_535  # members listed in one MEMBERSHIP (and entries of its `who`)
MAX_ERROR_TEXT = 1024  # bytes of the text of an ERROR
MAX_MESSAGE_SIZE = 1 << 30  # bytes: the largest max_message_size a daemon may announce
MAX_STATUS_SIZE = 1 << 20  # bytes (UTF-8) of the JSON report of a STATUS_REPLY
MAX_REPLICATE_PATH = 4096  # bytes (UTF-8) of REPLICATE's path and dest (Linux PATH_MAX)
MAX_REPLICATE_TARGETS = U16_MAX  # bytes of REPLICATE's targets (a str16)
MAX_REPLICATION_REPORT = 1 << 20  # bytes (UTF-8) of the JSON report of a REPLICATION
MAX_BLOB_DAEMONS = 4096  # daemons one BLOB_HELD names (held_by and missing): a view's limit
MAX_BLOB_REASON = 255  # bytes (UTF-8) of the reason a daemon misses a blob (a str8)
MAX_BLOB_DIGEST = 64  # bytes of a blob's digest (128 hex digits)
BLOB_COMPLETE_FLAG = 0x01  # BLOB_HELD flags: every target holds the blob
MAX_UNCONFIRMED = 1024  # CONFIRM MULTICASTs of one session not yet CONFIRMED (v2)
CONFIRM_FLAG = 0x80  # in MULTICAST's service byte (v2): answer with CONFIRMED once delivered

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # bytes; equals LimitsConfig.max_message_size
DEFAULT_MAX_GROUP_NAME = 64  # bytes; equals LimitsConfig.max_group_name
DEFAULT_MAX_GROUPS_PER_CLIENT = 100  # equals LimitsConfig.max_groups_per_client

HELLO_HEAD = struct.Struct("!HHH")  # after the magic: min_version, max_version, flags
WELCOME_HEAD = struct.Struct("!H")  # after the magic: version; then private_name str8
WELCOME_LIMITS = struct.Struct("!IBI")  # max_message_size, max_group_name, max_groups_per_client
JOIN_HEAD = struct.Struct("!IB")  # request_id, policy; then group str8
LEAVE_HEAD = struct.Struct("!I")  # request_id; then group str8
MULTICAST_HEAD = struct.Struct("!IBHH")  # request_id, service, msg_type, n groups
MESSAGE_HEAD = struct.Struct("!BH")  # service, msg_type; then sender str8, n u16, groups
VIEW_AND_CAUSE = struct.Struct("!QIB")  # view counter, view coordinator, cause
ERROR_HEAD = struct.Struct("!HI")  # code, request_id; then text str16
STATUS_HEAD = struct.Struct("!I")  # request_id (STATUS; STATUS_REPLY: then the report)
REPLICATE_HEAD = struct.Struct("!I")  # token; then path, targets, dest (str16 each)
REPLICATE_TAIL = struct.Struct("!dBBBBB")  # rate, strategy, variant, tree, max_connections, flags
REPLICATION_HEAD = struct.Struct("!IB")  # token, final; then the report
BLOB_HELD_HEAD = struct.Struct("!QBQ")  # rid, flags, size; then group, origin, name, digest
BLOB_MISSING_HELD = struct.Struct("!Q")  # a missing daemon's held bytes (between its strings)
SET_RATE_BODY = struct.Struct("!IQd")  # token, rid, rate
NONCE = struct.Struct("!Q")
U8 = struct.Struct("!B")
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")


# The largest BLOB_HELD (its length field): 1.36 MB, whatever the daemon's max_message_size
# (the daemon, not a client, sends it; it travels in the group as a message of that size).
MAX_BLOB_HELD_FRAME = (
    1
    + BLOB_HELD_HEAD.size
    + (1 + MAX_GROUP_NAME)
    + (1 + MAX_DAEMON_NAME)
    + (2 + MAX_REPLICATE_PATH)
    + (1 + MAX_BLOB_DIGEST)
    + 2 * U16.size
    + MAX_BLOB_DAEMONS * (1 + MAX_DAEMON_NAME + BLOB_MISSING_HELD.size + 1 + MAX_BLOB_REASON)
)


@lru_cache(maxsize=64)  # asked for every frame a daemon reads
def frame_size_limit(max_message_size: int) -> int:
    """The largest frame (its length field) either side may send, given the daemon's limit.

    Big enough for a MULTICAST or MESSAGE carrying `max_message_size` bytes to the most
    groups with the longest names, and for the largest MEMBERSHIP the format allows.
    """
    names = MAX_DEST_GROUPS * (1 + MAX_GROUP_NAME)
    multicast = 1 + MULTICAST_HEAD.size + names
    message = 1 + MESSAGE_HEAD.size + 1 + MAX_PRIVATE_NAME + U16.size + names
    membership = (
        1
        + 1
        + MAX_GROUP_NAME
        + VIEW_AND_CAUSE.size
        + 2 * (4 + MAX_MEMBERS * (1 + MAX_PRIVATE_NAME))
    )
    status = 1 + STATUS_HEAD.size + MAX_STATUS_SIZE
    replication = 1 + REPLICATION_HEAD.size + MAX_REPLICATION_REPORT
    return max(
        max(multicast, message) + max_message_size,
        membership,
        status,
        replication,
        MAX_BLOB_HELD_FRAME,
    )


DEFAULT_MAX_FRAME_SIZE = frame_size_limit(DEFAULT_MAX_MESSAGE_SIZE)
# The largest frame (its length field) a client can need before WELCOME: a HELLO with the
# longest name and token. A daemon caps frames at this until the handshake is done
# (173 bytes).
HELLO_FRAME_LIMIT = 1 + len(MAGIC) + HELLO_HEAD.size + 1 + MAX_CLIENT_NAME + 1 + MAX_TOKEN


# ---------------------------------------------------------------- enumerations


class FrameType(IntEnum):
    HELLO = 0x01
    JOIN = 0x02
    LEAVE = 0x03
    MULTICAST = 0x04
    STATUS = 0x05
    REPLICATE = 0x06
    SET_RATE = 0x07
    WELCOME = 0x41
    MESSAGE = 0x42
    MEMBERSHIP = 0x43
    ERROR = 0x44
    STATUS_REPLY = 0x45
    CONFIRMED = 0x46
    REPLICATION = 0x47
    BLOB_HELD = 0x48
    PING = 0x81
    PONG = 0x82
    GOODBYE = 0x83


_FRAME_TYPES = {int(t): t for t in FrameType}

FROM_CLIENT = frozenset(
    {
        FrameType.HELLO,
        FrameType.JOIN,
        FrameType.LEAVE,
        FrameType.MULTICAST,
        FrameType.STATUS,
        FrameType.REPLICATE,
        FrameType.SET_RATE,
        FrameType.PING,
        FrameType.PONG,
        FrameType.GOODBYE,
    }
)  # what a daemon accepts from its clients
FROM_DAEMON = frozenset(
    {
        FrameType.WELCOME,
        FrameType.MESSAGE,
        FrameType.MEMBERSHIP,
        FrameType.ERROR,
        FrameType.STATUS_REPLY,
        FrameType.CONFIRMED,
        FrameType.REPLICATION,
        FrameType.BLOB_HELD,
        FrameType.PING,
        FrameType.PONG,
        FrameType.GOODBYE,
    }
)  # what a client accepts from its daemon
ANY_FRAME = frozenset(FrameType)


class ServiceLevel(IntEnum):
    """Delivery guarantee of a message, weakest first (so ``service >= FIFO`` reads right)."""

    UNRELIABLE = 0  # may be lost or reordered
    RELIABLE = 1  # delivered unless the sender's daemon fails; any order
    FIFO = 2  # reliable, in the order each sender sent
    CAUSAL = 3  # reliable, respecting causality across senders
    AGREED = 4  # total order (respecting causality): every member delivers in the same order
    SAFE = 5  # agreed, and delivered only once every daemon in the view has the message


_SERVICES = {int(s): s for s in ServiceLevel}


class SlowReceiverPolicy(StrEnum):
    """What a daemon does when a member of a group cannot keep up (chosen in JOIN)."""

    BLOCK = "block"  # back-pressure: the group's senders slow down to this receiver
    DISCONNECT = "disconnect"  # the slow client is disconnected; nobody waits for it
    DROP_UNRELIABLE = "drop-unreliable"  # UNRELIABLE messages are dropped; others block


_POLICY_CODES = {
    SlowReceiverPolicy.BLOCK: 0,
    SlowReceiverPolicy.DISCONNECT: 1,
    SlowReceiverPolicy.DROP_UNRELIABLE: 2,
}
_POLICIES = {code: policy for policy, code in _POLICY_CODES.items()}


class Cause(StrEnum):
    """Why a group's membership changed."""

    JOIN = "join"  # `who` joined (it is in the new view)
    LEAVE = "leave"  # `who` left on purpose (it is not in the new view)
    DISCONNECT = "disconnect"  # `who`'s connection to its daemon ended
    NETWORK = "network"  # daemons became unreachable or reachable again
    # (v2) daemons left the view: `members` are those that move on together; the messages
    # that follow, up to the next (regular) view, are delivered in this transitional
    # configuration (SAFE ones are safe only with respect to these members)
    TRANSITIONAL = "transitional"


_CAUSE_CODES = {
    Cause.JOIN: 0,
    Cause.LEAVE: 1,
    Cause.DISCONNECT: 2,
    Cause.NETWORK: 3,
    Cause.TRANSITIONAL: 4,
}
_CAUSES = {code: cause for cause, code in _CAUSE_CODES.items()}


class HelloFlag(IntFlag):
    MEMBERSHIP = 0x0001  # deliver MEMBERSHIP events (without it: MESSAGE frames only)
    # (v3) a token str8 follows the name. Set by the encoder from `Hello.token`, never in
    # `Hello.flags`: an older daemon refuses the unknown bit (BAD_FRAME), a clean failure
    TOKEN = 0x0002


KNOWN_HELLO_FLAGS = int(HelloFlag.MEMBERSHIP)  # the bits `Hello.flags` may hold
WIRE_HELLO_FLAGS = KNOWN_HELLO_FLAGS | int(HelloFlag.TOKEN)  # the bits a HELLO may carry
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+\Z")  # printable ASCII, no space


class ErrorCode(IntEnum):
    """Codes of ERROR frames. 1xx end the session, 2xx reject one request, 3xx inform."""

    BAD_FRAME = 101  # a frame failed to decode (the text says why)
    UNSUPPORTED_VERSION = 102  # no version in common with HELLO's range
    UNEXPECTED_FRAME = 103  # a frame not allowed now (before HELLO, a second HELLO, ...)
    NAME_IN_USE = 104  # another client of this daemon has the name HELLO asked for
    DAEMON_FULL = 105  # the daemon serves max_clients sessions already
    SLOW_RECEIVER = 106  # disconnected by the `disconnect` slow-receiver policy
    SHUTTING_DOWN = 107  # the daemon is stopping
    HANDSHAKE_TIMEOUT = 108  # no HELLO within the daemon's handshake_timeout
    UNAUTHENTICATED = 109  # (v3) HELLO's token is missing (and required here) or unknown
    GROUP_NAME_TOO_LONG = 201  # longer than the daemon's max_group_name
    TOO_MANY_GROUPS = 202  # JOIN beyond max_groups_per_client
    MESSAGE_TOO_LARGE = 203  # payload beyond max_message_size
    NOT_A_MEMBER = 204  # LEAVE of a group the client has not joined
    ALREADY_MEMBER = 205  # JOIN of a group the client is in already
    SERVICE_NOT_SUPPORTED = 206  # the daemon does not offer this service level
    INTERNAL_ERROR = 207  # the daemon failed on this request (a bug; it keeps serving)
    TOO_MANY_UNCONFIRMED = 208  # a CONFIRM MULTICAST beyond MAX_UNCONFIRMED outstanding
    ACCESS_DENIED = 209  # (v3) the daemon's access rules forbid this JOIN or MULTICAST
    BUSY = 210  # (v4) the daemon cannot take this request now (full buffers): retry later
    UNKNOWN_REPLICATION = 211  # (v6) SET_RATE of a replication this daemon does not run
    NOT_THE_ORIGIN = 212  # (v6) SET_RATE of a replication this daemon only receives
    BAD_RATE = 213  # (v6) SET_RATE's rate is not a cap the replication can run at
    MESSAGES_DROPPED = 301  # the `drop-unreliable` policy dropped messages for this client

    @property
    def ends_session(self) -> bool:
        """The daemon closes the connection after sending this code."""
        return 100 <= self.value < 200


_ERROR_CODES = {int(c): c for c in ErrorCode}


# ---------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class DaemonLimits:
    """The limits a daemon enforces on its clients, announced in WELCOME."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # bytes of one payload, 1..MAX_MESSAGE_SIZE
    max_group_name: int = DEFAULT_MAX_GROUP_NAME  # bytes (UTF-8) of a group name, 1..255
    max_groups_per_client: int = DEFAULT_MAX_GROUPS_PER_CLIENT  # groups one session may join

    @property
    def max_frame_size(self) -> int:
        """The cap on frames of a session with these limits (`frame_size_limit`)."""
        return frame_size_limit(self.max_message_size)


@dataclass(frozen=True, slots=True, order=True)
class ViewId:
    """Identifies one view of a group; ordered by (counter, coordinator).

    `counter` grows with every view change of the group; `coordinator` is the node id of
    the daemon that installed the view, so the views of two partitioned components that
    reach the same counter still differ.
    """

    counter: int  # u64, >= 1
    coordinator: int  # u32 daemon node id, >= 1 (0 is reserved)


@dataclass(frozen=True, slots=True)
class Hello:
    """Client → daemon, first frame of a session: versions spoken, the name wanted."""

    name: str = ""  # "" lets the daemon pick; else 1..32 bytes, no '#', whitespace, controls
    min_version: int = MIN_VERSION
    max_version: int = VERSION
    flags: HelloFlag = HelloFlag.MEMBERSHIP
    # (v3) the access token: 1..128 bytes of printable ASCII; None: none (flag TOKEN clear).
    # Needs max_version >= 3. Kept out of repr: it is a secret.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Daemon → client: the handshake succeeded."""

    version: int  # the version both sides speak from now on
    private_name: str  # "#client#daemon", unique among the daemon's sessions
    limits: DaemonLimits = field(default_factory=DaemonLimits)


@dataclass(frozen=True, slots=True)
class Join:
    group: str
    policy: SlowReceiverPolicy = SlowReceiverPolicy.BLOCK
    request_id: int = 0  # u32 echoed by an ERROR about this request; 0: none


@dataclass(frozen=True, slots=True)
class Leave:
    group: str
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class Multicast:
    """Client → daemon: send `payload` to every member of each of `groups`."""

    groups: tuple[str, ...]  # 1..256 distinct group names
    payload: bytes
    service: ServiceLevel = ServiceLevel.RELIABLE
    msg_type: int = 0  # u16 tag for the application, delivered unchanged
    request_id: int = 0
    confirm: bool = False  # (v2) answer with CONFIRMED(request_id) once delivered


@dataclass(frozen=True, slots=True)
class Confirmed:
    """Daemon → client (v2): the CONFIRM MULTICAST `request_id` was delivered by the
    sender's daemon in its view (a SAFE one: once every daemon of the view held it)."""

    request_id: int


@dataclass(frozen=True, slots=True)
class Message:
    """Daemon → client: a message delivered to this client."""

    sender: str  # private name of the sending client
    groups: tuple[str, ...]  # every group the sender named (not only the receiver's)
    service: ServiceLevel
    msg_type: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Membership:
    """Daemon → client: a new view of a group the client is in (or just left)."""

    group: str
    view_id: ViewId
    members: tuple[str, ...]  # private names, distinct; same order at every member
    cause: Cause
    who: tuple[str, ...]  # JOIN/LEAVE/DISCONNECT: exactly one; NETWORK: whoever came or went

    @property
    def transitional(self) -> bool:
        """A transitional view (Spread's TRANSITION): see `Cause.TRANSITIONAL`."""
        return self.cause == Cause.TRANSITIONAL


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """Daemon → client: a request failed, the session ends, or a notice (see `ErrorCode`)."""

    code: ErrorCode
    text: str  # human-readable detail, <= 1024 bytes, no control characters
    request_id: int = 0  # the failed request's id; 0 when not about one request


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Client → daemon (STATUS): ask for the daemon's status report."""

    request_id: int = 0  # u32 echoed by the STATUS_REPLY (or an ERROR about this request)


@dataclass(frozen=True, slots=True)
class StatusReply:
    """Daemon → client (STATUS_REPLY): the daemon's view, links, groups and counters.

    `report` is kept as the JSON text that travelled, so a frame re-encodes to the same
    bytes; ``json.loads(reply.report)`` gives the object (docs/client-protocol.md).
    """

    report: str  # JSON text of one object, <= MAX_STATUS_SIZE bytes of UTF-8
    request_id: int = 0  # the STATUS's request_id


# REPLICATE's enumerations travel as plain indexes: this package sits below
# `meshcast.replicate`, whose `Strategy`, `Variant` and `Tree` they index in definition order
# (names here for the client library and the docs; a test checks they stay the same).
REPLICATE_STRATEGIES = ("fastreplica", "fanout", "alm_tree")
REPLICATE_VARIANTS = ("k", "k+1", "k+2")  # connections beyond a group's k: 0, 1, 2
REPLICATE_TREES = ("chain", "balanced")
CAPACITY_AWARE_FLAG = 0x01  # REPLICATE flags: size subfiles to the senders' capacities
KNOWN_REPLICATE_FLAGS = CAPACITY_AWARE_FLAG
MAX_REPLICATE_CONNECTIONS = U8_MAX
ALL_TARGETS = "all"  # REPLICATE targets: every daemon of the view but the origin
GROUP_TARGET_PREFIX = "group:"  # "group:G": the daemons hosting members of group G
REPLICATION_STATES = ("hashing", "running", "complete", "failed")
RECIPIENT_STATES = ("waiting", "receiving", "verifying", "complete", "failed")
FINAL_REPLICATION_STATES = ("complete", "failed")


@dataclass(frozen=True, slots=True)
class Replicate:
    """Client → daemon (REPLICATE, v5): copy the file `path` on the daemon's host to the
    daemons named by `targets`. Answered by REPLICATION frames carrying `token`, the last
    one final (a refusal too: a final report whose state is "failed")."""

    path: str  # absolute path on the daemon's host: 1..4096 bytes, no control characters
    targets: str  # "all" | "name1,name2,..." (daemon names) | "group:G" (`parse_targets`)
    token: int = 0  # u32 chosen by the client; distinct among its replications in progress
    dest: str = ""  # directory for the copies on each recipient; "": its default
    rate: float = 0.0  # bytes/s per sender; 0: no cap beyond the daemons' own
    strategy: int = 0  # index into REPLICATE_STRATEGIES
    variant: int = 1  # index into REPLICATE_VARIANTS (k, k+1, k+2)
    tree: int = 0  # index into REPLICATE_TREES
    max_connections: int = 9  # the concurrency k is planned from: 1..255
    capacity_aware: bool = False  # flags bit 0x01
    # (v6) the daemon name of the origin's buddy, "" for none; None: the frame has no
    # such field (the version-5 layout, which a v6 daemon takes as "")
    buddy: str | None = None


@dataclass(frozen=True, slots=True)
class SetRate:
    """Client → daemon (SET_RATE, v6): replication `rid`, which this daemon originates, may
    upload `rate` bytes/s per sender from now on (0: no cap beyond the daemons' own).
    Answered by CONFIRMED(token) once applied, or by an ERROR naming `token`."""

    rid: int  # u64, as reports and `meshcast status` give it (16 hex digits)
    rate: float  # bytes/s; 0: no cap. Any f64 travels: the daemon judges it (BAD_RATE)
    token: int = 0  # u32 request id, echoed by the answer


@dataclass(frozen=True, slots=True)
class Replication:
    """Daemon → client (REPLICATION, v5): a progress report of the REPLICATE `token`.

    `report` is kept as the JSON text that travelled (like `StatusReply`); its shape is
    checked on decode (`replication_report_fault`), keys not known here are allowed."""

    token: int  # the REPLICATE's token
    final: bool  # the last frame of this token: the report's state is complete or failed
    report: str  # JSON text of one object, <= MAX_REPLICATION_REPORT bytes of UTF-8


@dataclass(frozen=True, slots=True)
class BlobMissing:
    """A target daemon that does not hold the blob of a `BlobHeld`, and why."""

    daemon: str  # the daemon's name
    held_bytes: int  # verified bytes it holds (u64; resumable by a new replication)
    reason: str  # at most MAX_BLOB_REASON bytes, no control characters


@dataclass(frozen=True, slots=True)
class BlobHeld:
    """Daemon → client (BLOB_HELD, v6): a replication to group `group` ended.

    Delivered to every member of `group` as a SAFE message in the group's total order:
    every member sees it once, at the same place among the group's other messages
    (docs/design/replicate.md, "Agreed completion").
    """

    group: str  # the group the replication targeted (`--to group:G`)
    rid: str  # the replication's id: 16 hex digits, as in its REPLICATION reports
    name: str  # the file's name (0..MAX_REPLICATE_PATH bytes)
    size: int  # bytes
    digest: str  # lowercase hex of the file's digest ("" if it was never hashed)
    origin: str  # the daemon the replication started from
    complete: bool  # every target holds the verified blob (then `missing` is empty)
    held_by: tuple[str, ...]  # daemons holding the verified blob, the origin first
    missing: tuple[BlobMissing, ...] = ()  # targets that do not, with what they hold and why

    @property
    def daemons(self) -> tuple[str, ...]:
        """Every daemon named: those holding the blob, then those missing it."""
        return self.held_by + tuple(m.daemon for m in self.missing)


@dataclass(frozen=True, slots=True)
class ReplicationTargets:
    """REPLICATE's `targets`, parsed: every daemon, one group's daemons, or a list."""

    kind: Literal["all", "group", "daemons"]
    group: str = ""  # kind "group": the group name
    daemons: tuple[str, ...] = ()  # kind "daemons": distinct daemon names, in given order

    def __str__(self) -> str:
        if self.kind == "all":
            return ALL_TARGETS
        if self.kind == "group":
            return GROUP_TARGET_PREFIX + self.group
        return ",".join(self.daemons)


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int  # u64, echoed by the PONG


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Closing: the client's last frame; the daemon answers with its own last frame."""


ClientFrame = (
    Hello | Join | Leave | Multicast | StatusRequest | Replicate | SetRate | Ping | Pong | Goodbye
)
DaemonFrame = (
    Welcome
    | Message
    | Membership
    | ErrorReport
    | StatusReply
    | Confirmed
    | Replication
    | BlobHeld
    | Ping
    | Pong
    | Goodbye
)
Frame = (
    Hello
    | Join
    | Leave
    | Multicast
    | StatusRequest
    | Replicate
    | SetRate
    | Welcome
    | Message
    | Membership
    | ErrorReport
    | StatusReply
    | Confirmed
    | Replication
    | BlobHeld
    | Ping
    | Pong
    | Goodbye
)

FRAME_TYPE_OF: dict[type[Frame], FrameType] = {
    Hello: FrameType.HELLO,
    Join: FrameType.JOIN,
    Leave: FrameType.LEAVE,
    Multicast: FrameType.MULTICAST,
    StatusRequest: FrameType.STATUS,
    Replicate: FrameType.REPLICATE,
    SetRate: FrameType.SET_RATE,
    Welcome: FrameType.WELCOME,
    Message: FrameType.MESSAGE,
    Membership: FrameType.MEMBERSHIP,
    ErrorReport: FrameType.ERROR,
    StatusReply: FrameType.STATUS_REPLY,
    Confirmed: FrameType.CONFIRMED,
    Replication: FrameType.REPLICATION,
    BlobHeld: FrameType.BLOB_HELD,
    Ping: FrameType.PING,
    Pong: FrameType.PONG,
    Goodbye: FrameType.GOODBYE,
}


# ---------------------------------------------------------------- validation


class _Fault(Exception):
    """What is wrong with a frame; `encode` turns it into ValueError, `decode` into DecodeError."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
SHOWN_CHARS = 64  # characters of user input an error message echoes


def shown(text: str) -> str:
    """`text` quoted for an error message: user input of any length gives a short line."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}… ({len(text)} characters)"


def _text_fault(text: str, what: str, max_bytes: int) -> str | None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return (
            f"{what} {shown(text)} cannot be encoded as UTF-8 ({exc.reason} at index {exc.start})"
        )
    if size > max_bytes:
        return f"{what} {shown(text)} is {size} bytes, more than {max_bytes}"
    control = _CONTROL.search(text)
    if control is not None:
        return f"{what} {shown(text)} has a control character at index {control.start()}"
    return None


def _word_fault(text: object, what: str, max_bytes: int) -> str | None:
    """A client or daemon name: 1..max_bytes bytes, no '#', no whitespace, no controls."""
    if not isinstance(text, str):
        return f"{what} must be a str, not {type(text).__name__}"
    fault = _text_fault(text, what, max_bytes)
    if fault is not None:
        return fault
    if not text:
        return f"{what} is empty"
    if "#" in text:
        return f"{what} {shown(text)} contains '#'"
    for index, char in enumerate(text):
        if char.isspace():
            return f"{what} {shown(text)} has whitespace at index {index}"
    return None


@lru_cache(maxsize=4096)
def _valid_group(name: str) -> bool:
    """Names repeat on every message: remember the valid ones (a pure function)."""
    return _group_fault_of(name, "") is None


@lru_cache(maxsize=4096)
def _valid_private(name: str) -> bool:
    return _private_fault_of(name, "") is None


def _group_fault(name: object, what: str = "group name") -> str | None:
    if isinstance(name, str) and _valid_group(name):
        return None
    return _group_fault_of(name, what)


def _private_fault(name: object, what: str) -> str | None:
    if isinstance(name, str) and _valid_private(name):
        return None
    return _private_fault_of(name, what)


def _group_fault_of(name: object, what: str) -> str | None:
    if not isinstance(name, str):
        return f"{what} must be a str, not {type(name).__name__}"
    fault = _text_fault(name, what, MAX_GROUP_NAME)
    if fault is not None:
        return fault
    if not name:
        return f"{what} is empty"
    if name.startswith("#"):
        return f"{what} {shown(name)} starts with '#' (reserved for private names)"
    return None


def _private_fault_of(name: object, what: str) -> str | None:
    if not isinstance(name, str):
        return f"{what} must be a str, not {type(name).__name__}"
    fault = _text_fault(name, what, MAX_PRIVATE_NAME)
    if fault is not None:
        return fault
    parts = name.split("#")
    if len(parts) != 3 or parts[0]:
        return f"{what} {shown(name)} is not of the form '#client#daemon'"
    return _word_fault(parts[1], f"client part of {what}", MAX_CLIENT_NAME) or _word_fault(
        parts[2], f"daemon part of {what}", MAX_DAEMON_NAME
    )


def _range_fault(value: object, what: str, low: int, high: int) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{what} must be an int, not {type(value).__name__}"
    if not low <= value <= high:
        return f"{what} {value} is outside {low}..{high}"
    return None


def _names_fault(names: object, what: str, low: int, high: int, *, private: bool) -> str | None:
    """A list of distinct group names or private names; `what` names the list."""
    if not isinstance(names, tuple):
        return f"{what} must be a tuple of names, not {type(names).__name__}"
    if not low <= len(names) <= high:
        return f"{what} has {len(names)} names; allowed: {low}..{high}"
    for name in names:
        fault = _private_fault(name, f"name in {what}") if private else _group_fault(name)
        if fault is not None:
            return fault
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                return f"{what} lists {shown(name)} twice"
            seen.add(name)
    return None


def _check(frame: object) -> None:
    """Raise `_Fault` naming what makes `frame` invalid; shared by encode and decode."""
    fault: str | None = None
    match frame:
        case Hello(name, min_version, max_version, flags, token):
            fault = (
                (_word_fault(name, "client name", MAX_CLIENT_NAME) if name != "" else None)
                or _range_fault(min_version, "min_version", 1, U16_MAX)
                or _range_fault(max_version, "max_version", 1, U16_MAX)
                or _range_fault(flags, "flags", 0, U16_MAX)
            )
            if fault is None and min_version > max_version:
                fault = f"min_version {min_version} is above max_version {max_version}"
            if fault is None and int(flags) & ~KNOWN_HELLO_FLAGS:
                fault = f"unknown flags 0x{int(flags) & ~KNOWN_HELLO_FLAGS:04x}"
            if fault is None and token is not None:
                fault = _token_fault(token)
                if fault is None and max_version < TOKEN_VERSION:
                    fault = f"a token needs max_version >= {TOKEN_VERSION}, not {max_version}"
        case Welcome(version, private_name, limits):
            fault = _range_fault(version, "version", 1, U16_MAX) or _private_fault(
                private_name, "private name"
            )
            fault = fault or _limits_fault(limits)
        case Join(group, policy, request_id):
            fault = _group_fault(group) or _range_fault(request_id, "request_id", 0, U32_MAX)
            fault = fault or _member_fault(policy, _POLICY_CODES, "slow-receiver policy")
        case Leave(group, request_id):
            fault = _group_fault(group) or _range_fault(request_id, "request_id", 0, U32_MAX)
        case Multicast(groups, payload, service, msg_type, request_id):
            fault = (
                _names_fault(groups, "groups", 1, MAX_DEST_GROUPS, private=False)
                or _service_fault(service)
                or _range_fault(msg_type, "msg_type", 0, U16_MAX)
                or _range_fault(request_id, "request_id", 0, U32_MAX)
                or _payload_fault(payload)
            )
        case Message(sender, groups, service, msg_type, payload):
            fault = (
                _private_fault(sender, "sender")
                or _names_fault(groups, "groups", 1, MAX_DEST_GROUPS, private=False)
                or _service_fault(service)
                or _range_fault(msg_type, "msg_type", 0, U16_MAX)
                or _payload_fault(payload)
            )
        case Membership(group, view_id, members, cause, who):
            fault = _group_fault(group) or _membership_fault(view_id, members, cause, who)
        case ErrorReport(code, text, request_id):
            fault = _range_fault(request_id, "request_id", 0, U32_MAX) or (
                _text_fault(text, "error text", MAX_ERROR_TEXT)
                if isinstance(text, str)
                else f"error text must be a str, not {type(text).__name__}"
            )
            fault = fault or _member_fault(code, _ERROR_CODES, "error code")
        case StatusRequest(request_id) | Confirmed(request_id):
            fault = _range_fault(request_id, "request_id", 0, U32_MAX)
        case StatusReply(report, request_id):
            fault = _range_fault(request_id, "request_id", 0, U32_MAX) or _report_fault(report)
        case Replicate():
            fault = _replicate_fault(frame)
        case SetRate(rid, rate, token):
            fault = _range_fault(token, "token", 0, U32_MAX) or _range_fault(rid, "rid", 0, U64_MAX)
            if fault is None and (isinstance(rate, bool) or not isinstance(rate, float)):
                fault = f"rate must be a float, not {type(rate).__name__}"
        case Replication(token, final, report):
            fault = _range_fault(token, "token", 0, U32_MAX) or (
                _replication_fault(report, final)
                if isinstance(final, bool)
                else f"final must be a bool, not {type(final).__name__}"
            )
        case BlobHeld():
            fault = _blob_held_fault(frame)
        case Ping(nonce) | Pong(nonce):
            fault = _range_fault(nonce, "nonce", 0, U64_MAX)
        case Goodbye():
            pass
        case _:
            fault = f"not a client-protocol frame: {type(frame).__name__}"
    if fault is not None:
        raise _Fault(fault)


def _token_fault(token: object) -> str | None:
    """An access token: 1..MAX_TOKEN bytes of printable ASCII (never echoed: a secret)."""
    if not isinstance(token, str):
        return f"token must be a str, not {type(token).__name__}"
    if not 1 <= len(token) <= MAX_TOKEN:
        return f"token of {len(token)} characters; allowed: 1..{MAX_TOKEN}"
    if not _TOKEN_CHARS.match(token):
        return "token has a character other than printable ASCII (space excluded)"
    return None


def _member_fault(value: object, table: Container[object], what: str) -> str | None:
    """`value` must be a key of `table` (an enum member, or the int or str it stands for)."""
    if isinstance(value, bool) or not isinstance(value, int | str) or value not in table:
        return f"unknown {what} {shown(value) if isinstance(value, str) else repr(value)}"
    return None


def _service_fault(service: object) -> str | None:
    return _member_fault(service, _SERVICES, "service level")


def _limits_fault(limits: object) -> str | None:
    if not isinstance(limits, DaemonLimits):
        return f"limits must be DaemonLimits, not {type(limits).__name__}"
    return (
        _range_fault(limits.max_message_size, "max_message_size", 1, MAX_MESSAGE_SIZE)
        or _range_fault(limits.max_group_name, "max_group_name", 1, MAX_GROUP_NAME)
        or _range_fault(limits.max_groups_per_client, "max_groups_per_client", 1, U32_MAX)
    )


def _payload_fault(payload: object) -> str | None:
    if not isinstance(payload, bytes):
        return f"payload must be bytes, not {type(payload).__name__}"
    return None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _report_fault(report: object) -> str | None:
    """The report of a STATUS_REPLY: the UTF-8 JSON text of one object, bounded."""
    return _json_object(report, MAX_STATUS_SIZE)[1]


def _str16_fault(text: object, what: str, low: int, high: int) -> str | None:
    """A str16 field: `low`..`high` bytes of UTF-8, no control characters."""
    if not isinstance(text, str):
        return f"{what} must be a str, not {type(text).__name__}"
    fault = _text_fault(text, what, high)
    if fault is None and len(text.encode("utf-8")) < low:
        fault = f"{what} is empty"
    return fault


def _replicate_fault(frame: Replicate) -> str | None:
    fault = (
        _range_fault(frame.token, "token", 0, U32_MAX)
        or _str16_fault(frame.path, "path", 1, MAX_REPLICATE_PATH)
        or _targets_fault(frame.targets)
        or _str16_fault(frame.dest, "dest", 0, MAX_REPLICATE_PATH)
        or _range_fault(frame.strategy, "strategy", 0, len(REPLICATE_STRATEGIES) - 1)
        or _range_fault(frame.variant, "variant", 0, len(REPLICATE_VARIANTS) - 1)
        or _range_fault(frame.tree, "tree", 0, len(REPLICATE_TREES) - 1)
        or _range_fault(frame.max_connections, "max_connections", 1, MAX_REPLICATE_CONNECTIONS)
    )
    if fault is not None:
        return fault
    if not frame.path.startswith("/"):
        return f"path {shown(frame.path)} is not absolute"
    rate = frame.rate
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        return f"rate must be a number, not {type(rate).__name__}"
    if not math.isfinite(rate) or rate < 0:
        return f"rate {rate!r} is not a finite number of bytes/s >= 0 (0: no cap)"
    aware: object = frame.capacity_aware
    if not isinstance(aware, bool):
        return f"capacity_aware must be a bool, not {aware!r}"
    if frame.buddy is None or frame.buddy == "":
        return None
    return _word_fault(frame.buddy, "buddy", MAX_DAEMON_NAME)


def _targets_fault(text: object) -> str | None:
    try:
        parse_targets(text)
    except ValueError as exc:
        return str(exc)
    return None


def parse_targets(text: object) -> ReplicationTargets:
    """REPLICATE's targets: ``all``, ``group:G`` or ``name1,name2,...`` (distinct daemon
    names). ValueError naming what is wrong."""
    fault = _str16_fault(text, "targets", 1, MAX_REPLICATE_TARGETS)
    if fault is not None:
        raise ValueError(fault)
    assert isinstance(text, str)
    if text == ALL_TARGETS:
        return ReplicationTargets("all")
    if text.startswith(GROUP_TARGET_PREFIX):
        group = text[len(GROUP_TARGET_PREFIX) :]
        fault = _group_fault(group, "group name in targets")
        if fault is not None:
            raise ValueError(fault)
        return ReplicationTargets("group", group=group)
    names = tuple(text.split(","))
    for name in names:
        fault = _word_fault(name, "daemon name in targets", MAX_DAEMON_NAME)
        if fault is not None:
            raise ValueError(fault)
    if len(set(names)) != len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise ValueError(f"targets name daemon {shown(twice)} twice")
    return ReplicationTargets("daemons", daemons=names)


def _json_object(report: object, limit: int) -> tuple[dict[str, object] | None, str | None]:
    """(the object, None) for the UTF-8 JSON text of one object within `limit` bytes;
    (None, fault) otherwise."""
    if not isinstance(report, str):
        return None, f"report must be a str, not {type(report).__name__}"
    try:
        size = len(report.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return None, f"report cannot be encoded as UTF-8 ({exc.reason} at index {exc.start})"
    if size > limit:
        return None, f"report is {size} bytes, more than {limit}"
    try:
        value = json.loads(report, parse_constant=_no_constant)
    except RecursionError:
        return None, "report is not JSON: nested too deeply"
    except ValueError as exc:
        return None, f"report is not JSON: {exc}"
    if not isinstance(value, dict):
        return None, f"report is a JSON {type(value).__name__}, not an object"
    return value, None


_HEX = re.compile(r"[0-9a-f]*\Z")
_RID = re.compile(r"[0-9a-f]{16}\Z")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_amount(value: object) -> bool:
    """A finite number >= 0 (JSON has no other kind; ints count)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _field_fault(obj: dict[str, object], key: str, ok: bool, want: str, where: str) -> str | None:
    if key not in obj:
        return f"{where} has no {key!r}"
    return None if ok else f"{where}: {key!r} must be {want}, not {obj[key]!r:.80}"


def replication_report_fault(value: object, final: bool | None = None) -> str | None:
    """What is wrong with a REPLICATION report (parsed JSON), or None. A final report is
    in state complete or failed. Unknown keys are allowed."""
    if not isinstance(value, dict):
        return f"report is a JSON {type(value).__name__}, not an object"
    g = value.get
    state = g("state")
    fault = (
        _field_fault(
            value,
            "rid",
            isinstance(g("rid"), str) and bool(_RID.match(str(g("rid")))),
            "16 lowercase hex digits",
            "report",
        )
        or _field_fault(value, "name", isinstance(g("name"), str), "a string", "report")
        or _field_fault(value, "size", _is_count(g("size")), "an integer >= 0", "report")
        or _field_fault(
            value,
            "digest",
            isinstance(g("digest"), str) and bool(_HEX.match(str(g("digest")))),
            "lowercase hex",
            "report",
        )
        or _field_fault(
            value,
            "state",
            state in REPLICATION_STATES,
            "one of " + "|".join(REPLICATION_STATES),
            "report",
        )
        or _field_fault(value, "elapsed", _is_amount(g("elapsed")), "a number >= 0", "report")
        or _field_fault(value, "detail", isinstance(g("detail"), str), "a string", "report")
        or _field_fault(value, "recipients", isinstance(g("recipients"), list), "a list", "report")
    )
    if fault is not None:
        return fault
    if final and state not in FINAL_REPLICATION_STATES:
        return f"a final report in state {state!r}"
    recipients = g("recipients")
    assert isinstance(recipients, list)
    for index, entry in enumerate(recipients):
        where = f"recipient {index}"
        if not isinstance(entry, dict):
            return f"{where} is a JSON {type(entry).__name__}, not an object"
        e = entry.get
        eta, path = e("eta"), e("path")
        fault = (
            _field_fault(entry, "daemon", isinstance(e("daemon"), str), "a string", where)
            or _field_fault(
                entry,
                "state",
                e("state") in RECIPIENT_STATES,
                "one of " + "|".join(RECIPIENT_STATES),
                where,
            )
            or _field_fault(
                entry, "held_bytes", _is_count(e("held_bytes")), "an integer >= 0", where
            )
            or _field_fault(
                entry, "bad_chunks", _is_count(e("bad_chunks")), "an integer >= 0", where
            )
            or _field_fault(entry, "rate", _is_amount(e("rate")), "a number >= 0", where)
            or _field_fault(
                entry, "eta", eta is None or _is_amount(eta), "a number >= 0 or null", where
            )
            or _field_fault(entry, "detail", isinstance(e("detail"), str), "a string", where)
            or _field_fault(
                entry, "path", path is None or isinstance(path, str), "a string or null", where
            )
        )
        if fault is not None:
            return fault
    return None


def _blob_held_fault(frame: BlobHeld) -> str | None:
    digest: object = frame.digest
    fault = (
        _group_fault(frame.group)
        or (
            None
            if isinstance(frame.rid, str) and _RID.match(frame.rid)
            else "rid must be 16 lowercase hex digits"
        )
        or _str16_fault(frame.name, "name", 0, MAX_REPLICATE_PATH)
        or _range_fault(frame.size, "size", 0, U64_MAX)
        or _word_fault(frame.origin, "origin", MAX_DAEMON_NAME)
    )
    if fault is not None:
        return fault
    if not (
        isinstance(digest, str)
        and _HEX.match(digest)
        and len(digest) % 2 == 0
        and len(digest) <= 2 * MAX_BLOB_DIGEST
    ):
        return (
            f"digest must be lowercase hex of at most {MAX_BLOB_DIGEST} bytes, not {digest!r:.80}"
        )
    complete: object = frame.complete
    if not isinstance(complete, bool):
        return f"complete must be a bool, not {complete!r}"
    held: object = frame.held_by
    missing: object = frame.missing
    if not isinstance(held, tuple) or not isinstance(missing, tuple):
        return "held_by and missing must be tuples"
    if len(held) + len(missing) > MAX_BLOB_DAEMONS:
        return f"{len(held) + len(missing)} daemons named, more than {MAX_BLOB_DAEMONS}"
    if complete and missing:
        return "a complete BLOB_HELD names daemons missing the blob"
    names: list[object] = list(held)
    for entry in missing:
        if not isinstance(entry, BlobMissing):
            return f"missing lists a {type(entry).__name__}, not a BlobMissing"
        reason: object = entry.reason
        fault = _range_fault(entry.held_bytes, "held_bytes", 0, U64_MAX) or (
            _text_fault(reason, "reason", MAX_BLOB_REASON)
            if isinstance(reason, str)
            else f"reason must be a str, not {type(reason).__name__}"
        )
        if fault is not None:
            return fault
        names.append(entry.daemon)
    for name in names:
        fault = _word_fault(name, "daemon name", MAX_DAEMON_NAME)
        if fault is not None:
            return fault
    if len(set(names)) != len(names):
        return "a daemon is named twice"
    return None


def _replication_fault(report: object, final: bool) -> str | None:
    value, fault = _json_object(report, MAX_REPLICATION_REPORT)
    return fault or replication_report_fault(value, final)


def json_ready(value: object) -> object:
    """`value` as JSON can carry it: mappings become dicts with str keys, tuples lists, and
    non-finite floats (an unbounded rate) None, as JSON has no infinity. Used for the
    STATUS report and for the daemon's JSON log lines."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def _membership_fault(view_id: object, members: object, cause: object, who: object) -> str | None:
    if not isinstance(view_id, ViewId):
        return f"view_id must be a ViewId, not {type(view_id).__name__}"
    fault = (
        _range_fault(view_id.counter, "view counter", 1, U64_MAX)
        or _range_fault(view_id.coordinator, "view coordinator", 1, U32_MAX)
        or _names_fault(members, "members", 0, MAX_MEMBERS, private=True)
        or _names_fault(who, "who", 0, MAX_MEMBERS, private=True)
    )
    if fault is not None:
        return fault
    fault = _member_fault(cause, _CAUSE_CODES, "cause")
    if fault is not None:
        return fault
    assert isinstance(members, tuple)  # _names_fault checked both
    assert isinstance(who, tuple)
    if cause == Cause.NETWORK:
        return None
    if cause == Cause.TRANSITIONAL:
        return f"a transitional view names nobody in who, not {len(who)}" if who else None
    if len(who) != 1:
        return f"a {cause} change names exactly one member in who, not {len(who)}"
    inside = who[0] in members
    if cause == Cause.JOIN and not inside:
        return f"joiner {who[0]!r} is missing from the members"
    if cause != Cause.JOIN and inside:
        return f"{who[0]!r} is still among the members after a {cause}"
    return None


def check_client_name(name: str) -> None:
    """Raise ValueError unless `name` may be asked for in HELLO ("" = let the daemon pick)."""
    fault = _word_fault(name, "client name", MAX_CLIENT_NAME) if name != "" else None
    if fault is not None:
        raise ValueError(fault)


def check_token(token: str) -> None:
    """Raise ValueError unless `token` may be sent in HELLO (1..128 printable ASCII)."""
    fault = _token_fault(token)
    if fault is not None:
        raise ValueError(fault)


def check_group_name(name: str, max_bytes: int = MAX_GROUP_NAME) -> None:
    """Raise ValueError unless `name` is a valid group name of at most `max_bytes` bytes.

    A name too long is reported against the one limit that applies (the smaller of
    `max_bytes` and the protocol's), echoing only its start.
    """
    limit = min(max_bytes, MAX_GROUP_NAME)
    fault: str | None = None
    if isinstance(name, str):
        size = len(name.encode("utf-8", "surrogatepass"))
        if size > limit:
            fault = f"group name {shown(name)} is {size} bytes, more than the {limit} allowed"
    fault = fault or _group_fault(name)
    if fault is not None:
        raise ValueError(fault)


def private_name(client: str, daemon: str) -> str:
    """The private name ``#client#daemon``; ValueError if either part is not a valid name."""
    fault = _word_fault(client, "client name", MAX_CLIENT_NAME) or _word_fault(
        daemon, "daemon name", MAX_DAEMON_NAME
    )
    if fault is not None:
        raise ValueError(fault)
    return f"#{client}#{daemon}"


def split_private_name(name: str) -> tuple[str, str]:
    """(client, daemon) of a private name; ValueError if it is not one."""
    fault = _private_fault(name, "private name")
    if fault is not None:
        raise ValueError(fault)
    _, client, daemon = name.split("#")
    return client, daemon


def clip_text(text: str, max_bytes: int = MAX_ERROR_TEXT) -> str:
    """`text` made fit for an ERROR: control characters become U+FFFD, cut to `max_bytes`."""
    clean = _CONTROL.sub("\ufffd", text).encode("utf-8", "replace")[:max_bytes]
    return clean.decode("utf-8", "ignore")


def choose_version(hello: Hello, lowest: int = MIN_VERSION, highest: int = VERSION) -> int | None:
    """The highest version both the client (per `hello`) and the daemon speak, if any."""
    version = min(hello.max_version, highest)
    return version if version >= max(hello.min_version, lowest) else None


# ---------------------------------------------------------------- encoding


def _str8(text: str) -> bytes:
    data = text.encode("utf-8")
    return bytes((len(data),)) + data


def _str16(text: str) -> bytes:
    data = text.encode("utf-8")
    return U16.pack(len(data)) + data


def _groups(groups: tuple[str, ...]) -> bytes:
    return U16.pack(len(groups)) + b"".join(_str8(g) for g in groups)


def _names(names: tuple[str, ...]) -> bytes:
    return U32.pack(len(names)) + b"".join(_str8(n) for n in names)


_MESSAGE_TYPE = bytes((FrameType.MESSAGE,))
_MULTICAST_TYPE = bytes((FrameType.MULTICAST,))
_MULTICAST = FrameType.MULTICAST  # enum attribute lookups cost on the per-message path
_MESSAGE = FrameType.MESSAGE


def encode_message(
    sender: str, groups: tuple[str, ...], service: ServiceLevel, msg_type: int, payload: bytes
) -> bytes:
    """A MESSAGE frame the daemon builds for a delivered message: `encode` of that
    `Message`, byte for byte, without re-running `_check` on every delivery.

    The fields come from a group DATA message (`meshcast.wire.group`), whose decoder
    bounds them (service known, msg_type a u16, str8 names, 1..256 groups); what it does
    not check is the names' form. The frame's head (everything but length and payload)
    repeats for every message of a sender to the same groups, so it is built and checked
    once and remembered. Anything out of the ordinary goes through `encode`, so a bad name
    raises the same ValueError as before.
    """
    if (
        type(groups) is tuple
        and type(msg_type) is int
        and isinstance(service, ServiceLevel)
        and isinstance(payload, bytes)
    ):
        try:
            head = (_cached_head if len(groups) <= _CACHED_GROUPS else _message_head)(
                sender, groups, service, msg_type
            )
        except TypeError:  # something unhashable where a name belongs
            head = None
        if head is not None:
            length = 1 + len(head) + len(payload)
            if length <= U32_MAX:
                return b"".join((LENGTH.pack(length), _MESSAGE_TYPE, head, payload))
    return encode(Message(sender, groups, service, msg_type, payload))


def _message_head(
    sender: str, groups: tuple[str, ...], service: ServiceLevel, msg_type: int
) -> bytes | None:
    """MESSAGE_HEAD, sender and groups of a MESSAGE frame; None if `encode` must judge."""
    if not (
        isinstance(sender, str)
        and _valid_private(sender)
        and 1 <= len(groups) <= MAX_DEST_GROUPS
        and all(isinstance(g, str) and _valid_group(g) for g in groups)
        and (len(groups) == 1 or len(set(groups)) == len(groups))
        and 0 <= msg_type <= U16_MAX
    ):
        return None
    raw_sender = sender.encode("utf-8")
    parts = [MESSAGE_HEAD.pack(service, msg_type), bytes((len(raw_sender),)), raw_sender]
    parts.append(U16.pack(len(groups)))
    for g in groups:
        raw = g.encode("utf-8")
        parts += (bytes((len(raw),)), raw)
    return b"".join(parts)


def encode_multicast(
    groups: tuple[str, ...],
    payload: bytes,
    service: ServiceLevel,
    msg_type: int = 0,
    request_id: int = 0,
    confirm: bool = False,
) -> bytes:
    """A MULTICAST frame, byte for byte what checking every field would build: the
    group names of a sender repeat message after message, so their section is checked
    and built once and remembered. Anything out of the ordinary has every field checked
    and raises the same ValueError."""
    if (
        type(groups) is tuple
        and 1 <= len(groups) <= _CACHED_GROUPS
        and isinstance(service, ServiceLevel)
        and type(msg_type) is int
        and 0 <= msg_type <= U16_MAX
        and type(request_id) is int
        and 0 <= request_id <= U32_MAX
        and isinstance(payload, bytes)
    ):
        try:
            names = _multicast_names(groups)
        except TypeError:  # something unhashable where a name belongs
            names = None
        if names is not None:
            length = 1 + MULTICAST_HEAD.size + len(names) + len(payload)
            if length <= U32_MAX:
                bits = CONFIRM_FLAG if confirm else 0
                head = MULTICAST_HEAD.pack(request_id, service | bits, msg_type, len(groups))
                return b"".join((LENGTH.pack(length), _MULTICAST_TYPE, head, names, payload))
    return _encode_checked(Multicast(groups, payload, service, msg_type, request_id, confirm))


@lru_cache(maxsize=1024)
def _multicast_names(groups: tuple[str, ...]) -> bytes | None:
    """The group names of a MULTICAST (at most _CACHED_GROUPS), None if not valid."""
    if _names_fault(groups, "groups", 1, MAX_DEST_GROUPS, private=False) is not None:
        return None
    return b"".join(_str8(g) for g in groups)


# heads of messages to a few groups are remembered: at most 1,024 x 8 x 256 bytes
_CACHED_GROUPS = 8
_cached_head = lru_cache(maxsize=1024)(_message_head)


def _encode_body(frame: Frame) -> list[bytes]:
    match frame:
        case Hello(name, min_version, max_version, flags, None):
            return [MAGIC, HELLO_HEAD.pack(min_version, max_version, flags), _str8(name)]
        case Hello(name, min_version, max_version, flags, str(token)):
            head = HELLO_HEAD.pack(min_version, max_version, int(flags) | HelloFlag.TOKEN)
            return [MAGIC, head, _str8(name), _str8(token)]
        case Welcome(version, private_name, limits):
            return [
                MAGIC,
                WELCOME_HEAD.pack(version),
                _str8(private_name),
                WELCOME_LIMITS.pack(
                    limits.max_message_size, limits.max_group_name, limits.max_groups_per_client
                ),
            ]
        case Join(group, policy, request_id):
            return [JOIN_HEAD.pack(request_id, _POLICY_CODES[policy]), _str8(group)]
        case Leave(group, request_id):
            return [LEAVE_HEAD.pack(request_id), _str8(group)]
        case Multicast(groups, payload, service, msg_type, request_id, confirm):
            bits = CONFIRM_FLAG if confirm else 0
            head = MULTICAST_HEAD.pack(request_id, service | bits, msg_type, len(groups))
            return [head, b"".join(_str8(g) for g in groups), payload]
        case Message(sender, groups, service, msg_type, payload):
            return [MESSAGE_HEAD.pack(service, msg_type), _str8(sender), _groups(groups), payload]
        case Membership(group, view_id, members, cause, who):
            return [
                _str8(group),
                VIEW_AND_CAUSE.pack(view_id.counter, view_id.coordinator, _CAUSE_CODES[cause]),
                _names(members),
                _names(who),
            ]
        case ErrorReport(code, text, request_id):
            data = text.encode("utf-8")
            return [ERROR_HEAD.pack(code, request_id), U16.pack(len(data)), data]
        case StatusRequest(request_id) | Confirmed(request_id):
            return [STATUS_HEAD.pack(request_id)]
        case StatusReply(report, request_id):
            return [STATUS_HEAD.pack(request_id), report.encode("utf-8")]
        case Replicate(path, targets, tag, dest, rate, strategy, variant, tree, k, aware, buddy):
            bits = CAPACITY_AWARE_FLAG if aware else 0
            tail = REPLICATE_TAIL.pack(rate, strategy, variant, tree, k, bits)
            body = [REPLICATE_HEAD.pack(tag), _str16(path), _str16(targets), _str16(dest), tail]
            return body if buddy is None else [*body, _str16(buddy)]
        case SetRate(rid, rate, tag):
            return [SET_RATE_BODY.pack(tag, rid, rate)]
        case Replication(tag, final, report):
            return [REPLICATION_HEAD.pack(tag, int(final)), report.encode("utf-8")]
        case BlobHeld():
            return [blob_held_body(frame)]
        case Ping(nonce) | Pong(nonce):
            return [NONCE.pack(nonce)]
        case Goodbye():
            return []
    raise AssertionError(f"unhandled frame {frame!r}")  # _check accepted an unknown type


def blob_held_body(frame: BlobHeld) -> bytes:
    """The body of a BLOB_HELD frame (unchecked: `encode`, or `encode_blob_held`, checks)."""
    flags = BLOB_COMPLETE_FLAG if frame.complete else 0
    digest = bytes.fromhex(frame.digest)
    parts = [
        BLOB_HELD_HEAD.pack(int(frame.rid, 16), flags, frame.size),
        _str8(frame.group),
        _str8(frame.origin),
        _str16(frame.name),
        bytes((len(digest),)),
        digest,
        U16.pack(len(frame.held_by)),
        *(_str8(d) for d in frame.held_by),
        U16.pack(len(frame.missing)),
    ]
    for m in frame.missing:
        parts += [_str8(m.daemon), BLOB_MISSING_HELD.pack(m.held_bytes), _str8(m.reason)]
    return b"".join(parts)


def encode(frame: Frame) -> bytes:
    """The complete frame, length prefix included. ValueError if `frame` is invalid."""
    if type(frame) is Multicast:  # the data path's frame: its names checked once
        return encode_multicast(
            frame.groups,
            frame.payload,
            frame.service,
            frame.msg_type,
            frame.request_id,
            frame.confirm,
        )
    return _encode_checked(frame)


def _encode_checked(frame: Frame) -> bytes:
    """`encode`, every field checked."""
    try:
        _check(frame)
    except _Fault as error:
        raise ValueError(f"{type(frame).__name__}: {error}") from None
    parts = _encode_body(frame)
    length = 1 + sum(len(p) for p in parts)
    if length > U32_MAX:
        raise ValueError(f"{type(frame).__name__}: frame of {length} bytes exceeds u32")
    return b"".join([LENGTH.pack(length), bytes((FRAME_TYPE_OF[type(frame)],)), *parts])


# ---------------------------------------------------------------- decoding


class _Reader:
    """Bounds-checked reads from one frame body; every shortfall raises `_Fault`."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)

    def ints(self, layout: struct.Struct, what: str) -> tuple[int, ...]:
        """Unpack `layout`, which holds integers only."""
        if self.end - self.pos < layout.size:
            raise _Fault(f"truncated {what}: {self.end - self.pos} of {layout.size} bytes")
        values: tuple[int, ...] = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return values

    def magic(self) -> None:
        found = bytes(self.data[self.pos : self.pos + len(MAGIC)])
        if found != MAGIC:
            raise _Fault(f"bad magic {found!r}, expected {MAGIC!r}")
        self.pos += len(MAGIC)

    def text(self, what: str, prefix: struct.Struct | None = None) -> str:
        """A UTF-8 string after its length (one byte, or `prefix`)."""
        if prefix is None:
            if self.pos >= self.end:
                raise _Fault(f"truncated length of {what}")
            size = self.data[self.pos]
            self.pos += 1
        else:
            (size,) = self.ints(prefix, f"length of {what}")
        if self.end - self.pos < size:
            raise _Fault(f"{what} of {size} bytes runs past the end of the frame")
        start = self.pos
        self.pos += size
        try:
            return str(self.data[start : self.pos], "utf-8")  # no copy of the bytes first
        except UnicodeDecodeError as exc:
            raise _Fault(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None

    def names(self, what: str, count: int, limit: int) -> tuple[str, ...]:
        if count > limit:
            raise _Fault(f"{what} has {count} names; at most {limit} allowed")
        if count > self.end - self.pos:  # every name takes at least its length byte
            raise _Fault(
                f"{what} has {count} names, more than the {self.end - self.pos} bytes left"
            )
        # `text` inlined for well-formed names (one per message and group); a faulty
        # one goes through `text` itself, for its error message
        data, end = self.data, self.end
        found: list[str] = []
        for i in range(count):
            pos = self.pos
            if pos < end and pos + 1 + data[pos] <= end:
                stop = pos + 1 + data[pos]
                try:
                    found.append(str(data[pos + 1 : stop], "utf-8"))
                    self.pos = stop
                    continue
                except UnicodeDecodeError:
                    pass
            found.append(self.text(f"name {i} in {what}"))  # raises
        return tuple(found)

    def rest(self) -> bytes:
        data = bytes(self.data[self.pos : self.end])
        self.pos = self.end
        return data

    def report(self, limit: int = MAX_STATUS_SIZE) -> str:
        """The rest of the frame as the UTF-8 text of a report (size checked first)."""
        if self.end - self.pos > limit:
            raise _Fault(f"report is {self.end - self.pos} bytes, more than {limit}")
        raw = self.rest()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Fault(f"report is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _service(code: int) -> ServiceLevel:
    level = _SERVICES.get(code)
    if level is None:
        raise _Fault(f"unknown service level {code}")
    return level


def _parse_multicast(r: _Reader) -> Multicast:
    request_id, service, msg_type, n = r.ints(MULTICAST_HEAD, "MULTICAST header")
    level = _service(service & ~CONFIRM_FLAG)
    groups = r.names("groups", n, MAX_DEST_GROUPS)
    confirm = bool(service & CONFIRM_FLAG)
    return Multicast(groups, r.rest(), level, msg_type, request_id, confirm)


def _parse_message(r: _Reader) -> Message:
    service, msg_type = r.ints(MESSAGE_HEAD, "MESSAGE header")
    level = _service(service)
    sender = r.text("sender")
    (n,) = r.ints(U16, "group count")
    groups = r.names("groups", n, MAX_DEST_GROUPS)
    return Message(sender, groups, level, msg_type, r.rest())


def _parsed_multicast_fault(frame: Multicast) -> str | None:
    """`_check` of a parsed MULTICAST: the rest (service, integers, payload) the parser
    already guarantees, so only the names are left to check, in `_check`'s order."""
    return _names_fault(frame.groups, "groups", 1, MAX_DEST_GROUPS, private=False)


def _parsed_message_fault(frame: Message) -> str | None:
    """`_check` of a parsed MESSAGE (see `_parsed_multicast_fault`)."""
    return _private_fault(frame.sender, "sender") or _names_fault(
        frame.groups, "groups", 1, MAX_DEST_GROUPS, private=False
    )


def _parse(ftype: FrameType, r: _Reader) -> Frame:
    match ftype:
        case FrameType.HELLO:
            r.magic()
            low, high, flags = r.ints(HELLO_HEAD, "HELLO header")
            if flags & ~WIRE_HELLO_FLAGS:
                raise _Fault(f"unknown flags 0x{flags & ~WIRE_HELLO_FLAGS:04x}")
            name = r.text("client name")
            token = r.text("token") if flags & HelloFlag.TOKEN else None
            return Hello(name, low, high, HelloFlag(flags & KNOWN_HELLO_FLAGS), token)
        case FrameType.WELCOME:
            r.magic()
            (version,) = r.ints(WELCOME_HEAD, "WELCOME header")
            name = r.text("private name")
            limits = DaemonLimits(*r.ints(WELCOME_LIMITS, "limits"))
            return Welcome(version, name, limits)
        case FrameType.JOIN:
            request_id, code = r.ints(JOIN_HEAD, "JOIN header")
            policy = _POLICIES.get(code)
            if policy is None:
                raise _Fault(f"unknown slow-receiver policy {code}")
            return Join(r.text("group name"), policy, request_id)
        case FrameType.LEAVE:
            (request_id,) = r.ints(LEAVE_HEAD, "LEAVE header")
            return Leave(r.text("group name"), request_id)
        case FrameType.MULTICAST:
            return _parse_multicast(r)
        case FrameType.MESSAGE:
            return _parse_message(r)
        case FrameType.MEMBERSHIP:
            group = r.text("group name")
            counter, coordinator, code = r.ints(VIEW_AND_CAUSE, "view id and cause")
            cause = _CAUSES.get(code)
            if cause is None:
                raise _Fault(f"unknown cause {code}")
            (n,) = r.ints(U32, "member count")
            members = r.names("members", n, MAX_MEMBERS)
            (n,) = r.ints(U32, "who count")
            who = r.names("who", n, MAX_MEMBERS)
            return Membership(group, ViewId(counter, coordinator), members, cause, who)
        case FrameType.ERROR:
            code, request_id = r.ints(ERROR_HEAD, "ERROR header")
            known = _ERROR_CODES.get(code)
            if known is None:
                raise _Fault(f"unknown error code {code}")
            return ErrorReport(known, r.text("error text", prefix=U16), request_id)
        case FrameType.STATUS:
            (request_id,) = r.ints(STATUS_HEAD, "STATUS header")
            return StatusRequest(request_id)
        case FrameType.STATUS_REPLY:
            (request_id,) = r.ints(STATUS_HEAD, "STATUS_REPLY header")
            return StatusReply(r.report(), request_id)
        case FrameType.CONFIRMED:
            (request_id,) = r.ints(STATUS_HEAD, "CONFIRMED header")
            return Confirmed(request_id)
        case FrameType.REPLICATE:
            (tag,) = r.ints(REPLICATE_HEAD, "REPLICATE header")
            path = r.text("path", prefix=U16)
            targets = r.text("targets", prefix=U16)
            dest = r.text("dest", prefix=U16)
            if r.end - r.pos < REPLICATE_TAIL.size:
                raise _Fault(f"truncated REPLICATE tail: {r.end - r.pos} of {REPLICATE_TAIL.size}")
            rate, strategy, variant, tree, k, bits = REPLICATE_TAIL.unpack_from(r.data, r.pos)
            r.pos += REPLICATE_TAIL.size
            if bits & ~KNOWN_REPLICATE_FLAGS:
                raise _Fault(f"unknown flags 0x{bits & ~KNOWN_REPLICATE_FLAGS:02x}")
            aware = bool(bits & CAPACITY_AWARE_FLAG)
            # (v6) the buddy's name: present or not, as the session's version has it
            buddy = r.text("buddy", prefix=U16) if r.pos < r.end else None
            return Replicate(
                path, targets, tag, dest, rate, strategy, variant, tree, k, aware, buddy
            )
        case FrameType.SET_RATE:
            if r.end - r.pos < SET_RATE_BODY.size:
                raise _Fault(f"truncated SET_RATE: {r.end - r.pos} of {SET_RATE_BODY.size} bytes")
            tag, rid, rate = SET_RATE_BODY.unpack_from(r.data, r.pos)
            r.pos += SET_RATE_BODY.size
            return SetRate(rid, rate, tag)
        case FrameType.REPLICATION:
            tag, final = r.ints(REPLICATION_HEAD, "REPLICATION header")
            if final > 1:
                raise _Fault(f"final is {final}, not 0 or 1")
            return Replication(tag, bool(final), r.report(MAX_REPLICATION_REPORT))
        case FrameType.BLOB_HELD:
            return _parse_blob_held(r)
        case FrameType.PING:
            return Ping(*r.ints(NONCE, "nonce"))
        case FrameType.PONG:
            return Pong(*r.ints(NONCE, "nonce"))
        case FrameType.GOODBYE:
            return Goodbye()
    raise AssertionError(f"unhandled frame type {ftype!r}")


def _parse_blob_held(r: _Reader) -> BlobHeld:
    rid, flags, size = r.ints(BLOB_HELD_HEAD, "BLOB_HELD header")
    if flags & ~BLOB_COMPLETE_FLAG:
        raise _Fault(f"unknown flags 0x{flags & ~BLOB_COMPLETE_FLAG:02x}")
    group = r.text("group name")
    origin = r.text("origin")
    name = r.text("name", prefix=U16)
    (length,) = r.ints(U8, "digest length")
    if length > MAX_BLOB_DIGEST:
        raise _Fault(f"digest of {length} bytes, more than {MAX_BLOB_DIGEST}")
    if r.end - r.pos < length:
        raise _Fault(f"digest of {length} bytes runs past the end of the frame")
    digest = bytes(r.data[r.pos : r.pos + length]).hex()
    r.pos += length
    (h,) = r.ints(U16, "held_by count")
    held = r.names("held_by", h, MAX_BLOB_DAEMONS)
    (m,) = r.ints(U16, "missing count")
    if h + m > MAX_BLOB_DAEMONS:
        raise _Fault(f"{h + m} daemons named, more than {MAX_BLOB_DAEMONS}")
    if m * (2 + BLOB_MISSING_HELD.size) > r.end - r.pos:  # bound the loop before it runs
        raise _Fault(f"{m} missing daemons, more than the {r.end - r.pos} bytes left hold")
    missing = []
    for i in range(m):
        daemon = r.text(f"daemon of missing entry {i}")
        (held_bytes,) = r.ints(BLOB_MISSING_HELD, f"held_bytes of missing entry {i}")
        missing.append(BlobMissing(daemon, held_bytes, r.text(f"reason of missing entry {i}")))
    return BlobHeld(
        group,
        f"{rid:016x}",
        name,
        size,
        digest,
        origin,
        bool(flags & BLOB_COMPLETE_FLAG),
        held,
        tuple(missing),
    )


# The heads of data frames seen lately (MESSAGE: everything before the payload; MULTICAST:
# the same after the request id) and the fields they decoded to: a stream repeats a few
# heads frame after frame, and a head decodes and checks the same way every time, so a
# known one is not parsed and checked again. Bounded: emptied when full.
_KNOWN_HEADS_MAX = 1024
_Fields = TypeVar("_Fields")
_known_messages: dict[bytes, tuple[str, tuple[str, ...], ServiceLevel, int]] = {}
_known_multicasts: dict[bytes, tuple[tuple[str, ...], ServiceLevel, int, bool]] = {}
_MULTICAST_FIXED = 1 + MULTICAST_HEAD.size  # type byte and head, before the names
_MULTICAST_KEY_START = 1 + 4  # the key leaves out the type byte and the request id


def _names_end(data: memoryview, pos: int, count: int) -> int:
    """Where `count` str8 names starting at `pos` end (past the end: malformed)."""
    for _ in range(count):
        if pos >= len(data):
            return len(data) + 1
        pos += 1 + data[pos]
    return pos


def _known_data_frame(ftype: FrameType, frame: memoryview) -> Frame | None:
    """A MESSAGE or MULTICAST whose head was decoded before (None: not known yet; it is
    remembered here after the general decoder accepted it)."""
    size = len(frame)
    if ftype is _MESSAGE:
        if size < 1 + MESSAGE_HEAD.size + 1:
            return None
        pos = 1 + MESSAGE_HEAD.size + 1 + frame[1 + MESSAGE_HEAD.size]
        if pos + U16.size > size:
            return None
        (n,) = U16.unpack_from(frame, pos)
        end = _names_end(frame, pos + U16.size, n)
        if end > size:
            return None
        head = bytes(frame[1:end])
        fields = _known_messages.get(head)
        if fields is None:
            message = _decode_fresh(frame)
            if isinstance(message, Message):
                fields = (message.sender, message.groups, message.service, message.msg_type)
                _remember(_known_messages, head, fields)
            return message
        sender, groups, service, msg_type = fields
        return Message(sender, groups, service, msg_type, bytes(frame[end:]))
    if size < _MULTICAST_FIXED:
        return None
    request_id, _, _, n = MULTICAST_HEAD.unpack_from(frame, 1)
    end = _names_end(frame, _MULTICAST_FIXED, n)
    if end > size:
        return None
    head = bytes(frame[_MULTICAST_KEY_START:end])
    known = _known_multicasts.get(head)
    if known is None:
        multicast = _decode_fresh(frame)
        if isinstance(multicast, Multicast):
            known = (multicast.groups, multicast.service, multicast.msg_type, multicast.confirm)
            _remember(_known_multicasts, head, known)
        return multicast
    groups, service, msg_type, confirm = known
    return Multicast(groups, bytes(frame[end:]), service, msg_type, request_id, confirm)


def _remember(table: dict[bytes, _Fields], head: bytes, fields: _Fields) -> None:
    if len(table) >= _KNOWN_HEADS_MAX:
        table.clear()
    table[head] = fields


def _decode_fresh(frame: memoryview) -> Frame | None:
    """The general decoder's frame (None if it raised: the caller decodes again, and
    raises its DecodeError itself)."""
    try:
        return _decode_body(_FRAME_TYPES[frame[0]], frame)
    except DecodeError:
        return None


def _decode_frame(type_and_body: memoryview, accept: frozenset[FrameType]) -> Frame:
    """Decode `type u8 | body` (the bytes the length prefix counts; at least one)."""
    code = type_and_body[0]
    ftype = _FRAME_TYPES.get(code)
    if ftype is None:
        raise DecodeError(f"unknown frame type 0x{code:02x}")
    if ftype not in accept:
        allowed = ", ".join(t.name for t in sorted(accept))
        raise DecodeError(f"unexpected {ftype.name} frame (accepted here: {allowed})")
    if ftype is _MESSAGE or ftype is _MULTICAST:
        known = _known_data_frame(ftype, type_and_body)
        if known is not None:
            return known
    return _decode_body(ftype, type_and_body)


def _decode_body(ftype: FrameType, type_and_body: memoryview) -> Frame:
    """Parse and check a frame of a known, accepted type (the general decoder)."""
    reader = _Reader(type_and_body[1:])
    try:
        # the data path's two frames: parsed and checked without the general dispatch
        if ftype is _MULTICAST:
            multicast = _parse_multicast(reader)
            fault = _parsed_multicast_fault(multicast)
            if fault is not None:
                raise _Fault(fault)
            return multicast  # `rest` took every byte left: nothing trails
        if ftype is _MESSAGE:
            message = _parse_message(reader)
            fault = _parsed_message_fault(message)
            if fault is not None:
                raise _Fault(fault)
            return message
        frame = _parse(ftype, reader)
        if reader.pos != reader.end:
            raise _Fault(f"{reader.end - reader.pos} trailing bytes after the body")
        _check(frame)
    except _Fault as error:  # not `fault`: that name holds a str above (mypyc types it so)
        raise DecodeError(f"{ftype.name} frame: {error}") from None
    return frame


def _length_fault(length: int, max_frame_size: int) -> str | None:
    if length == 0:
        return "frame length 0: a frame has at least its type byte"
    if length > max_frame_size:
        return f"frame length {length} exceeds the limit of {max_frame_size} bytes"
    return None


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    accept: frozenset[FrameType] = ANY_FRAME,
) -> Frame:
    """Parse exactly one complete frame (length prefix included).

    Raises `DecodeError`, and nothing else, if the bytes are not exactly one valid frame
    of a type in `accept` within `max_frame_size`.
    """
    if not isinstance(data, bytes):
        data = bytes(data)  # views of immutable bytes can outlive this call harmlessly
    if len(data) < LENGTH_SIZE:
        raise DecodeError(f"{len(data)} bytes are too short for a frame length")
    (length,) = LENGTH.unpack_from(data)
    fault = _length_fault(length, max_frame_size)
    if fault is not None:
        raise DecodeError(fault)
    if len(data) - LENGTH_SIZE != length:
        raise DecodeError(
            f"frame length {length} does not match the {len(data) - LENGTH_SIZE} bytes given"
        )
    return _decode_frame(memoryview(data)[LENGTH_SIZE:], accept)


class FrameDecoder:
    """Splits a byte stream into frames, for the stream transports (sans-I/O).

    Use: after every `feed`, call `next_frame` until it returns None (or iterate)::

        decoder.feed(chunk)
        for frame in decoder:
            ...

    The length of a frame is checked against `max_frame_size` as soon as its 4 length
    bytes arrive, before any of its body is kept: an oversized frame costs at most the
    chunk it arrived in. Used as above, the decoder holds at most one incomplete frame.

    `next_frame` raises `DecodeError` on a bad frame. A bad body (the length was fine)
    is skipped, so the stream stays in sync and later frames decode. A bad length loses
    the stream: `synchronised` turns False, later input is discarded and every further
    `next_frame` raises again.
    """

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        accept: frozenset[FrameType] = ANY_FRAME,
    ) -> None:
        self._buffer = bytearray()
        self._start = 0  # offset of the next frame in _buffer
        self._failure: str | None = None  # why the stream is lost
        self._accept = accept
        self._max_frame_size = 0
        self.max_frame_size = max_frame_size

    @property
    def max_frame_size(self) -> int:
        """Cap on a frame's length field. A client raises it after WELCOME (to
        `Welcome.limits.max_frame_size`); it applies from the next frame not yet taken."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        if not 1 <= value <= U32_MAX:
            raise ValueError(f"max_frame_size must be within 1..{U32_MAX}, got {value}")
        self._max_frame_size = value

    @property
    def synchronised(self) -> bool:
        """False once a bad frame length has made the frame boundaries unknowable."""
        return self._failure is None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the stream. Never raises; see `next_frame`."""
        if self._failure is not None or not data:
            return
        self._buffer += data
        self._head()

    def _head(self) -> int | None:
        """Length of the frame at the front once its length bytes are in, else None.

        A bad length is recorded as the stream's failure and everything buffered dropped.
        """
        if len(self._buffer) - self._start < LENGTH_SIZE:
            return None
        (length,) = LENGTH.unpack_from(self._buffer, self._start)
        fault = _length_fault(length, self._max_frame_size)
        if fault is not None:
            self._failure = fault
            self._buffer = bytearray()
            self._start = 0
            return None
        assert isinstance(length, int)
        return length

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive. Raises `DecodeError`."""
        length = self._head()
        if self._failure is not None:
            raise DecodeError(f"stream out of sync: {self._failure}")
        if length is None or len(self._buffer) - self._start - LENGTH_SIZE < length:
            return None
        begin = self._start + LENGTH_SIZE
        self._start = begin + length
        with memoryview(self._buffer) as view:
            frame = bytes(view[begin : self._start])  # a copy: the buffer must stay resizable
        self._compact()
        return _decode_frame(memoryview(frame), self._accept)

    def _compact(self) -> None:
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start >= 1 << 16 and self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame

    def end_of_stream(self) -> None:
        """Call when the peer closed: raises `DecodeError` if the stream ended mid-frame."""
        if self._failure is not None:
            raise DecodeError(f"stream out of sync: {self._failure}")
        if self.buffered:
            raise DecodeError(f"stream ended inside a frame ({self.buffered} bytes pending)")
