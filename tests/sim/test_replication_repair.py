"""Repair of every failure case of the patent (seed 002 [0071]-[0098]) in the simulator:
real `Replicator` engines, every chunk hashed and verified, nodes crashed as by SIGKILL.

The layout: node 0 the origin, nodes 1-12 the recipients, node 13 the origin's buddy (a
daemon that has the file, named in the request); max_connections 5 with K1 gives k = 4 and a
chain of three groups (1-4), (5-8), (9-12), node j of a group holding subfile j. Each case
fails a node at several moments (fractions of the time the same replication takes without
failure, measured by a first run) and with two failure detectors: a quick one (the view
loses the node a quarter of the transfer later) and one slower than the whole transfer (the
repair then starts from the streams the crash broke).

Each run checks that every surviving recipient finalized a verified copy, that the origin's
final report names exactly the failed recipients as not complete, and that once the linger
time has passed no live engine keeps a transfer.
"""

from __future__ import annotations

import functools

import pytest

from meshcast.replicate.engine import ReplicationRequest, ReplicatorConfig
from meshcast.replicate.plan import Plan, PlanSpec, Tree, Variant, make_plan
from meshcast.sim.replication import ReplicationSim, SimOutcome, SyntheticFile

pytestmark = pytest.mark.timeout(300)

N = 12  # recipients 1..N
BUDDY = N + 1
UPLOAD = 100e6  # bits/s
CHUNK = 16 * 1024
SIZE = 64 * CHUNK - 1000  # 64 chunks, the last one short
GIVE_UP = 5.0  # s: give_up_after, also how long a copy lingers without DONE
MOMENTS = [0.1, 0.3, 0.6, 0.9]  # of the replication's time without failure
DETECT = {"quick-view": 0.25, "broken-streams": 50.0}  # detection delay / that time


def _sim(detect: float = 1.0) -> tuple[ReplicationSim, SyntheticFile]:
    sim = ReplicationSim(
        [UPLOAD] * (N + 2), seed=3, config=ReplicatorConfig(give_up_after=GIVE_UP), detect=detect
    )
    return sim, sim.add_file("f.bin", SIZE, CHUNK, seed=5)


def _request(
    sim: ReplicationSim,
    *,
    buddy: bool,
    max_connections: int = 5,
    variant: Variant = Variant.K1,
    tree: Tree = Tree.CHAIN,
) -> ReplicationRequest:
    return ReplicationRequest(
        "f.bin",
        tuple(sim.ids[1 : N + 1]),
        max_connections=max_connections,
        variant=variant,
        tree=tree,
        buddy=sim.ids[BUDDY] if buddy else None,
    )


@functools.cache
def _duration(max_connections: int, variant: Variant, tree: Tree) -> float:
    """The replication's completion time without failure (a first run)."""
    sim, f = _sim()
    request = _request(sim, buddy=True, max_connections=max_connections, variant=variant, tree=tree)
    outcome = sim.run_replication(request, until=100.0)
    assert outcome.report is not None
    assert outcome.report.state == "complete"
    assert all(sim.holds_copy(i, f.manifest.digest) for i in range(1, N + 1))
    return outcome.last


def _run(
    crashes: dict[int, float],
    *,
    detect: str = "quick-view",
    buddy: bool = True,
    max_connections: int = 5,
    variant: Variant = Variant.K1,
    tree: Tree = Tree.CHAIN,
    restarts: dict[int, float] | None = None,
) -> tuple[ReplicationSim, SyntheticFile, SimOutcome]:
    """Crash each node of `crashes` at that fraction of the time without failure (and
    restart those of `restarts`), run the replication to its end, then past the linger
    time."""
    took = _duration(max_connections, variant, tree)
    sim, f = _sim(detect=DETECT[detect] * took)
    for node, moment in crashes.items():
        sim.crash(node, moment * took)
    for node, moment in (restarts or {}).items():
        sim.restart(node, moment * took)
    request = _request(
        sim, buddy=buddy, max_connections=max_connections, variant=variant, tree=tree
    )
    outcome = sim.run_replication(request, until=200.0)
    sim.run(until=sim.now + 2 * GIVE_UP + 1.0)
    return sim, f, outcome


def _assert_survivors_hold_it(
    sim: ReplicationSim, f: SyntheticFile, outcome: SimOutcome, failed: set[int]
) -> None:
    """Every live recipient has the verified file; the origin's final report names exactly
    the failed recipients as not complete; no live engine keeps a transfer."""
    digest = f.manifest.digest
    survivors = [i for i in range(1, N + 1) if i not in failed]
    assert [i for i in survivors if not sim.holds_copy(i, digest)] == []
    # a failed recipient counts as complete only if it finalized its copy before it died
    unfinished = {i for i in failed if 1 <= i <= N and not sim.holds_copy(i, digest)}
    if sim.alive[0]:
        report = outcome.report
        assert report is not None
        not_complete = {int(r.node) - 1 for r in report.recipients if r.state != "complete"}
        assert not_complete == unfinished, report
        assert report.state == ("failed" if not_complete else "complete")
    _assert_no_transfer_left(sim)


