"""`meshcast demo`: the embedded six-daemon cluster, live: clients chat, a daemon is killed.

What it shows, step by step:

1. Real daemon processes on 127.0.0.1-6 in three sites, with emulated wide-area delays
   between the sites, agree on one view; every daemon multicasts probes over its source
   tree, split per next hop.
2. One chat client per daemon (a real session over the daemon's Unix socket, through
   `meshcast.connect`) joins the group "chat"; the membership grows one join at a time.
   Every client sends a few lines at once with AGREED service, and every client delivers
   the same lines in the same order.
3. A gateway is killed with SIGKILL while the clients keep chatting: its client is
   disconnected, the surviving clients get a `network` membership change, the daemons
   install new views and route around the dead one, and the chat goes on among the
   survivors, again in one order.
4. A summary; exit status 0 only if every check held.

The checks are what must hold whatever happens at a view change: within a stable view
every client delivers every line, in one order; over the whole run, any two clients
deliver the lines they both delivered in the same order, each once. Lines in flight when
the view changes are counted, not required: until the group layer's virtual-synchrony
flush is complete they may be lost, and those of the killed daemon's client may be lost
for good.

Everything started here is stopped here, on failure, Ctrl-C and SIGTERM too: clients,
daemon processes, the temporary directory of the client sockets. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from meshcast.client import Client, ClientError, RequestRejected, UsageError, connect
from meshcast.config import ClusterConfig, default_config
from meshcast.runtime.local_cluster import DaemonProcess, LocalCluster
from meshcast.wire.client import Cause, Membership, Message, ServiceLevel, split_private_name

PROBE_INTERVAL = 0.2  # s between probes from each daemon
START_TIMEOUT = 20.0  # s for the cluster to agree on its first view (and on a new one)
WATCH_TIME = 2.0  # s of probes shown per phase

GROUP = "chat"
USER_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
LINES_PER_ROUND = 3  # lines each client sends in one round
LINE_INTERVAL = 0.05  # s between one client's lines in a round
CHATTER_INTERVAL = 0.25  # s between one client's lines while the daemon is being killed
CHATTER_LEAD = 0.6  # s of chatter before the kill
CLIENT_TIMEOUT = 5.0  # s: connect, join, one send, close
DELIVERY_TIMEOUT = 15.0  # s for the lines of a round to reach every client
DISCONNECT_TIMEOUT = 5.0  # s for the killed daemon's client to notice
SETTLE_TIME = 0.5  # s after the membership change before the next round
CLEANUP_TIMEOUT = 15.0  # s for every client to close

Line = tuple[str, str]  # one chat line: (sender "alice@D1", text)


def _member_names(event: dict[str, object]) -> tuple[str, ...]:
    names = event.get("names", ())
    return tuple(str(n) for n in names) if isinstance(names, list) else ()


def _last_view(daemon: DaemonProcess) -> tuple[str, ...] | None:
    agreed = daemon.named("view_agreed")
    return _member_names(agreed[-1]) if agreed else None


def _agreed_on(daemon: DaemonProcess, names: set[str]) -> bool:
    view = _last_view(daemon)
    return view is not None and set(view) == names


def _probe_table(cluster: LocalCluster, since: dict[str, int], out: TextIO) -> None:
    """Per receiver: probes received in this phase, mean hops and latency per source."""
    for name, daemon in cluster.daemons.items():
        probes = daemon.named("probe_received")[since[name] :]
        if daemon.process.returncode is not None or not probes:
            continue
        by_source: dict[str, list[dict[str, object]]] = {}
        for probe in probes:
            by_source.setdefault(str(probe["source_name"]), []).append(probe)
        cells = []
        for source in sorted(by_source):
            got = by_source[source]
            hops = statistics.fmean(float(p["hops"]) for p in got)  # type: ignore[arg-type]
            latency = statistics.median(float(p["latency_ms"]) for p in got)  # type: ignore[arg-type]
            cells.append(f"{source}:{len(got)}x {hops:.0f}hop {latency:.0f}ms")
        print(f"  {name} heard  " + "  ".join(cells), file=out)


def _marks(cluster: LocalCluster) -> dict[str, int]:
    return {name: len(d.named("probe_received")) for name, d in cluster.daemons.items()}


def _label(private_name: str) -> str:
    """``#alice#D1`` as ``alice@D1``."""
    try:
        client, daemon = split_private_name(private_name)
    except ValueError:
        return private_name
    return f"{client}@{daemon}"


