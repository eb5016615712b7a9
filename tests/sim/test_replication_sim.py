"""Replication in the simulator of capped uplinks (`meshcast.sim.replication`): real
`Replicator` engines on every node, every chunk hashed and verified.

Every plan shape (strategy, variant, tree, capacity-aware) must bring every recipient a copy
that verifies against the manifest's digest, never faster than the lower bound of issue 12;
a seed reproduces a run exactly; download caps hold; a copy that fails its final check is
reported failed by the node and by the origin.
"""

from __future__ import annotations

import pytest

from meshcast.replicate.bound import lower_bound
from meshcast.replicate.engine import ReplicationRequest
from meshcast.replicate.plan import Strategy, Tree, Variant
from meshcast.sim.replication import ReplicationSim, SimOutcome, SyntheticFile

pytestmark = pytest.mark.timeout(120)

UPLOAD = 100e6  # bits/s
SIZE = 250_000  # bytes: 16 chunks of 16 KiB, the last one short
CHUNK = 16 * 1024
SLACK = 1e-9  # relative: float rounding only


def _run(
    uploads: list[float],
    request_args: dict[str, object] | None = None,
    *,
    downloads: list[float | None] | None = None,
    seed: int = 1,
    corrupt: tuple[int, ...] = (),
    record_progress: bool = False,
) -> tuple[ReplicationSim, SyntheticFile, SimOutcome]:
    sim = ReplicationSim(uploads, downloads=downloads, seed=seed, record_progress=record_progress)
    f = sim.add_file("f.bin", SIZE, CHUNK, seed=seed)
    for node in corrupt:
        sim.stores[node].corrupt.add(f.manifest.digest)
    request = ReplicationRequest("f.bin", tuple(sim.ids[1:]), **request_args or {})  # type: ignore[arg-type]
    outcome = sim.run_replication(request, until=600.0)
    return sim, f, outcome


def _assert_every_copy_verified(sim: ReplicationSim, f: SyntheticFile, outcome: SimOutcome) -> None:
    assert outcome.report is not None
    assert outcome.report.state == "complete", outcome.report
    assert {r.node for r in outcome.report.recipients} == set(sim.ids[1:])
    assert all(r.state == "complete" for r in outcome.report.recipients), outcome.report
    assert set(outcome.completed) == set(sim.ids[1:])
    for store in sim.stores[1:]:
        assert set(store.finalized) == {f.manifest.digest}
    assert f.manifest.digest not in sim.stores[0].finalized  # the origin only serves


def _assert_not_below_bound(
    outcome: SimOutcome, uploads: list[float], downloads: list[float] | None = None
) -> None:
    bound = lower_bound(SIZE, uploads[0], uploads[1:], downloads)
    assert outcome.last >= bound * (1 - SLACK), (outcome.last, bound)


FASTREPLICA_SHAPES = [
    pytest.param({"variant": variant, "tree": tree}, id=f"{variant.name}-{tree.value}")
    for variant in Variant
    for tree in Tree
]
BASELINES = [
    pytest.param({"strategy": Strategy.FANOUT}, id="fanout"),
    pytest.param({"strategy": Strategy.ALM_TREE}, id="alm_tree"),
]


@pytest.mark.parametrize("n", [1, 7, 40])
@pytest.mark.parametrize("shape", FASTREPLICA_SHAPES + BASELINES)
def test_every_recipient_gets_a_verified_copy_never_before_the_bound(
    n: int, shape: dict[str, object]
) -> None:
    uploads = [UPLOAD] * (n + 1)
    sim, f, outcome = _run(uploads, shape)
    _assert_every_copy_verified(sim, f, outcome)
    _assert_not_below_bound(outcome, uploads)


