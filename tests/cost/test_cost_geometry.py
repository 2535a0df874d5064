"""The fast strip tables agree with the tiling geometry; compute and transfer times."""

from __future__ import annotations

import random

import numpy as np
import pytest

from meshci.cost import CostModel, Device, LinkSpec, Cluster, strip_tables
from meshci.tiling import block_flops, block_input_region
from meshci.trunk.region import Region


@pytest.mark.parametrize("name", ["vgg16", "resnet34"])
def test_strip_tables_match_tiling(small_models, name):
    trunk = small_models[name]
    tables = strip_tables(trunk)
    rng = random.Random(0)
    n = len(trunk.segments)
    for _ in range(120):
        start = rng.randrange(n)
        end = rng.randrange(start + 1, n + 1)
        _, h, w = trunk.boundary_shape(end)
        r0 = rng.randrange(h)
        r1 = rng.randrange(r0 + 1, h + 1)
        out = Region(r0, r1, 0, w)
        block = tables.block(start, end)
        want = block_input_region(trunk, start, end, out)
        assert block.input_rows(r0, r1) == (want.r0, want.r1)
        assert block.flops(r0, r1) == pytest.approx(block_flops(trunk, start, end, out), rel=1e-12)


def test_tables_are_cached_per_trunk(tiny_trunk):
    assert strip_tables(tiny_trunk) is strip_tables(tiny_trunk)


def test_compute_time_gflops_and_curves(tiny_trunk):
    n = len(tiny_trunk.segments)
    curve = tuple((0.001, 0.0005) for _ in range(n))
    devices = (Device("a", 2.0), Device("b", 1.0, curves=(("tiny", curve),)))
    cluster = Cluster(devices, LinkSpec(100.0, 1.0), {}, "switched", "a")
    model = CostModel(tiny_trunk, cluster)
    _, h, w = tiny_trunk.boundary_shape(n)
    full = Region.full(h, w)
    flops = block_flops(tiny_trunk, 0, n, full)
    assert model.tile_compute(0, 0, n, full) == pytest.approx(flops / 2e9)
    # curve device: sum over segments of a + b * output rows of that segment (no halo on the full map)
    rows = [tiny_trunk.boundary_shape(k + 1)[1] for k in range(n)]
    assert model.tile_compute(1, 0, n, full) == pytest.approx(sum(0.001 + 0.0005 * r for r in rows))
    # a grid tile goes through the generic path and agrees with the strip path on strips
    strip = Region(0, h // 2, 0, w)
    table = model.strip_compute(tables_block := strip_tables(tiny_trunk).block(0, n), np.array([0]), np.array([h // 2]))
    assert table[0, 0] == pytest.approx(block_flops(tiny_trunk, 0, n, strip) / 2e9)
    assert tables_block.height == h


def test_transfer_and_shared_medium(tiny_trunk):
    devices = (Device("r", 1.0), Device("x", 1.0), Device("y", 1.0))
    link = LinkSpec(8.0, 0.0)  # 1 MB/s
    switched = CostModel(tiny_trunk, Cluster(devices, link, {}, "switched", "r"))
    shared = CostModel(tiny_trunk, Cluster(devices, link, {}, "shared", "r"))
    dests = np.array([1, 2])
    comp = np.array([0.0, 0.0])
    recv = np.array([[0.5], [0.25]])
    send = np.zeros(2)
    f_sw, end_sw = switched.block_timing(0.0, dests, comp, recv, send)
    f_sh, end_sh = shared.block_timing(0.0, dests, comp, recv, send)
    assert end_sw == pytest.approx(0.5)  # independent links: in parallel
    assert end_sh == pytest.approx(0.75)  # one channel: one after the other
    assert LinkSpec(8.0, 2.0).transfer_s(1_000_000) == pytest.approx(1.002)
    assert LinkSpec(8.0, 2.0).transfer_s(0) == 0.0
