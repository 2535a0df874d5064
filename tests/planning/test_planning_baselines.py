"""The baselines as their papers describe them: MoDNN's layer steps, AOFL's degree of
parallelism, DeepThings's grids. Every plan here is also executed and compared with the
single-device forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshci.cost import CostModel, load_cluster
from meshci.cost.cluster import Cluster, Device, LinkSpec
from meshci.planning import execute_plan, make_plan
from meshci.planning.aofl import degree_layouts
from meshci.planning.deepthings import grids, max_grid
from meshci.planning.modnn import layer_steps

RTOL, ATOL = 1e-4, 1e-5


def _exact(trunk, plan) -> None:
    x = torch.randn(1, *trunk.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(execute_plan(trunk, plan, x), trunk.forward(x), rtol=RTOL, atol=ATOL)


def _cluster(speeds, mbps=100.0, backlog=None, medium="switched", latency_ms=2.0) -> Cluster:
    backlog = backlog or [0.0] * len(speeds)
    devices = tuple(Device(f"d{i}", g, 2048, b) for i, (g, b) in enumerate(zip(speeds, backlog)))
    return Cluster(devices, LinkSpec(mbps, latency_ms), {}, medium, devices[0].name)


def test_layer_steps_put_pools_with_their_conv():
    assert layer_steps(["conv", "conv", "pool", "conv", "pool", "pool"]) == [(0, 1), (1, 3), (3, 6)]
    assert layer_steps(["pool", "conv", "residual"]) == [(0, 1), (1, 2), (2, 3)]
    assert layer_steps([]) == []


@pytest.mark.parametrize("name", ["vgg16", "resnet34"])
def test_modnn_one_round_per_conv_and_its_pool(small_models, name):
    trunk = small_models[name]
    cluster = load_cluster("mixed-4")
    plan = make_plan(trunk, cluster, "modnn")
    kinds = [seg.kind for seg in trunk.segments]
    assert [(b.start, b.end) for b in plan.blocks] == layer_steps(kinds)
    # no block is a pool on its own, and every pool ends the block of the conv before it
    for block in plan.blocks:
        assert kinds[block.start] != "pool"
        assert all(kind == "pool" for kind in kinds[block.start + 1 : block.end])
    pools = sum(kind == "pool" for kind in kinds)
    assert len(plan.blocks) == len(kinds) - pools
    assert plan.routing == "requester" and len(plan.blocks[0].devices) > 1
    _exact(trunk, plan)


def test_aofl_degrees_span_the_requester_alone_to_every_device(models_64):
    trunk = models_64["vgg16"]
    cluster = _cluster([4.0, 8.0, 2.0, 6.0, 6.0])
    model = CostModel(trunk, cluster)
    height = model.tables.heights[4]
    layouts = degree_layouts(model, 0, 4)
    assert layouts[0].devices.tolist() == [model.requester] and layouts[0].key == "requester"
    sizes = sorted(lay.devices.size for lay in layouts[1:])
    assert sizes == [1, 2, 3, 4, 5]
    speed = np.array([d.gflops for d in cluster.devices])
    for lay in layouts:
        rows = lay.r1 - lay.r0
        assert lay.r0[0] == 0 and lay.r1[-1] == height and (lay.r0[1:] == lay.r1[:-1]).all()
        # in proportion to speed (to a row)
        want = height * speed[lay.devices] / speed[lay.devices].sum()
        assert np.abs(rows - want).max() < 1.0
    # the single device is the fastest one, not necessarily the requester
    assert [lay.devices.tolist() for lay in layouts[1:] if lay.devices.size == 1] == [[1]]


def test_aofl_chooses_the_degree_from_the_network(models_64):
    trunk = models_64["resnet34"]
    fast = make_plan(trunk, _cluster([4.0] * 4, mbps=1000.0), "aofl")
    slow = make_plan(trunk, _cluster([4.0] * 4, mbps=0.5), "aofl")
    assert max(len(b.devices) for b in fast.blocks) == 4
    # a link too slow to pay for itself: everything stays on the requester
    assert {b.devices for b in slow.blocks} == {("d0",)}
    assert slow.predicted_latency_s <= make_plan(trunk, _cluster([4.0] * 4, mbps=0.5), "local").predicted_latency_s


def test_aofl_leaves_out_slow_and_loaded_devices(models_64):
    trunk = models_64["vgg16"]
    idle = make_plan(trunk, _cluster([4.0, 4.0, 4.0, 4.0]), "aofl")
    assert any("d3" in b.devices for b in idle.blocks)
    # a device busy for a minute gets nothing: AOFL sees the load
    busy = make_plan(trunk, _cluster([4.0, 4.0, 4.0, 4.0], backlog=[0.0, 0.0, 0.0, 60.0]), "aofl")
    assert all("d3" not in b.devices for b in busy.blocks)
    assert any(len(b.devices) == 3 for b in busy.blocks)
    # a device 1000x slower than the rest gets nothing either
    crawl = make_plan(trunk, _cluster([4.0, 4.0, 4.0, 0.004]), "aofl")
    assert all("d3" not in b.devices for b in crawl.blocks)


@pytest.mark.parametrize(("name", "mbps", "latency_ms"), [("vgg16", 100.0, 2.0), ("resnet34", 1000.0, 0.01)])
def test_aofl_mixed_degrees_are_exact(small_models, name, mbps, latency_ms):
    trunk = small_models[name]
    # a fast requester and slower helpers: the degree varies from block to block
    plan = make_plan(trunk, _cluster([6.0, 3.0, 3.0, 1.0], mbps=mbps, latency_ms=latency_ms), "aofl")
    assert plan.routing == "requester"
    degrees = [len(b.devices) for b in plan.blocks]
    assert len(set(degrees)) >= 2 and 1 in degrees and max(degrees) >= 2, degrees
    # blocks on the requester alone are never split needlessly
    alone = [b.devices == ("d0",) for b in plan.blocks]
    assert not any(a and b for a, b in zip(alone, alone[1:]))
    _exact(trunk, plan)


def test_deepthings_grids_reach_the_papers_5x5_and_grow_with_the_cluster():
    assert [max_grid(n) for n in (1, 4, 12, 13, 16, 64)] == [5, 5, 5, 6, 6, 12]
    paper = [g for side in range(1, 6) for g in grids(100, 100, side)]
    assert sorted(paper) == [(n, m) for n in range(1, 6) for m in range(1, 6)]
    assert grids(100, 100, 8) == [(8, 8), (8, 7), (7, 8)]
    assert grids(7, 100, 8) == [(7, 8)]  # at most one tile per row
    assert grids(3, 3, 5) == []


def _grid(block) -> tuple[int, int]:
    return len({t.region.r0 for t in block.tiles}), len({t.region.c0 for t in block.tiles})


@pytest.mark.parametrize(("n_devices", "want"), [(25, (5, 5)), (36, (6, 7))])
def test_deepthings_picks_large_grids_when_they_pay(models_64, n_devices, want):
    # equal devices on a fast network: one tile per device is the best grid
    trunk = models_64["resnet34"]
    plan = make_plan(trunk, _cluster([1.0] * n_devices, mbps=10000.0, latency_ms=0.01), "deepthings")
    assert _grid(plan.blocks[0]) == want
    assert len(plan.blocks[0].devices) == n_devices


def test_deepthings_5x5_is_exact(small_models):
    trunk = small_models["vgg16"]
    plan = make_plan(trunk, _cluster([1.0] * 25, mbps=10000.0, latency_ms=0.01), "deepthings")
    assert _grid(plan.blocks[0]) == (5, 5)
    _exact(trunk, plan)