def _assert_no_transfer_left(sim: ReplicationSim) -> None:
    left = {i: e.statistics().transfers for i, e in enumerate(sim.engines) if sim.alive[i]}
    assert all(count == 0 for count in left.values()), left


@pytest.fixture(params=list(DETECT))
def detect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---------------------------------------------------------------- an initial node


@pytest.mark.parametrize("buddy", [True, False], ids=["buddy", "no-buddy"])
@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("node", [1, 3])
def test_initial_node_fails(node: int, moment: float, buddy: bool, detect: str) -> None:
    """FIGURES 9-10C: a node of the first group fails while the origin distributes its
    subfile to it, while it collects (sends its subfile to its group), or while it sends
    it down to the next group; the buddy (or the origin without one) sends that subfile
    to its group and to its child."""
    sim, f, outcome = _run({node: moment}, detect=detect, buddy=buddy)
    _assert_survivors_hold_it(sim, f, outcome, {node})


def test_initial_node_repair_comes_from_the_buddy() -> None:
    """With a buddy the origin sends no more than the distribution: the failed node's
    subfile is sent again by the buddy."""
    sim, f, outcome = _run({1: 0.3}, buddy=True)
    _assert_survivors_hold_it(sim, f, outcome, {1})
    assert sim.engines[BUDDY].statistics().repairs_opened > 0
    assert sim.engines[0].statistics().repairs_opened == 0


@pytest.mark.parametrize("moment", MOMENTS)
def test_two_initial_nodes_fail(moment: float, detect: str) -> None:
    sim, f, outcome = _run({1: moment, 4: moment + 0.05}, detect=detect)
    _assert_survivors_hold_it(sim, f, outcome, {1, 4})


# ---------------------------------------------------------------- a subsequent node


@pytest.mark.parametrize("buddy", [True, False], ids=["buddy", "no-buddy"])
@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("node", [6, 11])
def test_subsequent_node_fails(node: int, moment: float, buddy: bool, detect: str) -> None:
    """FIGURE 11B: a node of a later group fails; the parent group shares its load towards
    its group, its own sender feeds its child."""
    sim, f, outcome = _run({node: moment}, detect=detect, buddy=buddy)
    _assert_survivors_hold_it(sim, f, outcome, {node})


def test_subsequent_node_repair_is_shared_by_the_parent_group() -> None:
    """Node 6 fails early: the first group's nodes (not the origin or the buddy) send its
    subfile in its place."""
    sim, f, outcome = _run({6: 0.1}, detect="broken-streams")
    _assert_survivors_hold_it(sim, f, outcome, {6})
    sharers = [i for i in range(1, 5) if sim.engines[i].statistics().repairs_opened]
    assert len(sharers) >= 2, sharers
    assert sim.engines[0].statistics().repairs_opened == 0
    assert sim.engines[BUDDY].statistics().repairs_opened == 0


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_node_and_its_replacement_fail(moment: float, detect: str) -> None:
    """Node 6 and node 2 (its sender, which replaces it towards node 10) both fail."""
    sim, f, outcome = _run({6: moment, 2: moment + 0.1}, detect=detect)
    _assert_survivors_hold_it(sim, f, outcome, {2, 6})


# ---------------------------------------------------------------- secondary trees


@pytest.mark.parametrize("buddy", [True, False], ids=["buddy", "no-buddy"])
@pytest.mark.parametrize("moment", MOMENTS)
def test_initial_node_feeding_secondary_trees_fails(
    moment: float, buddy: bool, detect: str
) -> None:
    """[0093]-[0096]: variant K, the first group feeds groups 2 and 3 only once it holds
    its subfiles; node 1 fails and the buddy (or the origin) feeds them in its place."""
    sim, f, outcome = _run(
        {1: moment}, detect=detect, buddy=buddy, max_connections=4, variant=Variant.K
    )
    _assert_survivors_hold_it(sim, f, outcome, {1})


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("node", [2, 6])
def test_node_feeding_a_balanced_secondary_tree_fails(
    node: int, moment: float, detect: str
) -> None:
    """Tree.BALANCED: groups 1 -> 2 in the primary tree, group 3 a secondary tree fed by
    group 1 after complete; node 2 (initial, feeding both) or node 6 fails."""
    sim, f, outcome = _run({node: moment}, detect=detect, tree=Tree.BALANCED)
    _assert_survivors_hold_it(sim, f, outcome, {node})


