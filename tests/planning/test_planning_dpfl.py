"""DPFL is optimal: it equals brute-force enumeration of every cut set and every choice of
candidate layouts, each plan judged independently by `evaluate_plan`'s generic path."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from meshci.cost import Cluster, CostModel, Device, LinkSpec, random_cluster
from meshci.planning import make_plan
from meshci.planning.dpfl import dpfl
from meshci.planning.edgeci import degree_candidates
from meshci.planning.evaluate import timeline
from meshci.trunk.region import Region


def cut_sets(n_segments: int):
    inner = range(1, n_segments)
    for r in range(n_segments):
        for cuts in itertools.combinations(inner, r):
            yield [0, *cuts, n_segments]


def brute_force(model: CostModel, routing: str) -> float:
    n = model.n_segments
    best = float("inf")
    cands = {}
    for s in range(n):
        for e in range(s + 1, n + 1):
            cands[(s, e)] = degree_candidates(model, s, e)
    for bounds in cut_sets(n):
        blocks = list(zip(bounds, bounds[1:]))
        for choice in itertools.product(*(cands[b] for b in blocks)):
            tiles = []
            for (s, e), layout in zip(blocks, choice):
                w = model.tables.widths[e]
                tiles.append((s, e, [(d, Region(a, b, 0, w)) for d, a, b in layout.as_tiles()]))
            latency, _ = timeline(model, tiles, routing)
            best = min(best, latency)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("routing", ["p2p", "requester"])
def test_dpfl_equals_brute_force(five_trunk, seed, routing):
    rng = random.Random(seed)
    cluster = random_cluster(rng.randint(2, 4), rng, medium="shared" if seed % 2 else "switched")
    if seed >= 3:  # devices that pay a measured overhead per tile
        cluster = replace(cluster, devices=tuple(replace(d, tile_overhead_s=rng.uniform(0.0, 2e-4))
                                                 for d in cluster.devices))
    model = CostModel(five_trunk, cluster)
    result = dpfl(model, lambda s, e: degree_candidates(model, s, e), routing=routing)
    assert result.latency_s == pytest.approx(brute_force(model, routing), rel=1e-9)


def test_dp_latency_is_the_plans_latency(small_models):
    rng = random.Random(5)
    for trunk in small_models.values():
        cluster = random_cluster(6, rng)
        model = CostModel(trunk, cluster)
        result = dpfl(model, lambda s, e: degree_candidates(model, s, e))
        tiles = [
            (s, e, [(d, Region(a, b, 0, model.tables.widths[e])) for d, a, b in lay.as_tiles()])
            for s, e, lay in result.blocks
        ]
        latency, _ = timeline(model, tiles, "p2p")
        assert latency == pytest.approx(result.latency_s, rel=1e-9)
        assert [b[0] for b in result.blocks][0] == 0 and result.blocks[-1][1] == model.n_segments


@pytest.mark.parametrize("seed", range(4))
def test_upper_bound_pruning_is_exact(models_64, seed):
    """The bounded pass (as edgeci runs it) finds the same optimum as the plain DP."""
    rng = random.Random(100 + seed)
    trunk = list(models_64.values())[seed % 2]
    cluster = random_cluster(rng.randint(3, 12), rng)
    model = CostModel(trunk, cluster)
    plain = dpfl(model, lambda s, e: degree_candidates(model, s, e))
    coarse = dpfl(model, lambda s, e: degree_candidates(model, s, e, [model.n_devices]))
    assert coarse.latency_s >= plain.latency_s * (1 - 1e-12)
    bounded = dpfl(model, lambda s, e: degree_candidates(model, s, e), upper_bound=coarse.latency_s)
    assert bounded.latency_s == pytest.approx(plain.latency_s, rel=1e-12)
    assert bounded.transitions <= plain.transitions


def test_expensive_tiles_make_dpfl_cut_less(small_models):
    """A device's per-tile overhead (what a boundary costs its CPU, as its node measures and
    advertises it) is charged for every tile: the dearer a tile, the fewer the blocks."""
    blocks = []
    for overhead in (0.0, 5e-3, 5e-2):
        devices = tuple(Device(f"d{i}", g, tile_overhead_s=overhead) for i, g in enumerate((1.5, 2.5, 2.5, 3.5)))
        cluster = Cluster(devices, LinkSpec(1000.0, 0.5), {}, "switched", "d0")
        plan = make_plan(small_models["vgg16"], cluster, "edgeci")
        blocks.append(len(plan.blocks))
    assert blocks[0] > blocks[1] > blocks[2] >= 1, blocks
