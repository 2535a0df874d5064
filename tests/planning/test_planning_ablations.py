"""The ablations of edgeci: ``edgeci-dp`` (DPFL with speed-proportional strips, no auction)
and ``edgeci-gather`` (DPFL + AWAS, every boundary through the requester). No test here
compares their predictions with edgeci's: either may come out ahead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshci.cli import main
from meshci.cost import CostModel, load_cluster
from meshci.planning import CLASSIC, STRATEGIES, execute_plan, make_plan
from meshci.planning.ablations import proportional_candidates
from meshci.planning.edgeci import degree_candidates
from meshci.testbed import bed, bench

ABLATIONS = ("edgeci-dp", "edgeci-gather")


def test_ablations_are_strategies():
    assert STRATEGIES == (*CLASSIC, *ABLATIONS)
    assert bench.STRATEGIES == CLASSIC and bench.ABLATIONS == ABLATIONS


def test_edgeci_dp_splits_in_proportion_to_speed_without_auction(models_64):
    trunk = models_64["vgg16"]
    cluster = load_cluster("mixed-4")
    plan = make_plan(trunk, cluster, "edgeci-dp")
    assert plan.routing == "p2p" and plan.auction_rounds == 0
    assert all(b.auction_rounds == 0 for b in plan.blocks)
    assert plan.head == make_plan(trunk, cluster, "edgeci").head
    speed = {d.name: d.gflops for d in cluster.devices}
    split = [b for b in plan.blocks if len(b.devices) > 1]
    assert split, "mixed-4 should share the work"
    for block in split:
        rows = np.array([t.region.height for t in block.tiles])
        gflops = np.array([speed[t.device] for t in block.tiles])
        assert np.abs(rows - rows.sum() * gflops / gflops.sum()).max() < 1.0, (block.start, block.end, rows)


def test_proportional_candidates_keep_the_devices_of_each_degree(models_64):
    trunk = models_64["resnet34"]
    model = CostModel(trunk, load_cluster("pi-8-switched"))
    levelled = degree_candidates(model, 2, 6)
    recut = proportional_candidates(model, 2, 6, levelled)
    assert recut[0].key == "requester"
    assert {lay.devices.tobytes() for lay in recut} <= {lay.devices.tobytes() for lay in levelled}
    height = model.tables.heights[6]
    assert all(lay.r0[0] == 0 and lay.r1[-1] == height for lay in recut)
    assert len({lay.signature for lay in recut}) == len(recut)


def test_edgeci_gather_routes_every_boundary_through_the_requester(models_64):
    trunk = models_64["vgg16"]
    cluster = load_cluster("pi-8-switched")
    plan = make_plan(trunk, cluster, "edgeci-gather")
    assert plan.routing == "requester"
    assert plan.head == make_plan(trunk, cluster, "edgeci").head
    distributed = [b for b in plan.blocks if b.devices != (cluster.requester,)]
    assert distributed and plan.auction_rounds >= 2
    assert all(b.auction_rounds == plan.auction_rounds for b in distributed)


@pytest.mark.parametrize("strategy", ABLATIONS)
@pytest.mark.parametrize("name", ["vgg16", "resnet34"])
def test_ablations_are_exact(small_models, name, strategy):
    trunk = small_models[name]
    cluster = load_cluster("mixed-4")
    plan = make_plan(trunk, cluster, strategy)
    assert plan.strategy == strategy
    x = torch.randn(1, *trunk.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(execute_plan(trunk, plan, x), trunk.forward(x), rtol=1e-4, atol=1e-5)


def test_plan_and_simulate_accept_the_ablations(capsys):
    args = ["--model", "resnet34", "--cluster", "mixed-4", "--size", "32", "32"]
    assert main(["plan", *args, "--strategy", "edgeci-dp"]) == 0
    assert "edgeci-dp" in capsys.readouterr().out
    assert main(["simulate", *args, "--strategy", "edgeci-gather"]) == 0
    assert "edgeci-gather" in capsys.readouterr().out


def test_bench_accepts_the_ablations(monkeypatch, capsys):
    monkeypatch.setattr(bed, "check_root", lambda: "not root (test)")
    assert bench.main(["--strategy", "edgeci-dp", "--strategy", "edgeci-gather"]) == 2
    assert "not root (test)" in capsys.readouterr().err  # parsed, then stopped before the testbed
    with pytest.raises(SystemExit):
        bench.main(["--strategy", "edgeci-nonsense"])