def _labels(members: Sequence[str]) -> list[str]:
    return [_label(m) for m in members]


def _consistent(a: Sequence[Line], b: Sequence[Line]) -> bool:
    """Do `a` and `b` deliver the lines they have in common in the same order?"""
    common = set(a) & set(b)
    return [x for x in a if x in common] == [x for x in b if x in common]


@contextlib.contextmanager
def runtime_dir(path: str) -> Iterator[None]:
    """Daemons started inside put their client sockets in `path`/meshcast/<name>@<cluster>.sock.

    The daemon's default socket path is $XDG_RUNTIME_DIR/meshcast/<name>@<cluster>.sock; pointing
    XDG_RUNTIME_DIR at a private temporary directory while the processes start keeps the
    demo's sockets apart from any other daemon on this machine.
    """
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = old


# ---------------------------------------------------------------------- chat clients


@dataclass
class ChatUser:
    """One chat client: its session with one daemon and everything it saw."""

    name: str
    daemon: str
    site: str
    client: Client | None = None
    received: list[Line] = field(default_factory=list)  # in delivery order
    views: list[Membership] = field(default_factory=list)  # membership events, in order
    sent: list[str] = field(default_factory=list)  # texts handed to the daemon
    rejected: int = 0  # sends the daemon refused
    failure: str | None = None  # why the session ended, if not by us
    closed: bool = False  # we closed it (GOODBYE)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.daemon}"

    @property
    def members(self) -> list[str]:
        """The members of the group as this client saw them last."""
        return _labels(self.views[-1].members) if self.views else []


class Chat:
    """The demo's chat clients; owns their sessions and reader tasks (closed in `aclose`)."""

    def __init__(self, users: list[ChatUser]) -> None:
        self.users = users
        self._activity = asyncio.Event()  # something was received or a session ended
        self._readers: list[asyncio.Task[None]] = []

    async def connect(self, user: ChatUser, address: str) -> None:
        """Open `user`'s session (raises `ClientError` / `UsageError`)."""
        user.client = await connect(address, name=user.name, timeout=CLIENT_TIMEOUT)
        self._readers.append(
            asyncio.get_running_loop().create_task(
                self._read(user, user.client), name=f"demo reader {user.label}"
            )
        )

    async def _read(self, user: ChatUser, client: Client) -> None:
        while True:
            try:
                event = await client.receive()
            except RequestRejected:
                user.rejected += 1
                continue
            except UsageError:  # we closed the client
                return
            except ClientError as exc:
                user.failure = str(exc)
                self._activity.set()
                return
            if isinstance(event, Message):
                user.received.append(
                    (_label(event.sender), event.payload.decode("utf-8", "replace"))
                )
            elif isinstance(event, Membership):
                user.views.append(event)
            self._activity.set()

    async def send(self, user: ChatUser, text: str) -> bool:
        """Multicast one line to the group with AGREED service; False if it was not sent."""
        if user.client is None or user.failure is not None:
            return False
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                await user.client.multicast(GROUP, text.encode(), service=ServiceLevel.AGREED)
        except RequestRejected:
            user.rejected += 1
            return False
        except TimeoutError:
            user.failure = user.failure or f"sending blocked for more than {CLIENT_TIMEOUT:g} s"
            return False
        except (ClientError, UsageError) as exc:
            user.failure = user.failure or str(exc)
            return False
        user.sent.append(text)
        return True

    async def wait_until(
        self,
        condition: Callable[[], bool],
        timeout: float,  # noqa: ASYNC109 - bounded wait
    ) -> bool:
        """Wait until `condition()` holds (checked after each event), at most `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self._activity.clear()
                    await self._activity.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Close every session still open (GOODBYE, bounded) and stop the readers."""
        users = [u for u in self.users if u.client is not None and not u.closed]
        for user in users:
            user.closed = True

        async def close(user: ChatUser) -> None:
            assert user.client is not None
            try:
                await user.client.close()
            except ClientError as exc:
                user.failure = user.failure or f"while closing: {exc}"

        try:
            async with asyncio.timeout(CLEANUP_TIMEOUT):
                await asyncio.gather(*(close(u) for u in users), return_exceptions=True)
        except TimeoutError:
            pass  # each close() is bounded itself; this only guards the whole
        finally:
            for reader in self._readers:
                reader.cancel()
            await asyncio.gather(*self._readers, return_exceptions=True)


