"""PlanCalibration, plan_hops, with_extra_latency: what a requester learns from its own
completed requests (pure: fake times in, corrected cluster out)."""

from __future__ import annotations

import pytest

from meshci.cost.cluster import Cluster, Device, LinkSpec
from meshci.node.latency import PlanCalibration, plan_hops, with_extra_latency
from meshci.node.membership import Address, Advert, Peer, PeerStatus
from meshci.node.request import cluster_from_view
from meshci.planning.plan import BlockPlan, Plan, TileSpec
from meshci.trunk import Region


def _plan(blocks: list[list[str]], routing: str = "p2p", requester: str = "a") -> Plan:
    made = []
    for i, devices in enumerate(blocks):
        tiles = tuple(TileSpec(d, Region(k, k + 1, 0, 1)) for k, d in enumerate(devices))
        made.append(BlockPlan(i, i + 1, tiles, {d: 0.0 for d in devices}))
    return Plan("edgeci", "m", (3, 8, 8), requester, tuple(made), routing, 0.1, 0.0)


def test_a_plan_on_the_requester_alone_has_no_hop() -> None:
    assert plan_hops(_plan([["a"], ["a"], ["a"]])) == 0


def test_a_whole_trunk_on_one_other_device_is_two_hops() -> None:
    assert plan_hops(_plan([["d"], ["d"], ["d"]])) == 2


def test_p2p_hops_count_each_hand_over_and_each_halo_exchange() -> None:
    # in (a->a,b), halos a<->b, hand over to d, back to a
    assert plan_hops(_plan([["a", "b"], ["a", "b"], ["d"]])) == 4


def test_requester_routing_gathers_and_scatters_at_every_boundary() -> None:
    # scatter, gather (x3 blocks) = 6
    assert plan_hops(_plan([["a", "b"], ["a", "b"], ["b", "c"]], routing="requester")) == 6


A, B, D = frozenset("a"), frozenset("b"), frozenset("d")
TWO = frozenset(("a", "b"))


def _two_devices() -> Cluster:
    return Cluster((Device("a", 10.0, curves=(("m", ((0.01, 0.002), (0.02, 0.004))),)), Device("b", 20.0)),
                   LinkSpec(100.0, 4.0), {frozenset(("a", "b")): LinkSpec(50.0, 12.0)}, "switched", "a")


def test_one_device_plans_teach_that_device_its_compute_ratio() -> None:
    cal = PlanCalibration(alpha=0.5)
    assert cal.observe(D, 2, raw_predicted_s=0.200, scaled_predicted_s=0.200, measured_s=0.160) == ("ratio", pytest.approx(0.8))
    assert cal.compute_ratio == {"d": pytest.approx(0.8)}  # the first sample is taken whole
    cal.observe(D, 2, raw_predicted_s=0.200, scaled_predicted_s=0.160, measured_s=0.200)  # learned against raw
    assert cal.compute_ratio["d"] == pytest.approx(0.9)
    assert cal.hop_samples == 0 and cal.extra_latency_ms() == 0.0


def test_multi_device_plans_teach_the_per_hop_residual_against_the_scaled_prediction() -> None:
    cal = PlanCalibration(alpha=0.5)
    assert cal.observe(TWO, 4, raw_predicted_s=0.300, scaled_predicted_s=0.100, measured_s=0.140) == ("hop", pytest.approx(0.010))
    assert cal.extra_latency_ms() == pytest.approx(10.0)
    cal.observe(TWO, 2, raw_predicted_s=0.300, scaled_predicted_s=0.100, measured_s=0.140)  # 20 ms per hop
    assert cal.extra_latency_ms() == pytest.approx(15.0)
    assert cal.hop_samples == 2 and cal.compute_ratio == {}


