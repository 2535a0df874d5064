"""The fast edgeci planner equals a straightforward one to the bit.

The planner batches its work (all candidate degrees and starts water-filled in one numpy
pass, all layouts of a block timed at once, costs shared across DP passes; plans timed by
looking only at the holders whose rows can overlap a tile). Here the straightforward
versions are written out plainly: candidates one degree at a time through
`water_filled_layout`, a DP that times every transition with `CostModel.strip_block`, and
block timings that intersect every tile with every holder.
On random clusters (both media, small and large device counts) the candidates, the DP
optimum, its blocks and layouts, and the whole edgeci plan must be identical, not merely
close.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from meshci.cost import CostModel, random_cluster
from meshci.planning import STRATEGIES, make_plan
from meshci.planning.dpfl import DPResult, StripLayout, dpfl, requester_layout, segment_lower_bounds
from meshci.planning.edgeci import DEGREES, FINE_DEGREES, auction_layouts, degree_candidates, plan_edgeci
from meshci.planning.splits import halo_seconds, per_row_seconds, water_filled_layout
from meshci.trunk.region import Region


def reference_candidates(model: CostModel, start: int, end: int, degrees=None) -> list[StripLayout]:
    block = model.tables.block(start, end)
    height = block.height
    out = [requester_layout(model, height)]
    seen = {out[0].signature}
    n = model.n_devices
    if n == 1:
        return out
    rate = per_row_seconds(model, block)
    halo = halo_seconds(model, block, rate)
    if degrees is None:
        degrees = sorted({k for k in (FINE_DEGREES if n <= 8 else DEGREES) if k < n} | {n})
    req = model.requester
    tables = model.tables
    bytes_in = tables.row_bytes[start] * tables.heights[start] if start == 0 else 0.0
    bytes_out = tables.row_bytes[end] * height if end == tables.n_segments else 0.0
    others = np.arange(n) != req
    for k in degrees:
        k_eff = min(k, height)
        t_in = np.where(
            others & (bytes_in > 0), model.latency[req] + bytes_in / k_eff * model.sec_per_byte[req], 0.0
        )
        t_out = np.where(
            others & (bytes_out > 0), model.latency[:, req] + bytes_out / k_eff * model.sec_per_byte[:, req], 0.0
        )
        score = np.maximum(model.backlog, t_in) + rate * (height / k_eff) + t_out
        best = np.sort(np.argsort(score, kind="stable")[:k_eff])
        layout = water_filled_layout(model, start, end, best, from_requester=start == 0, rates=rate, halo_s=halo)
        if layout.signature not in seen:
            seen.add(layout.signature)
            out.append(layout)
        if k_eff == height:
            break
    return out


def reference_dpfl(model: CostModel, candidates, routing: str = "p2p", upper_bound: float = np.inf) -> DPResult:
    """Every state, every candidate, every predecessor (no ordering, no early exit), each
    transition timed by `CostModel.strip_block`; ties keep the earliest-ending predecessor
    as the planner does."""
    n_seg = model.n_segments
    init = (0.0, -1, requester_layout(model, model.tables.heights[0]), None)
    states: list[list[tuple]] = [[init]] + [[] for _ in range(n_seg)]
    seg_lb = segment_lower_bounds(model) if np.isfinite(upper_bound) else np.zeros(n_seg)
    rest = np.append(np.cumsum(seg_lb[::-1])[::-1], 0.0) + model.head_s
    limit = upper_bound * (1.0 + 1e-12) if np.isfinite(upper_bound) else np.inf
    for e in range(1, n_seg + 1):
        gather = e == n_seg or routing == "requester"
        for s in range(e):
            preds = sorted(states[s], key=lambda st: st[0])
            for layout in candidates(s, e):
                best = None
                for pred in preds:
                    holders = (pred[2].devices, pred[2].r0, pred[2].r1) if routing == "p2p" else None
                    _, t = model.strip_block(pred[0], s, e, layout.devices, layout.r0, layout.r1, holders, gather)
                    if best is None or t < best[0]:
                        best = (t, s, layout, pred)
                if best is not None and best[0] + rest[e] <= limit:
                    states[e].append(best)
        kept: dict[bytes, tuple] = {}
        for st in states[e]:
            key = b"" if routing == "requester" else st[2].signature
            if key not in kept or st[0] < kept[key][0]:
                kept[key] = st
        states[e] = list(kept.values())
    final = min(states[n_seg], key=lambda st: st[0])
    blocks, ends, node, end = [], [], final, n_seg
    while node is not None and node[1] >= 0:
        blocks.append((node[1], end, node[2]))
        ends.append(node[0])
        end, node = node[1], node[3]
    return DPResult(final[0] + model.head_s, tuple(blocks[::-1]), 0, tuple(ends[::-1]))


def reference_edgeci(model: CostModel) -> DPResult:
    everything = {
        (s, e): reference_candidates(model, s, e) for e in range(1, model.n_segments + 1) for s in range(e)
    }
    first = reference_dpfl(model, lambda s, e: everything[(s, e)])
    starts, t = [], 0.0
    for (s, e, lay), end_t in zip(first.blocks, first.block_ends):
        if lay.key != "requester":
            starts.append((s, e, t))
        t = end_t
    options = {(s, e): [lay] for s, e, lay in first.blocks}
    if starts:
        auctioned, _ = auction_layouts(model, starts)
        for (s, e, _), lay in zip(starts, auctioned):
            if lay is not None:
                options[(s, e)].append(lay)
    return reference_dpfl(model, lambda s, e: options.get((s, e), []))


def same(a: DPResult, b: DPResult) -> bool:
    def key(r: DPResult):
        return [(s, e, lay.signature, lay.key) for s, e, lay in r.blocks]

    return a.latency_s == b.latency_s and a.block_ends == b.block_ends and key(a) == key(b)


CASES = [(seed, n) for seed, n in enumerate((2, 3, 5, 9, 12, 20))]


@pytest.mark.parametrize(("seed", "n_devices"), CASES)
def test_candidates_equal_the_reference(small_models, seed, n_devices):
    rng = random.Random(300 + seed)
    trunk = small_models["vgg16" if seed % 2 else "resnet34"]
    model = CostModel(trunk, random_cluster(n_devices, rng))
    for e in range(1, model.n_segments + 1):
        for s in range(e):
            for degrees in (None, [n_devices], [1, 3]):
                fast = [lay.signature for lay in degree_candidates(model, s, e, degrees)]
                assert fast == [lay.signature for lay in reference_candidates(model, s, e, degrees)]


@pytest.mark.parametrize(("seed", "n_devices"), CASES)
@pytest.mark.parametrize("routing", ["p2p", "requester"])
def test_dpfl_equals_the_reference(small_models, seed, n_devices, routing):
    rng = random.Random(400 + seed)
    trunk = small_models["resnet34" if seed % 2 else "vgg16"]
    model = CostModel(trunk, random_cluster(n_devices, rng, medium="shared" if seed % 3 == 1 else "switched"))
    cands = {(s, e): degree_candidates(model, s, e) for e in range(1, model.n_segments + 1) for s in range(e)}
    fast = dpfl(model, lambda s, e: cands[(s, e)], routing=routing)
    assert same(fast, reference_dpfl(model, lambda s, e: cands[(s, e)], routing))


@pytest.mark.parametrize(("seed", "n_devices"), CASES)
def test_edgeci_equals_the_reference(models_64, seed, n_devices):
    rng = random.Random(500 + seed)
    trunk = models_64["vgg16" if seed % 2 else "resnet34"]
    model = CostModel(trunk, random_cluster(n_devices, rng))
    assert same(plan_edgeci(model)[0], reference_edgeci(model))


def reference_tiles_block(model: CostModel, t0, start, end, tiles, holders, gather):
    """`CostModel.tiles_block` written plainly: every tile against every holder."""
    devices = sorted({d for d, _ in tiles})
    pos = {d: i for i, d in enumerate(devices)}
    comp = np.zeros(len(devices))
    out_bytes = np.zeros(len(devices))
    channels_in = model.tables.channels[start] * 4
    channels_out = model.tables.channels[end] * 4
    if holders is None:
        holders = [(model.requester, Region.full(model.tables.heights[start], model.tables.widths[start]))]
    src = sorted({d for d, _ in holders})
    n_bytes = np.zeros((len(devices), len(src)))
    for d, out in tiles:
        i = pos[d]
        if out.c0 == 0 and out.c1 == model.tables.widths[end]:
            block = model.tables.block(start, end)
            comp[i] += float(model.strip_compute(block, np.array([out.r0]), np.array([out.r1]))[d, 0])
        else:
            comp[i] += model.tile_compute(d, start, end, out)
        out_bytes[i] += out.area * channels_out
        need = model.input_region(start, end, out)
        for h, have in holders:
            overlap = need.intersect(have)
            if h != d and overlap is not None:
                n_bytes[i, src.index(h)] += overlap.area * channels_in
    dests = np.array(devices)
    recv = model.transfer_matrix(n_bytes, np.array(src), dests)
    send = model.send_seconds(dests, out_bytes) if gather else np.zeros(len(devices))
    finish, end_t = model.block_timing(t0, dests, comp, recv, send)
    return {d: float(finish[pos[d]]) for d in devices}, end_t


@pytest.mark.parametrize(("seed", "n_devices"), CASES[::2])
def test_plan_timings_equal_the_reference(models_64, seed, n_devices):
    """Every strategy's plan (row strips, DeepThings's grid tiles, gathers) is timed by the
    generic path exactly as by the plain every-tile-against-every-holder loop."""
    rng = random.Random(600 + seed)
    trunk = models_64["resnet34" if seed % 2 else "vgg16"]
    cluster = random_cluster(n_devices, rng)
    model = CostModel(trunk, cluster)
    index = {name: i for i, name in enumerate(cluster.names)}
    for strategy in STRATEGIES:
        plan = make_plan(trunk, cluster, strategy, model)
        t, holders = 0.0, None
        for b, block in enumerate(plan.blocks):
            tiles = [(index[tile.device], tile.region) for tile in block.tiles]
            gather = b == len(plan.blocks) - 1 or plan.routing == "requester"
            prior = None if plan.routing == "requester" else holders
            fast = model.tiles_block(t, block.start, block.end, tiles, prior, gather)
            want_finish, want_end = reference_tiles_block(model, t, block.start, block.end, tiles, prior, gather)
            assert fast.finish == want_finish and fast.end == want_end
            t, holders = fast.end, tiles


@pytest.mark.parametrize("seed", range(2))
def test_edgeci_equals_the_reference_with_measured_curves(models_64, seed):
    """Devices described by per-segment latency curves take the general compute path."""
    rng = random.Random(700 + seed)
    trunk = models_64["vgg16" if seed else "resnet34"]
    cluster = random_cluster(6, rng)
    n_seg = len(trunk.segments)
    devices = list(cluster.devices)
    for i in (0, 3):  # two devices measured, the others by GFLOP/s
        curve = tuple((rng.random() * 1e-3, rng.random() * 1e-3) for _ in range(n_seg))
        devices[i] = dataclasses.replace(devices[i], curves=((trunk.name, curve),))
    model = CostModel(trunk, dataclasses.replace(cluster, devices=tuple(devices)))
    assert not model.curves_free
    assert same(plan_edgeci(model)[0], reference_edgeci(model))