# ---------------------------------------------------------------------- the demo


@dataclass
class _Checks:
    failures: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)  # one line per check that held

    @property
    def ok(self) -> bool:
        return not self.failures


class _Demo:
    def __init__(
        self, config: ClusterConfig, victim: str, say: Callable[[str], None], out: TextIO
    ) -> None:
        self.config = config
        self.out = out
        self.names = [d.name for d in config.daemons]
        self.victim = victim
        self.say = say
        self.checks = _Checks()
        self.users = [
            ChatUser(USER_NAMES[i] if i < len(USER_NAMES) else f"user{i + 1}", spec.name, spec.site)
            for i, spec in enumerate(config.daemons)
        ]
        self.chat = Chat(self.users)
        self.views_before: tuple[str, ...] = ()
        self.views_after: list[tuple[str, ...]] = []
        self.change_seen: list[str] = []  # summary lines of the membership change
        self.kill_notes: list[str] = []  # summary lines about the lines around the kill
        self.socket_dir = ""
        self.killed = False  # the victim was sent SIGKILL
        self.cluster: LocalCluster | None = None
        self.codes: dict[str, int | None] = {}  # exit status of each daemon, once stopped

    def fail(self, reason: str) -> None:
        self.say(f"FAILED: {reason}")
        self.checks.failures.append(reason)

    @property
    def victim_user(self) -> ChatUser:
        return next(u for u in self.users if u.daemon == self.victim)

    @property
    def live_users(self) -> list[ChatUser]:
        return [u for u in self.users if u.daemon != self.victim]

    # ------------------------------------------------------------------ the whole run

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            self.socket_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="mc-demo-"))
            cluster = LocalCluster(self.config, probe_interval=PROBE_INTERVAL)
            # Registered before starting, so that daemons started before a failure (or a
            # Ctrl-C) in the middle of the start are stopped too.
            stack.push_async_exit(cluster.__aexit__)
            with runtime_dir(self.socket_dir):
                await cluster.__aenter__()
            self.cluster = cluster
            try:
                await self._scenario(cluster)
            finally:
                await self.chat.aclose()
                self.codes = await cluster.stop_all()

    async def _scenario(self, cluster: LocalCluster) -> None:
        say = self.say
        everyone = set(self.names)
        say(f"\nstarting {len(self.names)} daemon processes ...")
        if not await cluster.wait_for(
            lambda: all(_agreed_on(d, everyone) for d in cluster.daemons.values()), START_TIMEOUT
        ):
            self.fail("the daemons did not agree on one view in time")
            for daemon in cluster.daemons.values():
                say(f"  {daemon.name}: last events {daemon.events[-3:]}")
            return
        view = cluster.daemons[self.names[0]].named("view_agreed")[-1]
        self.views_before = _member_names(view)
        say(
            f"all {len(self.names)} daemons agree on view {view['digest']} "
            f"with members {', '.join(self.views_before)}"
        )
        tree = cluster.daemons[self.names[0]].named("view_installed")[-1]["tree"]
        if isinstance(tree, dict):
            ids = {d.node_id: d.name for d in self.config.daemons}
            edges = ", ".join(f"{ids.get(p, p)}->{ids.get(c, c)}" for p, c in tree["edges"])
            say(f"{self.names[0]}'s source tree: {edges} (rate {tree['rate_bps'] / 1e6:g} Mbit/s)")

        marks = _marks(cluster)
        await cluster.wait_for(lambda: False, WATCH_TIME)
        say(
            f"\nprobes over {WATCH_TIME:g} s (each daemon multicasts one every "
            f"{PROBE_INTERVAL:g} s to all others; hops = overlay links crossed):"
        )
        _probe_table(cluster, marks, self.out)

        if not await self._join(cluster):
            return
        if not await self._round("round 1", self.users, "hello #{i} from {site}"):
            return
        if not await self._kill(cluster):
            return
        groups = self._components()
        if groups is None:
            return
        if not await self._round(
            "round 2, the survivors", self.live_users, "still here #{i} ({site})", groups
        ):
            return
        self._check_whole_run()

        marks = _marks(cluster)
        await cluster.wait_for(lambda: False, WATCH_TIME)
        say(f"\nprobes over the next {WATCH_TIME:g} s, routed around {self.victim}:")
        _probe_table(cluster, marks, self.out)

    # ------------------------------------------------------------------ phases

    async def _join(self, cluster: LocalCluster) -> bool:
        say = self.say
        addresses: dict[str, str] = {}
        for name, daemon in cluster.daemons.items():
            listening = daemon.named("clients_listening")
            path = listening[-1].get("unix_path") if listening else None
            if not path:
                self.fail(f"daemon {name} does not listen on a client socket: {daemon.events[-3:]}")
                return False
            addresses[name] = f"unix:{path}"
        say(
            f"\nchat: one client per daemon joins group {GROUP!r} over the daemon's "
            f"Unix socket (in {self.socket_dir}):"
        )
        width = max(len(u.label) for u in self.users)
        for user in self.users:
            try:
                await self.chat.connect(user, addresses[user.daemon])
                assert user.client is not None
                view = await user.client.join(GROUP)
            except ClientError as exc:
                self.fail(f"{user.label} could not connect and join: {exc}")
                return False
            say(f"  {user.label:<{width}} joined   {GROUP} = {', '.join(_labels(view.members))}")
        everyone = {u.label for u in self.users}
        if not await self.chat.wait_until(
            lambda: all(set(u.members) == everyone for u in self.users), DELIVERY_TIMEOUT
        ):
            late = [u.label for u in self.users if set(u.members) != everyone]
            self.fail(f"not every client saw all {len(everyone)} members: {', '.join(late)}")
            return False
        say(f"every client sees the {len(everyone)} members")
        return True

    async def _round(
        self,
        title: str,
        senders: list[ChatUser],
        template: str,
        groups: list[list[ChatUser]] | None = None,
    ) -> bool:
        """Every sender sends its lines at once; each group of clients (default: all)
        must deliver exactly its own senders' lines, all of them, in one order."""
        say = self.say
        groups = groups if groups is not None else [senders]
        say(
            f"\n{title}: {len(senders)} clients each send {LINES_PER_ROUND} lines "
            "at the same time, service AGREED ..."
        )
        lines: dict[str, list[Line]] = {u.label: [] for u in senders}

        async def talk(user: ChatUser) -> None:
            for i in range(1, LINES_PER_ROUND + 1):
                text = template.format(i=i, site=user.site, name=user.name)
                if await self.chat.send(user, text):
                    lines[user.label].append((user.label, text))
                await asyncio.sleep(LINE_INTERVAL)

        async with asyncio.TaskGroup() as tasks:
            for user in senders:
                tasks.create_task(talk(user))
        short = [u.label for u in senders if len(lines[u.label]) < LINES_PER_ROUND]
        if short:
            self.fail(f"{title}: could not send every line of {', '.join(short)}")
            return False

        expected = [{x for member in group for x in lines[member.label]} for group in groups]

        def delivered() -> bool:
            return all(
                want <= set(user.received)
                for group, want in zip(groups, expected, strict=True)
                for user in group
            )

        if not await self.chat.wait_until(delivered, DELIVERY_TIMEOUT):
            for group, want in zip(groups, expected, strict=True):
                for user in group:
                    got = len(want & set(user.received))
                    if got < len(want):
                        say(f"  {user.label} delivered {got} of {len(want)} lines")
            self.fail(f"{title}: not every line reached every client in time")
            return False
        sent = {x for xs in lines.values() for x in xs}
        largest = max(len(group) for group in groups)
        for group, want in zip(groups, expected, strict=True):
            sequences = [[x for x in u.received if x in sent] for u in group]
            who = ", ".join(u.label for u in group)
            if any(s != sequences[0] for s in sequences) or set(sequences[0]) != want:
                for user, seq in zip(group, sequences, strict=True):
                    say(f"  {user.label}: " + " | ".join(f"{s}: {t}" for s, t in seq))
                self.fail(f"{title}: {who} did not deliver their lines in one order")
                return False
            if len(group) == largest:
                width = max(len(s) for s, _ in sequences[0])
                whom = "every client" if len(groups) == 1 else who
                say(f"  the agreed order, as {whom} delivered it:")
                for index, (sender, text) in enumerate(sequences[0], 1):
                    say(f"    {index:>3}. {sender:<{width}}  {text}")
            verdict = f"{len(group)}/{len(group)} clients saw the same order ({len(want)} messages)"
            if len(groups) > 1:
                verdict += f": {who}"
            say(verdict)
            self.checks.results.append(f"{title}: {verdict}")
        return True

    async def _kill(self, cluster: LocalCluster) -> bool:
        say = self.say
        victim_user = self.victim_user
        survivors = [n for n in self.names if n != self.victim]
        say(
            f"\nthe clients keep chatting (a line every {CHATTER_INTERVAL:g} s each); "
            f"killing {self.victim} with SIGKILL ..."
        )
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        chatter: dict[str, list[Line]] = {u.label: [] for u in self.users}

        async def keep_talking(user: ChatUser) -> None:
            count = 0
            while not stop.is_set() and user.failure is None:
                count += 1
                text = f"chatter #{count} from {user.site}"
                if await self.chat.send(user, text):
                    chatter[user.label].append((user.label, text))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), CHATTER_INTERVAL)

        before = {u.label: len(u.views) for u in self.users}
        group_views = {n: len(d.named("group_view")) for n, d in cluster.daemons.items()}
        gone = {victim_user.label}

        def told(user: ChatUser) -> bool:
            """Has `user` had a `network` change since the kill, and lost the victim's client?"""
            since = user.views[before[user.label] :]
            return any(v.cause == Cause.NETWORK for v in since) and not gone & set(user.members)

        def change_seen() -> bool:
            return all(told(u) for u in self.live_users)

        def settled() -> bool:
            views = [_last_view(cluster.daemons[n]) for n in survivors]
            return all(v is not None and self.victim not in v for v in views)

        async with asyncio.TaskGroup() as tasks:
            for user in self.users:
                tasks.create_task(keep_talking(user))
            try:
                await asyncio.sleep(CHATTER_LEAD)
                killed_at = loop.time()
                cluster.kill(self.victim)
                self.killed = True
                if await self.chat.wait_until(
                    lambda: victim_user.failure is not None, DISCONNECT_TIMEOUT
                ):
                    say(
                        f"  {victim_user.label} is disconnected after "
                        f"{loop.time() - killed_at:.2f} s: {victim_user.failure}"
                    )
                else:
                    self.fail(f"{victim_user.label} was not told its daemon is gone")
                if not await cluster.wait_for(settled, START_TIMEOUT):
                    self.fail(f"the survivors did not drop {self.victim} from their views in time")
                    return False
                say(
                    f"  the other daemons notice and agree on new views after "
                    f"{loop.time() - killed_at:.1f} s:"
                )
                self.views_after = sorted({_last_view(cluster.daemons[n]) or () for n in survivors})
                for view_names in self.views_after:
                    say(f"    new view: {', '.join(view_names)}")
                if len(self.views_after) > 1:
                    say(
                        "    (a partition: a daemon whose only way out was the victim is on its"
                        " own, and goes on alone until the network heals)"
                    )
                if not await self.chat.wait_until(change_seen, DELIVERY_TIMEOUT):
                    late = [u.label for u in self.live_users if not told(u)]
                    self.fail(f"no network membership change reached {', '.join(late)}")
                    return False
                await asyncio.sleep(SETTLE_TIME)
            finally:
                stop.set()
        self._show_change(before)
        self._count_chatter(cluster, chatter, group_views)
        return True

    def _show_change(self, before: dict[str, int]) -> None:
        """The membership events each surviving client got since the kill, grouped."""
        say = self.say
        say(f"  the surviving clients get a membership change of {GROUP!r}:")
        stories: dict[tuple[str, ...], list[str]] = {}
        for user in self.live_users:
            mark = before[user.label]
            previous = _labels(user.views[mark - 1].members) if mark else []
            story: list[str] = [f"{'before:':<14}{', '.join(previous)}"]
            for view in user.views[mark:]:
                now = _labels(view.members)
                if view.transitional:  # Spread's TRANSITION: who moves on together
                    story.append(f"{'transitional:':<14}{', '.join(now)}   (moving on together)")
                    continue
                left = [m for m in previous if m not in now]
                came = [m for m in now if m not in previous]
                delta = "; ".join(
                    part
                    for part in (
                        f"gone: {', '.join(left)}" if left else "",
                        f"new: {', '.join(came)}" if came else "",
                    )
                    if part
                )
                story.append(f"{view.cause.value + ':':<14}{', '.join(now)}   ({delta or 'same'})")
                previous = list(now)
            stories.setdefault(tuple(story), []).append(user.label)
        for told, who in stories.items():
            say(f"    seen by {', '.join(who)}:")
            for line in told:
                say(f"      {line}")
            self.change_seen.append(f"{', '.join(who)} saw {told[-1]}")

    def _count_chatter(
        self, cluster: LocalCluster, chatter: dict[str, list[Line]], marks: dict[str, int]
    ) -> None:
        """Lines sent around the kill: counted, not required (see the module docstring)."""
        everywhere = lost = partly = 0
        for user in self.live_users:
            peers = [u for u in self.live_users if set(u.members) == set(user.members)]
            for line in chatter[user.label]:
                seen = sum(line in u.received for u in peers)
                if seen == len(peers):
                    everywhere += 1
                elif seen == 0:
                    lost += 1
                else:
                    partly += 1
        victim_lines = chatter[self.victim_user.label]
        delivered = sum(any(x in u.received for u in self.live_users) for x in victim_lines)
        undelivered = 0  # messages the daemons gave up at the view change
        for name, daemon in cluster.daemons.items():
            if name != self.victim:
                for event in daemon.named("group_view")[marks[name] :]:
                    count = event.get("undelivered")
                    undelivered += count if isinstance(count, int) else 0
        sent = everywhere + lost + partly
        if lost or partly:
            fate = (
                f"{everywhere} delivered by every client of the sender's view, {lost} by none, "
                f"{partly} by some only"
            )
        else:
            fate = "each delivered by every client of the sender's view"
        note = (
            f"lines sent while {self.victim} died: {sent} by the survivors, {fate}; "
            f"{len(victim_lines)} by {self.victim_user.label}, {delivered} of them delivered"
        )
        self.say(f"  {note}")
        if lost or partly or undelivered:
            self.say(
                f"  (the daemons reported {undelivered} messages undelivered at the view change: "
                "lines in flight then may be lost until the group layer's virtual-synchrony "
                "flush is complete; the order checks cover what was delivered)"
            )
        self.kill_notes.append(note)

    def _components(self) -> list[list[ChatUser]] | None:
        """The surviving clients grouped by the membership they see; None if inconsistent."""
        groups: dict[frozenset[str], list[ChatUser]] = {}
        for user in self.live_users:
            groups.setdefault(frozenset(user.members), []).append(user)
        for members, group in groups.items():
            if members != {u.label for u in group}:
                self.fail(
                    f"{', '.join(u.label for u in group)} see members {', '.join(sorted(members))}, "
                    "which do not see the same membership"
                )
                return None
        return sorted(groups.values(), key=len, reverse=True)

    def _check_whole_run(self) -> None:
        """Any two clients deliver the lines they both delivered in the same order, once."""
        pairs = bad = 0
        for user in self.users:
            if len(set(user.received)) != len(user.received):
                self.fail(f"{user.label} delivered a line twice")
        for i, a in enumerate(self.users):
            for b in self.users[i + 1 :]:
                pairs += 1
                if not _consistent(a.received, b.received):
                    bad += 1
                    self.fail(f"{a.label} and {b.label} delivered common lines in different orders")
        if not bad:
            verdict = (
                f"whole run: all {pairs} pairs of clients delivered the lines they have in "
                "common in the same order, each once"
            )
            self.say(verdict)
            self.checks.results.append(verdict)


