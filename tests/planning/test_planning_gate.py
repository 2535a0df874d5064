"""Plans for squeeze-and-excitation models: every planner cuts at the gates (a block holding
one inside runs as one whole-map tile), the exchange of partial sums is priced, and every
strategy's plan executes exactly (meshci.planning.execute)."""

from __future__ import annotations

import pytest
import torch

from meshci.cost.cluster import Cluster, Device, LinkSpec
from meshci.cost.model import CostModel
from meshci.models import build_model
from meshci.planning import STRATEGIES, execute_plan, make_plan
from meshci.planning.evaluate import timeline
from meshci.tiling import interior_gates
from meshci.trunk import extract_trunk


@pytest.fixture(scope="module")
def se_model():
    model = build_model("mobilenet_v3_small", seed=2)
    return model, extract_trunk(model, (3, 96, 80), "mobilenet_v3_small")


def fast_cluster(n: int) -> Cluster:
    """Slow devices on a fast switch: splitting pays, so the DP tiles gated blocks."""
    devices = tuple(Device(f"d{i}", 0.5, 2048) for i in range(n))
    return Cluster(devices, LinkSpec(10000.0, 0.05), {}, "switched", devices[0].name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_cuts_at_the_gates_and_is_exact(se_model, strategy) -> None:
    model, trunk = se_model
    plan = make_plan(trunk, fast_cluster(3), strategy)
    for block in plan.blocks:
        if interior_gates(trunk, block.start, block.end):
            _, h, w = trunk.boundary_shape(block.end)
            assert [t.region.to_list() for t in block.tiles] == [[0, h, 0, w]]
    x = torch.randn(1, *trunk.input_shape)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(execute_plan(trunk, plan, x), expected, rtol=1e-4, atol=1e-5)


def test_edgeci_splits_gated_blocks_and_prices_the_sums(se_model) -> None:
    _, trunk = se_model
    cluster = fast_cluster(3)
    plan = make_plan(trunk, cluster, "edgeci")
    gated = [b for b in plan.blocks if trunk.segments[b.start].kind == "gate" and len(b.devices) > 1]
    assert gated, "no SE gate's block was split over devices"
    # the plan timed by the generic path (tiles_block) with and without the partial sums:
    # with them every gated block waits for one more message per (holder, device) pair
    model = CostModel(trunk, cluster)
    blocks = [(b.start, b.end, [(cluster.index(t.device), t.region) for t in b.tiles]) for b in plan.blocks]
    priced, _ = timeline(model, blocks, "p2p")
    saved = list(model.tables.gate_bytes)
    try:
        model.tables.gate_bytes[:] = [0] * len(saved)
        free, _ = timeline(model, blocks, "p2p")
    finally:
        model.tables.gate_bytes[:] = saved
    assert priced > free


def test_the_simulator_replays_the_partial_sums(se_model) -> None:
    from meshci.simulate import simulate_plan

    _, trunk = se_model
    cluster = fast_cluster(3)
    plan = make_plan(trunk, cluster, "edgeci")
    model = CostModel(trunk, cluster, plan.head_plan.device, plan.head_plan.split)
    with_sums = simulate_plan(trunk, cluster, plan, model)
    saved = list(model.tables.gate_bytes)
    try:
        model.tables.gate_bytes[:] = [0] * len(saved)
        without = simulate_plan(trunk, cluster, plan, model)
    finally:
        model.tables.gate_bytes[:] = saved
    assert with_sums.bytes_moved > without.bytes_moved and with_sums.messages >= without.messages


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("routing", ["p2p", "requester"])
def test_dpfl_prices_the_sums_as_strip_block_does(seed, routing) -> None:
    """The fast DP's stacked receive (with the gate's partial sums) equals a DP that times
    every transition by `CostModel.strip_block`, to the bit."""
    import random

    from torch import nn

    from meshci.cost import random_cluster
    from meshci.planning.dpfl import dpfl
    from meshci.planning.edgeci import degree_candidates
    from tests.planning.test_planning_reference import reference_dpfl, same
    from tests.trunk.test_trunk_gate import ResidualSE

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *[ResidualSE(16, 3, 1, "adaptive") for _ in range(3)]).eval()
    trunk = extract_trunk(net, (3, 48, 40), "se3")
    medium = "shared" if seed % 2 else "switched"
    if seed < 2:  # slow devices on a fast link: gated blocks are split
        fast = fast_cluster(2 + seed)
        cluster = Cluster(fast.devices, fast.default_link, {}, medium, fast.requester)
    else:
        cluster = random_cluster(2 + seed, random.Random(700 + seed), medium=medium)
    model = CostModel(trunk, cluster)
    cands = {(s, e): [lay for lay in degree_candidates(model, s, e)
                      if not interior_gates(trunk, s, e) or lay.devices.size == 1]
             for e in range(1, model.n_segments + 1) for s in range(e)}
    result = dpfl(model, lambda s, e: cands[(s, e)], routing=routing)
    assert same(result, reference_dpfl(model, lambda s, e: cands[(s, e)], routing))
    if seed < 2:
        assert any(trunk.segments[s].kind == "gate" and lay.devices.size > 1 for s, _, lay in result.blocks)
