"""``aofl``: Adaptive Optimal Fused Layers (Zhou, Wang, Ji, Zhang, SEC 2019).

AOFL fuses consecutive layers into blocks chosen by a dynamic programme and splits each
block's output into row strips in proportion to the devices' speeds; the requester
gathers each block's output and scatters the next block's inputs (with their halo).

As in the paper the programme is recursive: ``best(s) = min over e > s of block(s, e) +
best(e)``, memoised, top-down. Its block cost is the cost model's time of a
requester-routed block of speed-proportional strips over all devices, started at time 0
with no backlog (AOFL plans from static speeds and knows nothing of other requests); the
plan it picks is then judged by the full cost model like every other.

Simplification: devices that would get no row (more devices than rows) sit out.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import numpy as np

from meshci.cost.cluster import Cluster, Device
from meshci.cost.model import CostModel
from meshci.planning.splits import proportional_layout
from meshci.trunk.region import Region


def _static(cluster: Cluster) -> Cluster:
    devices = tuple(Device(d.name, d.gflops, d.memory_mb, 0.0, d.curves, d.tile_overhead_s) for d in cluster.devices)
    return Cluster(devices, cluster.default_link, cluster.links, cluster.medium, cluster.requester)


def plan_aofl(model: CostModel) -> list[tuple[int, int, list[tuple[int, Region]]]]:
    static = CostModel(model.trunk, _static(model.cluster))
    n_seg = static.n_segments
    devices = np.arange(static.n_devices)

    def block_cost(s: int, e: int) -> float:
        lay = proportional_layout(static, s, e, devices)
        _, t = static.strip_block(0.0, s, e, lay.devices, lay.r0, lay.r1, None, True)
        return t

    @lru_cache(maxsize=None)
    def best(s: int) -> tuple[float, tuple[int, ...]]:
        if s == n_seg:
            return 0.0, ()
        options = []
        for e in range(s + 1, n_seg + 1):
            rest, ends = best(e)
            options.append((block_cost(s, e) + rest, (e, *ends)))
        return min(options)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * n_seg + 100))
    try:
        _, ends = best(0)
    finally:
        sys.setrecursionlimit(limit)
    blocks = []
    s = 0
    for e in ends:
        lay = proportional_layout(model, s, e, devices)
        w = model.tables.widths[e]
        blocks.append((s, e, [(d, Region(a, b, 0, w)) for d, a, b in lay.as_tiles()]))
        s = e
    return blocks
