"""Effects of the group ordering engine (small frozen dataclasses, past tense or commands)."""

from __future__ import annotations

from dataclasses import dataclass

from meshcast.ids import NodeId
from meshcast.wire.client import ServiceLevel


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class Broadcast:
    """Command to the daemon: pass `payload` to `OverlayNode.multicast(dests, ...)`."""

    dests: tuple[NodeId, ...]  # sorted, never the local daemon
    payload: bytes

    def __init__(self, dests: tuple[NodeId, ...], payload: bytes) -> None:
        self.dests = dests
        self.payload = payload


@dataclass(slots=True)  # per message: not frozen, __init__ written out (GroupData)
class Deliver:
    """Hand one message to the local clients that are members of `groups`."""

    sender: str  # private name of the sending client
    groups: tuple[str, ...]  # every group the message was sent to
    service: ServiceLevel
    msg_type: int
    payload: bytes
    source: NodeId  # the sending daemon
    msg_id: int  # unique per source and view

    def __init__(
        self,
        sender: str,
        groups: tuple[str, ...],
        service: ServiceLevel,
        msg_type: int,
        payload: bytes,
        source: NodeId,
        msg_id: int,
    ) -> None:
        self.sender = sender
        self.groups = groups
        self.service = service
        self.msg_type = msg_type
        self.payload = payload
        self.source = source
        self.msg_id = msg_id


@dataclass(frozen=True, slots=True)
class MessageRef:
    """A message, by identity, without its payload."""

    source: NodeId
    msg_id: int
    service: ServiceLevel
    sender: str
    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OrderingReset:
    """A new view was installed: ordering state restarted. `undelivered` lists the held
    messages for local members that can no longer be delivered with their guarantee
    (this is where a virtual-synchrony flush would deliver or discard them instead)."""

    old_view_id: bytes | None
    new_view_id: bytes
    members: tuple[NodeId, ...]
    undelivered: tuple[MessageRef, ...]


@dataclass(frozen=True, slots=True)
class SubmitConfirmed:
    """A local message submitted with `token` was delivered here, in the view it was
    sent in (a SAFE one: once every daemon of that view held it), hosted or not."""

    token: int


@dataclass(frozen=True, slots=True)
class SubmitLost:
    """A local message submitted with `token` will never be delivered (it waited for a
    view change and could not be sent in the new view)."""

    token: int
    reason: str


@dataclass(frozen=True, slots=True)
class ViewTransition:
    """A flush is about to deliver what is left of the old view in its *transitional
    configuration*: `survivors` (this daemon among them) move together from
    `old_view_id` to the next view, the other `old_members` departed. Every message
    delivered before this effect in the old view met the old view's guarantees (the
    same set at every survivor); those delivered after it, up to the `OrderingReset`,
    only with respect to the survivors (a SAFE one: every survivor holds it)."""

    old_view_id: bytes
    old_members: tuple[NodeId, ...]
    survivors: tuple[NodeId, ...]


GroupEffect = Broadcast | Deliver | OrderingReset | SubmitConfirmed | SubmitLost | ViewTransition