# ---------------------------------------------------------------- the buddy, the origin


@pytest.mark.parametrize("moment", MOMENTS)
def test_buddy_fails(moment: float, detect: str) -> None:
    """The buddy dies: nothing to repair, every recipient completes."""
    sim, f, outcome = _run({BUDDY: moment}, detect=detect)
    _assert_survivors_hold_it(sim, f, outcome, set())


@pytest.mark.parametrize("moment", MOMENTS)
def test_buddy_and_an_initial_node_fail(moment: float, detect: str) -> None:
    """The buddy dies, then a node of the first group: the origin repairs itself."""
    sim, f, outcome = _run({BUDDY: moment, 2: moment + 0.05}, detect=detect)
    _assert_survivors_hold_it(sim, f, outcome, {BUDDY, 2})


@pytest.mark.parametrize("moment", MOMENTS)
def test_origin_fails_with_a_buddy(moment: float, detect: str) -> None:
    """[0081]: the origin dies; its buddy sends what it was sending and every recipient
    completes (there is no final report: its author is dead)."""
    sim, f, outcome = _run({0: moment}, detect=detect)
    _assert_survivors_hold_it(sim, f, outcome, {0})
    assert all(sim.engines[i].statistics().copies_completed == 1 for i in range(1, N + 1))


@pytest.mark.parametrize("moment", MOMENTS)
def test_origin_fails_with_a_buddy_and_a_recipient_fails(moment: float, detect: str) -> None:
    sim, f, outcome = _run({0: moment, 7: moment + 0.05}, detect=detect)
    _assert_survivors_hold_it(sim, f, outcome, {0, 7})


@pytest.mark.parametrize("moment", MOMENTS)
def test_origin_fails_without_a_buddy(moment: float, detect: str) -> None:
    """No one else has the file: every copy ends either complete and verified or failed
    (not finalized, its verified chunks kept for a later replication to resume from), and
    once the linger time has passed no node keeps a transfer."""
    sim, f, _ = _run({0: moment}, detect=detect, buddy=False)
    digest = f.manifest.digest
    for i in range(1, N + 1):
        stats = sim.engines[i].statistics()
        if sim.holds_copy(i, digest):
            assert (stats.copies_completed, stats.copies_failed) == (1, 0)
        else:
            assert (stats.copies_completed, stats.copies_failed) == (0, 1)
            held = sim.stores[i].begin(f.manifest, None)
            assert len(held) < f.manifest.chunk_count
    _assert_no_transfer_left(sim)


def test_origin_fails_without_a_buddy_then_a_new_replication_resumes() -> None:
    """After the origin died mid-way (every copy failed, partial), the origin restarts and
    replicates the same file again: every copy completes, and the chunks the recipients
    already held are not sent again."""
    sim, f, _ = _run({0: 0.5}, buddy=False)
    digest = f.manifest.digest
    held = {i: len(sim.stores[i].begin(f.manifest, None)) for i in range(1, N + 1)}
    assert sum(held.values()) > 0
    assert not any(sim.holds_copy(i, digest) for i in range(1, N + 1))
    before = {i: sim.engines[i].statistics().chunks_received for i in range(1, N + 1)}
    sim.restart(0, sim.now)
    sim.run(until=sim.now + 2 * sim.detect)  # the origin is back in everyone's view
    outcome = sim.run_replication(_request(sim, buddy=False), until=sim.now + 100.0)
    assert outcome.report is not None
    assert outcome.report.state == "complete", outcome.report
    count = f.manifest.chunk_count
    for i in range(1, N + 1):
        assert sim.holds_copy(i, digest)
        stats = sim.engines[i].statistics()
        fresh = stats.chunks_received - stats.chunks_duplicate - before[i]
        assert fresh <= count - held[i], (i, fresh, held[i])


# ---------------------------------------------------------------- restart


@pytest.mark.parametrize("moment", [0.1, 0.3, 0.6, 0.85])
@pytest.mark.parametrize("node", [2, 6, 10, 12])
def test_restarted_recipient_resumes(node: int, moment: float) -> None:
    """A recipient crashes and restarts a little later with the chunks its store verified;
    the view loses it and has it back before the others finish: it completes, receiving
    only what it lacked, and the report names no one as incomplete. (Late in the transfer
    every feed to it may have ended before the crash, its tail lost in flight: its senders
    open them again when it is back.)"""
    took = _duration(5, Variant.K1, Tree.CHAIN)
    sim, f = _sim(detect=0.05 * took)
    sim.crash(node, moment * took)
    sim.restart(node, (moment + 0.05) * took)
    rid = sim.replicate(_request(sim, buddy=True))
    sim.run(until=moment * took + 1e-9)
    assert not sim.alive[node]
    held = len(sim.stores[node].begin(f.manifest, None))
    sim.run(until=200.0)
    assert rid in sim.finished
    outcome = SimOutcome(sim.reports.get(rid), dict(sim.completed), 0.0, {}, sim.events)
    sim.run(until=sim.now + 2 * GIVE_UP + 1.0)
    _assert_survivors_hold_it(sim, f, outcome, set())
    stats = sim.engines[node].statistics()  # the engine of its second life
    assert stats.copies_completed == 1
    assert stats.chunks_received - stats.chunks_duplicate <= f.manifest.chunk_count - held
    if moment >= 0.3:
        assert held > 0


