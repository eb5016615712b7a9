"""LSA refresh (membership.lsa_refresh_interval): a daemon re-originates its LSA every
interval, so an LSA some daemon lost (e.g. dropped by a full link queue) comes back
without any change in the overlay, and the refresh installs no new view."""

from __future__ import annotations

from meshcast.ids import NodeId
from meshcast.sim.overlay import OverlayEdge
from tests.sim.overlay_invariants import OverlayHarness, check_views_converged

LINE = [OverlayEdge(1, 2), OverlayEdge(2, 3)]  # 3 learns 1's LSA only through 2's flooding


def held_seq(h: OverlayHarness, holder: int, origin: int) -> int | None:
    lsa = h.overlay(NodeId(holder))._lsdb.get(NodeId(origin))
    return None if lsa is None else lsa.seq


def lose_lsa(h: OverlayHarness, holder: int, origin: int) -> None:
    """What a dropped LSA leaves behind: `holder` lacks `origin`'s LSA (the harness can
    not make a reliable link drop one on cue, so the database entry is removed)."""
    h.overlay(NodeId(holder))._lsdb.forget({NodeId(origin)})
    assert held_seq(h, holder, origin) is None


def test_refresh_repairs_a_lost_lsa_without_a_view_change() -> None:
    h = OverlayHarness(LINE, seed=1, lsa_refresh_interval=1.0)
    h.run(0.9)
    check_views_converged(h)
    installed = h.view_change_times()
    lose_lsa(h, 3, 1)
    h.run(2.0)  # node 1's refresh (due 1 s after its last LSA) floods through 2 to 3
    assert held_seq(h, 3, 1) == held_seq(h, 1, 1)
    assert h.overlay(NodeId(1)).statistics().lsa_refreshes >= 1
    h.run(10.0)
    # one refresh a second per daemon, and still the same views
    assert all(8 <= h.overlay(NodeId(n)).statistics().lsa_refreshes <= 11 for n in (1, 2, 3))
    assert h.view_change_times() == installed
    check_views_converged(h)


def test_without_refresh_a_lost_lsa_stays_lost() -> None:
    h = OverlayHarness(LINE, seed=1)  # lsa_refresh_interval None: only on a change
    h.run(0.9)
    lose_lsa(h, 3, 1)
    h.run(10.0)
    assert held_seq(h, 3, 1) is None
    assert h.overlay(NodeId(1)).statistics().lsa_refreshes == 0
