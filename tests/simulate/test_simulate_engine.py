"""The event-driven replay: exact on hand-checkable plans, contention, scale."""

from __future__ import annotations

import pytest

from meshci.cost import Cluster, CostModel, Device, LinkSpec, load_cluster, pi_cluster
from meshci.cost.geometry import BYTES_PER_VALUE
from meshci.planning import STRATEGIES, make_plan, plan_from_assignment
from meshci.simulate import simulate_plan
from meshci.trunk.region import Region


def two_helpers(medium: str) -> Cluster:
    devices = (Device("req", 1.0), Device("a", 4.0), Device("b", 4.0))
    return Cluster(devices, LinkSpec(50.0, 3.0), {}, medium, "req")


def test_local_plan_is_compute_plus_head(small_models):
    trunk = small_models["vgg16"]
    cluster = load_cluster("mixed-4")
    plan = make_plan(trunk, cluster, "local")
    result = simulate_plan(trunk, cluster, plan)
    model = CostModel(trunk, cluster)
    n = len(trunk.segments)
    _, h, w = trunk.boundary_shape(n)
    compute = model.tile_compute(cluster.names.index(cluster.requester), 0, n, Region.full(h, w))
    assert result.latency_s == pytest.approx(compute + model.head_s)
    assert result.latency_s == pytest.approx(plan.predicted_latency_s)
    assert result.messages == 0 and result.bytes_moved == 0


def test_offloaded_block_by_hand(small_models):
    """One block on a helper: input over the link, compute, output back, head."""
    trunk = small_models["resnet34"]
    cluster = two_helpers("switched")
    n = len(trunk.segments)
    c0, h0, w0 = trunk.boundary_shape(0)
    cn, hn, wn = trunk.boundary_shape(n)
    plan = plan_from_assignment(trunk, cluster, [(0, n)], [{"a": (0, hn)}])
    model = CostModel(trunk, cluster)
    link = cluster.link("req", "a")
    expect = (
        link.transfer_s(c0 * h0 * w0 * BYTES_PER_VALUE)
        + model.tile_compute(1, 0, n, Region.full(hn, wn))
        + link.transfer_s(cn * hn * wn * BYTES_PER_VALUE)
        + model.head_s
    )
    result = simulate_plan(trunk, cluster, plan)
    assert result.latency_s == pytest.approx(expect)
    assert result.latency_s == pytest.approx(plan.predicted_latency_s)
    assert result.messages == 2
    assert result.bytes_moved == (c0 * h0 * w0 + cn * hn * wn) * BYTES_PER_VALUE


def test_shared_medium_serialises_transfers(small_models):
    trunk = small_models["vgg16"]
    n = len(trunk.segments)
    h = trunk.boundary_shape(n)[1]
    half = h // 2
    latency = {}
    for medium in ("switched", "shared"):
        cluster = two_helpers(medium)
        plan = plan_from_assignment(trunk, cluster, [(0, n)], [{"a": (0, half), "b": (half, h)}])
        result = simulate_plan(trunk, cluster, plan)
        latency[medium] = result.latency_s
        busy = result.channel_busy_s
        if medium == "shared":
            assert set(busy) == {"medium"}
        else:
            assert set(busy) == {"req->a", "req->b", "a->req", "b->req"}
    assert latency["shared"] > latency["switched"]


def test_backlog_delays_a_device(small_models):
    trunk = small_models["vgg16"]
    n = len(trunk.segments)
    h = trunk.boundary_shape(n)[1]
    idle = two_helpers("switched")
    devices = (Device("req", 1.0), Device("a", 4.0, backlog_s=5.0), Device("b", 4.0))
    busy = Cluster(devices, idle.default_link, {}, "switched", "req")
    results = []
    for cluster in (idle, busy):
        plan = plan_from_assignment(trunk, cluster, [(0, n)], [{"a": (0, h)}])
        results.append(simulate_plan(trunk, cluster, plan))
    assert results[1].latency_s > 5.0 > results[0].latency_s
    assert results[1].block_finish_s[0]["a"] > 5.0


@pytest.mark.parametrize("name", ["vgg16", "resnet34"])
def test_every_strategy_replays(small_models, name):
    trunk = small_models[name]
    cluster = load_cluster("mixed-4-wifi")
    model = CostModel(trunk, cluster)
    for strategy in STRATEGIES:
        plan = make_plan(trunk, cluster, strategy, model)
        result = simulate_plan(trunk, cluster, plan, model)
        # every device's compute is what its tiles cost, whatever the order
        for b, block in enumerate(plan.blocks):
            assert set(result.block_finish_s[b]) == set(block.devices)
        assert result.latency_s > 0
        assert result.latency_s >= max(result.busy_s.values())
        data = result.to_json()
        assert {"latency_s", "predicted_latency_s", "blocks", "busy_s", "bytes_moved", "messages"} <= set(data)
        again = simulate_plan(trunk, cluster, plan, model)
        assert again == result  # deterministic


def test_sixty_four_devices(small_models):
    trunk = small_models["vgg16"]
    for medium in ("switched", "shared"):
        cluster = pi_cluster(64, mbps=50, medium=medium)
        model = CostModel(trunk, cluster)
        plan = make_plan(trunk, cluster, "edgeci", model)
        result = simulate_plan(trunk, cluster, plan, model)
        local = simulate_plan(trunk, cluster, make_plan(trunk, cluster, "local", model), model)
        assert result.latency_s < local.latency_s
        assert len(result.busy_s) >= 2