@pytest.mark.parametrize("aware", [False, True], ids=["patent", "capacity_aware"])
@pytest.mark.parametrize("variant", list(Variant), ids=lambda v: v.name)
def test_heterogeneous_uplinks_every_copy_verified(aware: bool, variant: Variant) -> None:
    uploads = [UPLOAD] + [(10e6, 25e6, 50e6, 100e6)[i % 4] for i in range(23)]
    sim, f, outcome = _run(uploads, {"capacity_aware": aware, "variant": variant})
    _assert_every_copy_verified(sim, f, outcome)
    _assert_not_below_bound(outcome, uploads)


def test_capacity_aware_beats_the_patent_plan_when_slow_nodes_would_hold_subfiles() -> None:
    # one group of 8 with a 5 Mbit/s node among 100 Mbit/s ones: in the patent plan the slow
    # node spreads 1/8 of the file; capacity-aware, its share shrinks in proportion
    uploads = [UPLOAD, 5e6, *([UPLOAD] * 7)]
    _, _, patent = _run(uploads, {})
    _, _, aware = _run(uploads, {"capacity_aware": True})
    assert aware.last < patent.last


def test_capacity_aware_balances_groups_of_mixed_uplinks() -> None:
    # 3 groups of 8 drawn from four uplink speeds: the patent's groups in the given order
    # put the four 10 Mbit/s nodes of the last group behind the rest; balanced groups and
    # shares in proportion to capacity use every uplink
    uploads = [UPLOAD, *([100e6] * 6 + [50e6] * 6 + [25e6] * 6 + [10e6] * 6)]
    _, _, patent = _run(uploads, {})
    _, _, aware = _run(uploads, {"capacity_aware": True})
    assert aware.last < 0.6 * patent.last


@pytest.mark.parametrize("shape", FASTREPLICA_SHAPES[:3] + BASELINES, ids=lambda s: str(s))
def test_a_seed_reproduces_the_run(shape: dict[str, object]) -> None:
    uploads = [UPLOAD] * 21
    _, _, first = _run(uploads, shape, seed=5)
    _, _, second = _run(uploads, shape, seed=5)
    assert first.completed == second.completed
    assert first.events == second.events
    assert first.bytes_sent == second.bytes_sent


@pytest.mark.parametrize(
    "shape", [{}, {"strategy": Strategy.FANOUT}], ids=["fastreplica", "fanout"]
)
def test_download_caps_hold(shape: dict[str, object]) -> None:
    n = 9
    uploads = [UPLOAD] * (n + 1)
    caps = [20e6 if i % 2 else 50e6 for i in range(n)]  # bits/s, below the uploads
    sim, f, outcome = _run(uploads, shape, downloads=[None, *caps], record_progress=True)
    _assert_every_copy_verified(sim, f, outcome)
    _assert_not_below_bound(outcome, uploads, caps)
    for store, cap in zip(sim.stores[1:], caps, strict=True):
        assert store.progress, "no chunk recorded"
        assert store.progress[-1][1] == SIZE
        for at, held in store.progress:
            # held bytes are payload only: never more than the ingress could have carried
            assert held <= cap / 8 * (at - outcome.started) * (1 + SLACK), (at, held, cap)


@pytest.mark.parametrize(
    "shape", [{}, {"strategy": Strategy.ALM_TREE}], ids=["fastreplica", "alm_tree"]
)
def test_a_copy_failing_its_final_check_is_reported_failed(shape: dict[str, object]) -> None:
    uploads = [UPLOAD] * 10
    bad = 3  # node index: a recipient that also forwards
    sim, f, outcome = _run(uploads, shape, corrupt=(bad,))
    bad_node = sim.ids[bad]
    assert f.manifest.digest not in sim.stores[bad].finalized
    assert bad_node not in outcome.completed
    report = outcome.report
    assert report is not None
    assert report.state == "failed"
    states = {r.node: r.state for r in report.recipients}
    assert states.pop(bad_node) == "failed"
    assert set(states.values()) == {"complete"}
    for i, store in enumerate(sim.stores[1:], start=1):
        if i != bad:
            assert set(store.finalized) == {f.manifest.digest}
    assert sim.engines[bad].statistics().copies_failed == 1