def test_hopless_multi_device_and_non_finite_or_zero_times_teach_nothing() -> None:
    cal = PlanCalibration()
    assert cal.observe(TWO, 0, 0.1, 0.1, 0.5) is None
    assert cal.observe(D, 2, float("nan"), 0.1, 0.5) is None
    assert cal.observe(D, 2, 0.0, 0.1, 0.5) is None
    assert cal.hop_samples == 0 and cal.compute_ratio == {} and cal.extra_latency_ms() == 0.0


def test_apply_scales_learned_devices_and_shifts_every_link_never_below_zero() -> None:
    cal = PlanCalibration(alpha=1.0)
    cal.observe(A, 0, raw_predicted_s=0.200, scaled_predicted_s=0.200, measured_s=0.100)  # a: twice as fast
    cal.observe(TWO, 2, raw_predicted_s=0.300, scaled_predicted_s=0.300, measured_s=0.280)  # -10 ms per hop
    out = cal.apply(_two_devices())
    a, b = out.devices
    assert a.gflops == pytest.approx(20.0) and b == _two_devices().devices[1]  # b: no sample, unchanged
    assert a.curves == (("m", ((0.005, 0.001), (0.01, 0.002))),)
    assert out.default_link == LinkSpec(100.0, 0.0)
    link = out.links[frozenset(("a", "b"))]
    assert link.mbps == 50.0 and link.latency_ms == pytest.approx(2.0)
    assert cal.scaled(_two_devices()).links == _two_devices().links  # scaled: compute only


def test_a_fresh_calibration_changes_nothing() -> None:
    assert PlanCalibration().apply(_two_devices()) == _two_devices()


def test_alpha_must_be_a_weight() -> None:
    with pytest.raises(ValueError):
        PlanCalibration(alpha=0.0)


def test_with_extra_latency_shifts_the_default_link_and_each_measured_one() -> None:
    shifted = with_extra_latency(_two_devices(), 7.5)
    assert shifted.default_link == LinkSpec(100.0, 11.5)
    assert shifted.links[frozenset(("a", "b"))] == LinkSpec(50.0, 19.5)
    assert shifted.devices == _two_devices().devices


def test_an_advertised_backlog_drains_for_as_long_as_the_advert_is_old() -> None:
    def peer(name: str, backlog_s: float) -> Peer:
        return Peer(name, Address("127.0.0.1", 1), 0, PeerStatus.ALIVE, 0.0, Advert(gflops=8.0, backlog_s=backlog_s))

    peers = [peer("b", 0.300), peer("c", 0.100), peer("d", 0.200)]
    cluster = cluster_from_view("a", Advert(gflops=5.0, backlog_s=0.05), peers, LinkSpec(1000.0, 1.0),
                                advert_age_s={"b": 0.120, "c": 0.250})
    backlog = {d.name: d.backlog_s for d in cluster.devices}
    # b: 120 ms of its 300 ms drained; c: all of it; d: age unknown, as advertised; a: its own, now
    assert backlog == {"a": 0.05, "b": pytest.approx(0.180), "c": 0.0, "d": 0.200}


def test_each_strategy_learns_its_own_per_hop_residual() -> None:
    """A strategy with few hops that the model under-predicts must not charge one with many
    hops: each strategy plans with the residual learned from its own requests."""
    cal = PlanCalibration(alpha=1.0)
    cal.observe(TWO, 3, raw_predicted_s=0.3, scaled_predicted_s=0.3, measured_s=0.39, strategy="edgeci")
    cal.observe(TWO, 25, raw_predicted_s=0.9, scaled_predicted_s=0.9, measured_s=0.9, strategy="modnn")
    assert cal.extra_latency_ms("edgeci") == pytest.approx(30.0)
    assert cal.extra_latency_ms("modnn") == pytest.approx(0.0)
    assert cal.extra_latency_ms("aofl") == 0.0  # nothing learned of it yet
    base = _two_devices()
    assert cal.apply(base, "edgeci").default_link.latency_ms == pytest.approx(base.default_link.latency_ms + 30.0)
    assert cal.apply(base, "modnn").default_link == base.default_link
