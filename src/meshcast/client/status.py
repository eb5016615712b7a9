"""The human-readable form of a daemon's status report (what `meshcast status` prints).

`format_status(report)` renders the dict that `Client.status()` returns (the keys are in
docs/client-protocol.md, "Status reports") as a few lines of text: the daemon, its keys (a
daemon without keys gets a first line in capitals: INSECURE), its view, its tree, its links
(with what each dropped, by cause), the groups with their members, one line
of everything dropped or refused, and the counters that are not zero. A
key that is missing (an older or newer daemon) is shown as ``-`` or left out; nothing
here raises on a report of unexpected shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _maps(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _rate(bps: object) -> str:
    """Bits per second, as ``100 Mbit/s``."""
    if isinstance(bps, bool) or not isinstance(bps, int | float):
        return "-"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps:g} bit/s"


def _node(entry: Mapping[str, Any]) -> str:
    return f"{_text(entry.get('name'))} ({_text(entry.get('node'))})"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Rows of cells as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _view_lines(view: Mapping[str, Any]) -> list[str]:
    members = _maps(view.get("members"))
    agreed = "agreed" if view.get("agreed") else "not agreed yet"
    return [
        f"view: {len(members)} daemons, {agreed}, digest {_text(view.get('digest'))}, "
        f"{_text(view.get('links'))} links",
        "  " + "  ".join(_node(m) for m in members),
    ]


def _tree_line(tree: Mapping[str, Any], daemon: str) -> str:
    edges = tree.get("edges")
    pairs = [
        f"{e[0]}→{e[1]}"
        for e in (edges if isinstance(edges, list) else [])
        if isinstance(e, list) and len(e) == 2
    ]
    return (
        f"tree of {daemon}: depth {_text(tree.get('depth'))}, "
        f"bottleneck {_rate(tree.get('rate_bps'))}: {' '.join(pairs) or '(no edges)'}"
    )


# Causes of a link's drops, as the report names them and as a person reads them.
_DROP_CAUSES = {
    "malformed": "malformed",
    "wrong_sender": "wrong sender",
    "stale_epoch": "stale epoch",
    "out_of_window": "out of window",
    "duplicates": "duplicates",
    "protocol_violations": "protocol violations",
    "cleartext": "cleartext",
    "truncated": "truncated",
    "unknown_key": "unknown key",
    "forged": "forged",
    "replayed": "replayed",
    "no_session": "no session",
}


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _causes(dropped: Mapping[str, Any]) -> str:
    """``malformed 5, wrong sender 3``: the causes that are not zero."""
    return ", ".join(
        f"{label} {_count(dropped.get(key))}"
        for key, label in _DROP_CAUSES.items()
        if _count(dropped.get(key))
    )


def _link_lines(links: list[Mapping[str, Any]]) -> list[str]:
    if not links:
        return ["links: none configured"]
    rows = [["neighbour", "state", "srtt", "bandwidth", "weight", "retransmissions", "dropped"]]
    for link in links:
        srtt = link.get("srtt_ms")
        rows.append(
            [
                _node(link),
                "up" if link.get("up") else "down",
                f"{srtt:g} ms" if isinstance(srtt, int | float) else "-",
                _rate(link.get("bandwidth_bps")),
                _text(link.get("weight")),
                _text(link.get("retransmissions")),
                _text(_map(link.get("dropped")).get("total")),
            ]
        )
    lines = ["links:", *_table(rows)]
    for link in links:
        causes = _causes(_map(link.get("dropped")))
        if causes:
            lines.append(f"  dropped from {_node(link)}: {causes}")
    return lines


def _drop_lines(counters: Mapping[str, Any]) -> list[str]:
    """Everything the daemon dropped or refused from others, in one line."""
    links = _map(counters.get("links"))
    daemon = _map(counters.get("daemon"))
    overlay = _map(counters.get("overlay"))
    sessions = _map(counters.get("sessions"))
    parts = []
    if _count(links.get("total")):
        parts.append(f"{_count(links.get('total'))} datagrams on links ({_causes(links)})")
    named = [
        (daemon, "foreign_dropped", "datagrams from unknown addresses"),
        (daemon, "unknown_upper_dropped", "overlay messages for a protocol this daemon lacks"),
        (daemon, "probes_malformed", "malformed probes"),
        (overlay, "lsas_unknown_dropped", "LSAs of unknown daemons"),
        (overlay, "lsas_bad_link_dropped", "LSAs claiming unconfigured links"),
        (sessions, "handshake_bad_frames", "bad frames before HELLO"),
        (sessions, "handshake_timeouts", "handshake timeouts"),
        (sessions, "pending_refused", "connections refused while handshakes waited"),
        (sessions, "unauthenticated", "handshakes refused for their token"),
        (sessions, "access_denied", "requests denied by the access rules"),
    ]
    parts += [f"{_count(s.get(key))} {label}" for s, key, label in named if _count(s.get(key))]
    return [f"dropped: {'; '.join(parts) or 'nothing'}"]


def _group_lines(report: Mapping[str, Any]) -> list[str]:
    groups = _maps(report.get("groups"))
    total = report.get("groups_total", len(groups))
    lines = [
        f"groups: {_text(total)}"
        + (f" (first {len(groups)} shown)" if total != len(groups) else "")
    ]
    for group in groups:
        view_id = group.get("view_id")
        view = ".".join(map(str, view_id)) if isinstance(view_id, list) else "-"
        members = _maps(group.get("members"))
        size = group.get("size", len(members))
        lines.append(
            f"  {_text(group.get('name'))}  view {view}  {_text(size)} members "
            f"({_text(group.get('local'))} here)"
        )
        rows = [
            [_text(m.get("name")), f"on {_text(m.get('daemon'))} ({_text(m.get('node'))})"]
            for m in members
        ]
        if rows:
            lines += _table(rows, indent="    ")
        if isinstance(size, int) and size > len(members):
            lines.append(f"    ... and {size - len(members)} more")
    return lines


def _counter_lines(counters: Mapping[str, Any]) -> list[str]:
    lines = ["counters (not zero):"]
    for section, values in counters.items():
        shown = [
            f"{name} {value}"
            for name, value in _map(values).items()
            if isinstance(value, int | float) and not isinstance(value, bool) and value
        ]
        lines.append(f"  {section}: {', '.join(shown) or '-'}")
    return lines


def _insecure_lines(security: Mapping[str, Any]) -> list[str]:
    """First in the report: a daemon running without keys must not go unnoticed."""
    if security.get("mode") != "INSECURE":
        return []
    return [
        "INSECURE: this daemon neither encrypts nor authenticates its traffic "
        "([security] insecure = true)"
    ]


def _security_lines(security: Mapping[str, Any]) -> list[str]:
    mode = security.get("mode")
    if mode is None or mode == "INSECURE":
        return []
    keys = ", ".join(
        f"{_text(k.get('fingerprint'))} ({_text(k.get('role'))})"
        for k in _maps(security.get("keys"))
    )
    return [f"security: {_text(mode)}, keys {keys or '-'}"]


def _replication_lines(report: Mapping[str, Any]) -> list[str]:
    """Replications this daemon knows of (the origin's and the recipients' view), if any."""
    replications = _maps(_map(report.get("replication")).get("replications"))
    if not replications:
        return []
    lines = [f"replications: {len(replications)}"]
    for entry in replications:
        recipients = _maps(entry.get("recipients"))
        size = _count(entry.get("size"))
        held = sum(_count(r.get("held_bytes")) for r in recipients)
        done = sum(1 for r in recipients if r.get("state") == "complete")
        total = size * len(recipients)
        share = f" ({100 * held // total}%)" if total else ""
        lines.append(
            f"  {_text(entry.get('rid'))}  {_text(entry.get('name'))}  "
            f"{_text(entry.get('state'))}  {held} of {total} bytes{share}, "
            f"{done} of {len(recipients)} recipients complete"
        )
        lines += [
            f"    {_text(r.get('daemon'))}  {_text(r.get('state'))}  "
            f"{_count(r.get('held_bytes'))} bytes  {_text(r.get('detail'))}".rstrip()
            + (
                f"  (stalled: no report for {_text(r.get('stalled'))} s)"
                if isinstance(r.get("stalled"), int | float)
                else ""
            )
            for r in recipients
            if r.get("state") != "complete"
        ]
    return lines


def _stall_lines(report: Mapping[str, Any]) -> list[str]:
    """Every stalled transfer of this daemon, with the daemons it waits on by name."""
    lines = []
    for entry in _maps(_map(report.get("replication")).get("transfers")):
        stalled = entry.get("stalled")
        if not isinstance(stalled, Mapping):
            continue
        names = stalled.get("waiting_on_daemons")
        if not isinstance(names, list):
            names = stalled.get("waiting_on")
        waiting = ", ".join(_text(n) for n in names) if isinstance(names, list) else ""
        lines.append(
            f"STALLED: replication {_text(entry.get('rid'))} of {_text(entry.get('name'))} "
            f"({_text(entry.get('role'))}): no progress for {_text(stalled.get('for'))} s, "
            f"waiting on {waiting or '-'} ({_text(stalled.get('why'))})"
        )
    return lines


def format_status(report: Mapping[str, Any]) -> str:
    """The report as text, one line per fact, ending without a newline."""
    daemon = _map(report.get("daemon"))
    name = _text(daemon.get("name"))
    sessions = _map(report.get("sessions"))
    security = _map(report.get("security"))
    lines = _insecure_lines(security)
    lines += [
        f"daemon {name} (node {_text(daemon.get('node'))}) of cluster "
        f"{_text(daemon.get('cluster'))}, site {_text(daemon.get('site'))}, "
        f"at {_text(daemon.get('address'))}",
        f"incarnation {_text(daemon.get('incarnation'))}, "
        f"up {_text(daemon.get('uptime_seconds'))} s, pid {_text(daemon.get('pid'))}, "
        f"{_text(sessions.get('open'))} of {_text(sessions.get('max_clients'))} client sessions",
    ]
    lines += _security_lines(security)
    view = report.get("view")
    lines += _view_lines(view) if isinstance(view, Mapping) else ["view: none yet"]
    tree = report.get("tree")
    if isinstance(tree, Mapping):
        lines.append(_tree_line(tree, name))
    lines += _link_lines(_maps(report.get("links")))
    lines += _group_lines(report)
    lines += _replication_lines(report)
    lines += _stall_lines(report)
    if report.get("truncated"):
        lines.append("(the daemon cut this report short: some groups or members are left out)")
    if "error" in report:
        lines.append(f"error: {_text(report.get('error'))}")
    lines += _drop_lines(_map(report.get("counters")))
    lines += _counter_lines(_map(report.get("counters")))
    return "\n".join(lines)


__all__ = ["format_status"]