def test_recipient_back_after_the_end_completes_in_a_new_replication() -> None:
    """A recipient crashes and comes back only after the others finished: the report names
    it as not complete; replicating the same file again completes it without sending the
    chunks it kept."""
    took = _duration(5, Variant.K1, Tree.CHAIN)
    sim, f = _sim(detect=0.05 * took)
    sim.crash(7, 0.5 * took)
    sim.restart(7, 3 * took)
    outcome = sim.run_replication(_request(sim, buddy=True), until=200.0)
    assert outcome.report is not None
    assert [int(r.node) - 1 for r in outcome.report.recipients if r.state != "complete"] == [7]
    sim.run(until=sim.now + 2 * GIVE_UP + 1.0)
    _assert_survivors_hold_it(sim, f, outcome, {7})
    assert sim.alive[7]
    held = len(sim.stores[7].begin(f.manifest, None))
    assert 0 < held < f.manifest.chunk_count
    again = sim.run_replication(_request(sim, buddy=True), until=sim.now + 100.0)
    assert again.report is not None
    assert again.report.state == "complete", again.report
    assert sim.holds_copy(7, f.manifest.digest)
    stats = sim.engines[7].statistics()
    assert stats.chunks_received - stats.chunks_duplicate <= f.manifest.chunk_count - held


# ---------------------------------------------------------------- exact moments


def _plan(sim: ReplicationSim, f: SyntheticFile, *, buddy: bool) -> Plan:
    """The plan every node computes for `_request(sim, buddy=buddy)`."""
    return make_plan(
        PlanSpec(
            sim.ids[0],
            tuple(sim.ids[1 : N + 1]),
            f.manifest.chunk_count,
            max_connections=5,
            buddy=sim.ids[BUDDY] if buddy else None,
        )
    )


def _held_whole_subfile_at(node: int) -> float:
    """When `node` first held every chunk of the subfile it holds in its group (a run
    without failure)."""
    sim, f = _sim()
    plan = _plan(sim, f, buddy=True)
    first, end = plan.subfiles[plan.held(sim.ids[node])[0]]
    store = sim.stores[node]
    write = store.write
    when: list[float] = []

    def watched(digest: bytes, index: int, data: bytes | memoryview) -> None:
        write(digest, index, data)
        held = store.begin(f.manifest, None)
        if not when and all(c in held for c in range(first, end)):
            when.append(sim.now)

    store.write = watched  # type: ignore[method-assign]
    sim.run_replication(_request(sim, buddy=True), until=100.0)
    return when[0]


@pytest.mark.parametrize("buddy", [True, False], ids=["buddy", "no-buddy"])
@pytest.mark.parametrize("node", [3, 7])
def test_node_fails_right_after_receiving_its_subfile(node: int, buddy: bool) -> None:
    """FIGURE 10A (node 3, initial) and 11A (node 7, subsequent): the node dies just after
    it received its whole subfile, before it passed all of it on (its sender's feed ended
    cleanly, so only its group and child see it fail); the rest of its group and its
    child still get that subfile."""
    at = _held_whole_subfile_at(node) + 1e-6
    took = _duration(5, Variant.K1, Tree.CHAIN)
    sim, f = _sim(detect=0.25 * took)
    sim.crash(node, at)
    rid = sim.replicate(_request(sim, buddy=buddy))
    sim.run(until=at)
    plan = _plan(sim, f, buddy=buddy)
    first, end = plan.subfiles[plan.held(sim.ids[node])[0]]
    # it held its subfile; some of those it feeds did not yet
    assert set(range(first, end)) <= sim.stores[node].begin(f.manifest, None)
    fed = {int(feed.receiver) - 1 for feed in plan.feeds_from(sim.ids[node])}
    short = [i for i in fed if not set(range(first, end)) <= sim.stores[i].begin(f.manifest, None)]
    assert short
    sim.run(until=200.0)
    assert rid in sim.finished
    outcome = SimOutcome(sim.reports.get(rid), dict(sim.completed), 0.0, {}, sim.events)
    sim.run(until=sim.now + 2 * GIVE_UP + 1.0)
    _assert_survivors_hold_it(sim, f, outcome, {node})
