"""A late OFFER of a replication a recipient is done with (simulator, hand-held clocks).

Every recipient already holds the file, so each completes as soon as its copy is open;
one opens its copy late (a resume re-hashing a partial file takes a while), so its feeds'
OFFERs reach recipients that have completed and forgotten the replication. They must be
answered (HAVE: everything), not joined again: a join opened the copy and every feed of
that node again, whose OFFERs made the others join again, and so on (hundreds of rounds).
"""

from __future__ import annotations

from functools import partial

from meshcast.replicate.engine import ReplicationRequest
from meshcast.replicate.manifest import Manifest
from meshcast.sim.replication import ReplicationSim

CHUNK_SIZE = 1024
SIZE = 40 * CHUNK_SIZE + 7
SLOW_BEGIN = 0.05  # s the last recipient takes to open its copy (the others: none)


class SlowLastBegin(ReplicationSim):
    """The last recipient opens its first copy `SLOW_BEGIN` s late; the nodes in `refuse`
    cannot open theirs (a full disk). `begins` counts each node's copies opened."""

    delayed = False
    refuse: frozenset[int] = frozenset()

    def _begin(self, i: int, rid: int, manifest: Manifest, dest: str | None, epoch: int) -> None:
        if i == len(self.ids) - 1 and not self.delayed:
            self.delayed = True
            self._at(self.now + SLOW_BEGIN, partial(self._begin, i, rid, manifest, dest, epoch))
            return
        self.begins[i] = self.begins.get(i, 0) + 1
        if i in self.refuse:
            self._input(i, lambda e: e.begun(rid, None, "no space left", self.now))
            return
        super()._begin(i, rid, manifest, dest, epoch)

    def hold_everywhere(self, size: int) -> None:
        """Every recipient holds the whole file already (an earlier replication)."""
        self.begins: dict[int, int] = {}
        f = self.add_file("f", size, CHUNK_SIZE, seed=len(self.ids))
        for store in self.stores[1:]:
            store.begin(f.manifest, None)
            for c in range(f.manifest.chunk_count):
                store.write(f.manifest.digest, c, f.chunk(c))


def settle(sim: ReplicationSim) -> None:
    """Run what is still under way after the final report, bounded (joining again and
    again never ends by itself)."""
    sim.run(until=sim.now + 60.0, max_events=sim.events + 200_000)


def test_a_done_copy_answers_a_late_offer_and_joins_no_more() -> None:
    n = 3
    sim = SlowLastBegin([8e6] * (n + 1), seed=n)
    sim.hold_everywhere(SIZE)
    request = ReplicationRequest("f", tuple(sim.ids[1:]), max_connections=4)
    outcome = sim.run_replication(request, until=60.0)
    settle(sim)
    assert sim.delayed
    assert outcome.report is not None
    assert outcome.report.state == "complete"
    for engine in sim.engines[1:]:
        stats = engine.statistics()
        assert stats.copies_completed == 1  # not once per late OFFER
        assert (stats.bytes_received, stats.bytes_sent) == (0, 0)
        assert stats.bytes_skipped == SIZE  # each chunk offered once, declined once
        assert (stats.malformed, stats.streams_failed) == (0, 0)
    assert sim.begins == {1: 1, 2: 1, 3: 1}
    for engine in sim.engines:
        assert (engine.statistics().transfers, engine.statistics().streams) == (0, 0)
        assert engine.next_deadline() is None


def test_a_failed_copy_refuses_a_late_offer() -> None:
    sim = SlowLastBegin([8e6] * 4, seed=1)
    sim.refuse = frozenset({1})
    sim.hold_everywhere(SIZE)
    request = ReplicationRequest("f", tuple(sim.ids[1:]), max_connections=4)
    outcome = sim.run_replication(request, until=60.0)
    settle(sim)
    assert sim.delayed
    report = outcome.report
    assert report is not None
    assert report.state == "failed"
    states = {r.node: (r.state, r.detail) for r in report.recipients}
    assert states[sim.ids[1]] == ("failed", "no space left")
    assert states[sim.ids[2]][0] == states[sim.ids[3]][0] == "complete"
    assert sim.begins == {1: 1, 2: 1, 3: 1}  # the late OFFER opened no second copy
    assert sim.engines[1].statistics().copies_failed == 1
    for engine in sim.engines:
        assert (engine.statistics().transfers, engine.statistics().streams) == (0, 0)