def demo_printer(stream: TextIO, *, colour: bool) -> Callable[[str], None]:
    """How the demo prints a line: with `colour` (a terminal), "ok"/"OK" in green and
    "FAILED" in red (rich), so a failure stands out in 80 lines; plain text otherwise."""
    if not colour:

        def plain(text: str = "") -> None:
            print(text, file=stream, flush=True)

        return plain
    from rich.console import Console
    from rich.text import Text

    console = Console(file=stream, force_terminal=True, highlight=False, soft_wrap=True)

    def coloured(text: str = "") -> None:
        line = Text(text)
        line.highlight_regex(r"\b(?:ok|OK)\b", "bold green")
        line.highlight_regex(r"\bFAILED\b", "bold red")
        console.print(line)
        stream.flush()

    return coloured


async def run_cluster_demo(
    config: ClusterConfig | None = None, *, victim: str | None = None, out: TextIO | None = None
) -> int:
    """Run the demo; 0 when every step behaved as described, 1 otherwise, 2 on bad usage."""
    stream = out if out is not None else sys.stdout
    config = config or default_config()
    names = [d.name for d in config.daemons]
    # The middle site's gateway by default: killing it reroutes the others and cuts off
    # the daemon behind it.
    victim = victim or names[len(names) // 2 - 1]
    if victim not in names:
        print(
            f"meshcast demo: error: --kill {victim}: no such daemon (known: {', '.join(names)})",
            file=sys.stderr,
        )
        return 2
    loop = asyncio.get_running_loop()
    started = loop.time()

    say = demo_printer(stream, colour=stream.isatty() and "NO_COLOR" not in os.environ)

    say(
        f"meshcast demo: cluster {config.name!r}, {len(names)} daemons in "
        f"{len(config.sites)} sites, routing {config.routing}"
    )
    for site in config.sites:
        members = [d for d in config.daemons if d.site == site.name]
        say(f"  site {site.name}: " + ", ".join(f"{d.name}@{d.host}" for d in members))
    for link in config.links:
        emulated = (
            f", emulated {link.emulation.delay * 1e3:.0f} ms one way"
            if link.emulation is not None
            else ""
        )
        say(
            f"  link {link.a}-{link.b}: weight {link.weight:g}, "
            f"{link.bandwidth_bps / 1e6:g} Mbit/s{emulated}"
        )
    demo = _Demo(config, victim, say, stream)
    # SIGTERM (kill, timeout(1), a closing session) stops the demo like Ctrl-C does, so
    # that its daemons are stopped too rather than left running.
    main = asyncio.current_task()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        if main is not None:
            main.cancel()

    handled = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, terminate)
        handled = True
    try:
        await demo.run()
    except asyncio.CancelledError:
        say("\ninterrupted: every client, daemon and socket the demo started is stopped")
        if terminated and main is not None and main.uncancel() == 0:
            return 1
        raise
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGTERM)
    _summary(demo, loop.time() - started)
    return 0 if demo.checks.ok else 1


