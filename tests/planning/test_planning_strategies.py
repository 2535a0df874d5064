"""Every strategy: valid plans, exact execution, never predicted worse than local where it may stay local."""

from __future__ import annotations

import json
import random

import pytest
import torch

from meshci.cost import CostModel, load_cluster, random_cluster
from meshci.errors import PlanningError
from meshci.models import build_model
from meshci.planning import (
    STRATEGIES,
    Plan,
    auto_cuts,
    evaluate_plan,
    execute_plan,
    make_plan,
    plan_from_assignment,
)
from meshci.planning.modnn import layer_steps
from meshci.trunk import extract_trunk
from meshci.trunk.region import Region

RTOL, ATOL = 1e-4, 1e-5


def covers(plan: Plan, trunk) -> None:
    """Each block's tiles tile its output map exactly."""
    for block in plan.blocks:
        _, h, w = trunk.boundary_shape(block.end)
        area = sum(t.region.area for t in block.tiles)
        assert area == h * w
        regions = [t.region for t in block.tiles]
        for i, a in enumerate(regions):
            assert Region.full(h, w).contains(a)
            for b in regions[i + 1 :]:
                assert a.intersect(b) is None
        assert set(block.finish_s) == set(block.devices)


@pytest.mark.parametrize(("name", "n_devices"), [("vgg16", 7), ("resnet34", 5)])
def test_every_strategy_is_exact(small_models, name, n_devices):
    trunk = small_models[name]
    x = torch.randn(1, *trunk.input_shape)
    cluster = random_cluster(n_devices, random.Random(2))
    model = CostModel(trunk, cluster)
    with torch.no_grad():
        want = trunk.forward(x)
        for strategy in STRATEGIES:
            plan = make_plan(trunk, cluster, strategy, model)
            covers(plan, trunk)
            torch.testing.assert_close(execute_plan(trunk, plan, x), want, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "resnet34"])
def test_every_strategy_is_exact_at_224(name):
    trunk = extract_trunk(build_model(name), (3, 224, 224), name)
    cluster = load_cluster("mixed-4")
    model = CostModel(trunk, cluster)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = trunk.forward(x)
        for strategy in STRATEGIES:
            got = execute_plan(trunk, make_plan(trunk, cluster, strategy, model), x)
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


# strategies whose choices include the whole trunk on the requester
KEEPS_LOCAL = ("aofl", "deepthings", "edgeci", "edgeci-dp", "edgeci-gather")


def test_no_strategy_that_can_stay_local_is_predicted_worse_than_local(models_64):
    # (no test compares edgeci with the baselines: a stronger baseline is not a regression)
    rng = random.Random(11)
    trunks = list(models_64.values())
    for i in range(12):
        trunk = trunks[i % 2]
        cluster = random_cluster(rng.randint(2, 8), rng)
        model = CostModel(trunk, cluster)
        local = make_plan(trunk, cluster, "local", model).predicted_latency_s
        for strategy in KEEPS_LOCAL:
            latency = make_plan(trunk, cluster, strategy, model).predicted_latency_s
            assert latency <= local * (1 + 1e-9), (i, cluster.medium, strategy, latency, local)


def test_predicted_latency_is_evaluate_plan(small_models):
    trunk = small_models["resnet34"]
    cluster = load_cluster("mixed-4-wifi")
    for strategy in STRATEGIES:
        plan = make_plan(trunk, cluster, strategy)
        latency, finishes = evaluate_plan(trunk, cluster, plan)
        assert latency == pytest.approx(plan.predicted_latency_s)
        assert finishes == [b.finish_s for b in plan.blocks]
        # finish times grow block by block and stay below the latency
        ends = [max(f.values()) for f in finishes]
        assert ends == sorted(ends) and ends[-1] <= latency


def test_local_is_one_block_on_the_requester(small_models):
    trunk = small_models["vgg16"]
    cluster = load_cluster("mixed-4")
    plan = make_plan(trunk, cluster, "local")
    assert len(plan.blocks) == 1 and plan.blocks[0].devices == (cluster.requester,)
    assert plan.auction_rounds == 0


def test_routing_per_strategy(small_models):
    trunk = small_models["vgg16"]
    cluster = load_cluster("mixed-4")
    routing = {s: make_plan(trunk, cluster, s).routing for s in STRATEGIES}
    assert routing == {"local": "p2p", "modnn": "requester", "deepthings": "p2p", "aofl": "requester", "edgeci": "p2p",
                       "edgeci-dp": "p2p", "edgeci-gather": "requester"}
    modnn = make_plan(trunk, cluster, "modnn")
    # layer by layer, each conv with the pools after it
    assert [(b.start, b.end) for b in modnn.blocks] == layer_steps([seg.kind for seg in trunk.segments])
    deep = make_plan(trunk, cluster, "deepthings")
    assert deep.blocks[0].start == 0 and all(b.devices == (cluster.requester,) for b in deep.blocks[1:])


def test_edgeci_reports_auction_rounds(small_models):
    trunk = small_models["vgg16"]
    cluster = load_cluster("pi-8-switched")
    plan = make_plan(trunk, cluster, "edgeci")
    distributed = [b for b in plan.blocks if b.devices != (cluster.requester,)]
    assert distributed, "8 devices should share the work"
    assert plan.auction_rounds >= 2
    assert all(b.auction_rounds == plan.auction_rounds for b in distributed)


def test_plan_json_round_trip(small_models):
    trunk = small_models["resnet34"]
    cluster = load_cluster("mixed-4")
    for strategy in STRATEGIES:
        plan = make_plan(trunk, cluster, strategy)
        data = json.loads(json.dumps(plan.to_json()))
        assert Plan.from_json(data) == plan
        block = data["blocks"][0]
        assert set(block) >= {"segments", "tiles", "finish_s", "auction_rounds"}
        assert set(block["tiles"][0]) >= {"device", "rows"}
    with pytest.raises(PlanningError):
        Plan.from_json({"strategy": "x"})


def test_plan_from_assignment(small_models):
    trunk = small_models["vgg16"]
    cluster = load_cluster("mixed-4")
    n = len(trunk.segments)
    h1 = trunk.boundary_shape(4)[1]
    _, h2, w2 = trunk.boundary_shape(n)
    plan = plan_from_assignment(
        trunk,
        cluster,
        [(0, 4), (4, n)],
        [{"pi4-a": (0, h1 // 2), "pi5-d": (h1 // 2, h1)}, {"pi4-a": Region(0, h2, 0, w2)}],
        auction_rounds=[2, 0],
    )
    assert plan.cuts == [4]
    latency, _ = evaluate_plan(trunk, cluster, plan)
    assert latency == pytest.approx(plan.predicted_latency_s)
    x = torch.randn(1, *trunk.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(execute_plan(trunk, plan, x), trunk.forward(x), rtol=RTOL, atol=ATOL)
    with pytest.raises(PlanningError, match="do not tile"):
        plan_from_assignment(trunk, cluster, [(0, n)], [{"pi4-a": (0, h2), "pi5-d": (0, h2)}])
    with pytest.raises(PlanningError, match="not in the cluster"):
        plan_from_assignment(trunk, cluster, [(0, n)], [{"ghost": (0, h2)}])


def test_auto_cuts(small_models):
    trunk = small_models["vgg16"]
    cuts = auto_cuts(trunk, 4)
    assert cuts == sorted(set(cuts))
    assert all(0 < c < len(trunk.segments) for c in cuts)


def test_unknown_strategy(small_models):
    with pytest.raises(PlanningError, match="unknown strategy"):
        make_plan(small_models["vgg16"], load_cluster("mixed-4"), "magic")
