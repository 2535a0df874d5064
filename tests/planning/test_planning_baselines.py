"""The baselines as their papers describe them: MoDNN's layer steps, AOFL's degree of
parallelism, DeepThings's grids. Every plan here is also executed and compared with the
single-device forward pass."""

from __future__ import annotations

import pytest
import torch

from meshci.cost import load_cluster
from meshci.cost.cluster import Cluster, Device, LinkSpec
from meshci.planning import execute_plan, make_plan
from meshci.planning.modnn import layer_steps

RTOL, ATOL = 1e-4, 1e-5


def _exact(trunk, plan) -> None:
    x = torch.randn(1, *trunk.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(execute_plan(trunk, plan, x), trunk.forward(x), rtol=RTOL, atol=ATOL)


def _cluster(speeds, mbps=100.0, backlog=None, medium="switched") -> Cluster:
    backlog = backlog or [0.0] * len(speeds)
    devices = tuple(Device(f"d{i}", g, 2048, b) for i, (g, b) in enumerate(zip(speeds, backlog)))
    return Cluster(devices, LinkSpec(mbps, 2.0), {}, medium, devices[0].name)


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