def _summary(demo: _Demo, elapsed: float) -> None:
    say = demo.say
    codes = demo.codes
    daemons = demo.cluster.daemons if demo.cluster is not None else {}
    say(
        "\nstopped: "
        + ", ".join(f"{n} (pid {daemons[n].process.pid}) exit {c}" for n, c in codes.items())
    )
    unclean = [n for n, c in codes.items() if n != demo.victim and c != 0]
    if unclean:
        demo.fail(f"daemons {', '.join(unclean)} did not stop cleanly")
    killed = codes.get(demo.victim)
    if demo.killed and killed is not None and killed != -signal.SIGKILL:
        demo.fail(f"{demo.victim} exited {killed}, not by SIGKILL")

    for user in demo.live_users:
        if user.failure is not None:
            demo.fail(f"the session of {user.label} failed: {user.failure}")

    def row(title: str, lines: Sequence[str]) -> None:
        for i, line in enumerate(lines):
            say(f"  {title if i == 0 else '':<11} {line}")

    say("\nsummary")
    views = [f"before: {', '.join(demo.views_before) or '(none agreed)'}"]
    if demo.views_after:
        views.append(
            f"after the SIGKILL of {demo.victim}: "
            + "  |  ".join(", ".join(v) for v in demo.views_after)
        )
    row("views", views)
    width = max(len(u.label) for u in demo.users)
    clients = [f"{'':<{width}}  sent  delivered  session"]
    for user in demo.users:
        if user.client is None:
            session = "never connected"
        elif user.daemon == demo.victim and demo.killed and user.failure is not None:
            session = f"disconnected: {user.failure}"
        elif user.failure is not None:
            session = f"FAILED: {user.failure}"
        else:
            session = "closed cleanly"
        if user.rejected:
            session += f" ({user.rejected} sends rejected by the daemon)"
        clients.append(
            f"{user.label:<{width}}  {len(user.sent):>4}  {len(user.received):>9}  {session}"
        )
    row("clients", clients)
    row("order", [f"ok: {result}" for result in demo.checks.results] or ["(not checked)"])
    row("membership", demo.change_seen or ["(no change seen)"])
    row("the kill", demo.kill_notes or ["(not done)"])
    row("time", [f"{elapsed:.1f} s"])
    if demo.checks.ok:
        say(
            "result: OK: the cluster formed, the clients chatted in one agreed order, "
            f"survived the SIGKILL of {demo.victim} and everything stopped cleanly"
        )
    else:
        say(f"result: FAILED ({len(demo.checks.failures)} problem(s)):")
        for reason in demo.checks.failures:
            say(f"  - {reason}")
