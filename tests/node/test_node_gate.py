"""Squeeze-and-excitation gates across devices: the request state machines exchange each
tile's partial sums at a gate boundary and the distributed output stays exact."""

from __future__ import annotations

import pytest
import torch

from meshci.models.mobile import mobilenet_v3_small
from meshci.models.registry import calibrate_batchnorm
from meshci.node.request import RequestStateError, WorkerRun
from meshci.node.runtime import PlanGeometry
from meshci.planning.plan import HeadPlan
from meshci.tiling import gate_cuts
from meshci.trunk import Region, extract_trunk
from tests.node.test_node_request import Router, strip_plan


@pytest.fixture(scope="module")
def trunk():
    torch.manual_seed(5)
    model = mobilenet_v3_small(num_classes=10)
    calibrate_batchnorm(model, size=40)
    return extract_trunk(model.eval(), input_shape=(3, 40, 36), name="mnv3")


def plan_for(trunk, routing: str, head=None):
    cuts = gate_cuts(trunk)
    assert len(cuts) >= 5
    names = [["a", "b", "c"], ["b", "c"], ["c", "a", "b"], ["a"], ["b", "a"]]
    devices = [names[i % len(names)] for i in range(len(cuts) + 1)]
    devices = [d[: trunk.boundary_shape(end)[1]] for d, end in zip(devices, [*cuts, len(trunk.segments)])]
    return strip_plan(trunk, cuts, devices, routing, head=head)


@pytest.mark.parametrize("routing", ["p2p", "requester"])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("head", [None, HeadPlan("b", split=True)], ids=["requester", "b-split"])
def test_gated_request_is_exact(trunk, routing, seed, head) -> None:
    plan = plan_for(trunk, routing, head)
    x = torch.randn(1, *trunk.input_shape)
    with torch.no_grad():
        expected = trunk.forward(x)
        router = Router(trunk, plan, seed)
        out = router.run(x)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    # partial sums travelled, and they are small: one float64 per channel per tile
    sums = sum(n for (_, stage), n in router.sent.items() if stage == "sum")
    assert 0 < sums < 64 * 1024


def test_a_gated_tile_waits_for_every_partial_sum(trunk) -> None:
    plan = plan_for(trunk, "p2p")
    geometry = PlanGeometry(trunk, plan)
    b = next(i for i, blk in enumerate(plan.blocks) if geometry.gated(i) and len(plan.blocks[i - 1].tiles) > 1)
    spec = plan.blocks[b]
    me = spec.tiles[0].device
    worker = WorkerRun(plan, me, geometry)
    c, h, w = trunk.boundary_shape(spec.start)
    full = Region(0, h, 0, w)
    actions = worker.on_piece(b, full, torch.randn(1, c, h, w))
    assert actions == []  # the input is there, the sums are not
    prev = [t.region for t in plan.blocks[b - 1].tiles]
    with pytest.raises(RequestStateError):
        worker.on_sum(b, prev[0], torch.zeros(c, dtype=torch.float32))  # not float64
    with pytest.raises(RequestStateError):
        worker.on_sum(b, Region(0, 1, 0, 1), torch.zeros(c, dtype=torch.float64))  # no such tile
    for region in prev[:-1]:
        assert worker.on_sum(b, region, torch.ones(c, dtype=torch.float64)) == []
    with pytest.raises(RequestStateError):
        worker.on_sum(b, prev[0], torch.ones(c, dtype=torch.float64))  # twice
    ready = worker.on_sum(b, prev[-1], torch.ones(c, dtype=torch.float64))
    assert ready and all(a.mean is not None for a in ready)
    assert torch.allclose(ready[0].mean, torch.full((c,), len(prev) / (h * w), dtype=torch.float64))
