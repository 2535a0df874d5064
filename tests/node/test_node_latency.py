"""BoundaryCosts: measured per-message delivery and per-tile handling (pure, no clock)."""

from __future__ import annotations

import pytest

from meshci.node.latency import BoundaryCosts


def test_no_delivery_sample_before_a_clock_offset_is_known() -> None:
    costs = BoundaryCosts()
    costs.observe_delivery("b", sent_wall=100.0, handled_wall=100.004)
    assert costs.delivery_s("b") is None
    assert costs.link_latency_ms("b", fallback_ms=1.5) == pytest.approx(1.5)


def test_delivery_uses_the_peer_clock_offset_from_the_smallest_rtt_echo() -> None:
    costs = BoundaryCosts(alpha=1.0)
    # the peer's clock runs 10 s ahead of ours; a noisy echo (large RTT) is ignored
    costs.observe_echo("b", rtt_s=0.050, peer_wall=1010.040, my_wall_now=1000.0)
    costs.observe_echo("b", rtt_s=0.002, peer_wall=1009.999, my_wall_now=1000.0)
    assert costs.clock_offset("b") == pytest.approx(10.0)
    # sent at peer time 1012.000 (= our 1002.000), handled at our 1002.003, 1 ms on the wire
    costs.observe_delivery("b", sent_wall=1012.000, handled_wall=1002.003, wire_s=0.001)
    assert costs.delivery_s("b") == pytest.approx(0.002)


def test_waiting_behind_own_compute_is_not_charged_to_the_link() -> None:
    costs = BoundaryCosts(alpha=1.0)
    costs.observe_echo("b", rtt_s=0.0, peer_wall=0.0, my_wall_now=0.0)
    # sent at 5.000 while this node's loop computed until 5.030; handled at 5.031
    costs.observe_delivery("b", sent_wall=5.000, handled_wall=5.031, loop_free_wall=5.030)
    assert costs.delivery_s("b") == pytest.approx(0.001)


def test_link_latency_is_the_delivery_and_damps_outliers() -> None:
    costs = BoundaryCosts(alpha=0.5)
    costs.observe_echo("b", rtt_s=0.0, peer_wall=0.0, my_wall_now=0.0)
    costs.observe_delivery("b", sent_wall=1.0, handled_wall=1.002)
    costs.observe_delivery("b", sent_wall=2.0, handled_wall=3.0)  # one stuck message
    assert costs.delivery_s("b") == pytest.approx(0.5 * 0.002 + 0.5 * (3 * 0.002 + 0.002))
    costs.observe_handling(0.001)  # the node's own per-tile cost: advertised apart (Advert.tile_ms)
    assert costs.link_latency_ms("b", fallback_ms=9.0) == pytest.approx(costs.delivery_s("b") * 1e3)
    assert costs.handling_s == pytest.approx(0.001)
    costs.forget("b")
    assert costs.peers() == []


def test_bad_alpha_is_refused() -> None:
    with pytest.raises(ValueError):
        BoundaryCosts(alpha=0.0)
