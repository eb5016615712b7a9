"""The simulator's trace: typed events as JSON lines, deterministic for one seed."""

from __future__ import annotations

import hashlib
import json

from meshcast.errors import UsageError

# (time, kind, src, dst, size, crc, reason, arrive_at): one datagram event
_PacketRecord = tuple[float, str, int, int, int, str, str | None, float | None]
# (time, kind, node, effect type name or None): one timer or effect event
_NodeRecord = tuple[float, str, int, str | None]


class TraceLog:
    """Append-only trace. Each event is one JSON object with sorted keys, compact
    separators, and at least ``time`` (virtual seconds, Python's shortest float repr)
    and ``kind``.

    General events are rendered at once (a snapshot of their fields). The frequent
    per-packet and per-timer events hold only immutable scalars, so they are kept as
    tuples and rendered, identically to `json.dumps`, when the lines are asked for.
    """

    __slots__ = ("_items", "packets")

    def __init__(self, packets: bool) -> None:
        self.packets = packets  # per-packet, per-timer and per-effect events recorded too
        self._items: list[str | _PacketRecord | _NodeRecord] = []

    def record(self, now: float, kind: str, **fields: object) -> None:
        if "time" in fields:
            raise UsageError("trace field name 'time' is reserved")
        fields["time"] = now
        fields["kind"] = kind
        try:
            line = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"trace event {kind!r} is not plain JSON: {exc}") from exc
        self._items.append(line)

    def record_packet(
        self,
        now: float,
        kind: str,
        src: int,
        dst: int,
        size: int,
        crc: str,
        reason: str | None = None,
        arrive_at: float | None = None,
    ) -> None:
        """`kind`, `crc` and `reason` must need no JSON escaping (plain identifiers, hex)."""
        self._items.append((now, kind, src, dst, size, crc, reason, arrive_at))

    def record_node(self, now: float, kind: str, node: int, type_name: str | None = None) -> None:
        """`kind` must need no JSON escaping (a plain identifier)."""
        self._items.append((now, kind, node, type_name))

    def lines(self) -> list[str]:
        return [item if isinstance(item, str) else _render(item) for item in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def digest(self) -> str:
        """SHA-256 (hex) of the lines, each followed by a newline (as written to a file)."""
        h = hashlib.sha256()
        for line in self.lines():
            h.update(line.encode())
            h.update(b"\n")
        return h.hexdigest()


def _render(item: _PacketRecord | _NodeRecord) -> str:
    # Keys in sorted order; floats as repr (what json.dumps writes for finite floats).
    if len(item) == 8:
        now, kind, src, dst, size, crc, reason, arrive_at = item
        head = f'{{"arrive_at":{arrive_at!r},' if arrive_at is not None else "{"
        why = f'"reason":"{reason}",' if reason is not None else ""
        return (
            f'{head}"crc":"{crc}","dst":{int(dst)},"kind":"{kind}",{why}'
            f'"size":{int(size)},"src":{int(src)},"time":{now!r}}}'
        )
    now, kind, node, type_name = item
    tail = f',"type":{json.dumps(type_name)}' if type_name is not None else ""
    return f'{{"kind":"{kind}","node":{int(node)},"time":{now!r}{tail}}}'
