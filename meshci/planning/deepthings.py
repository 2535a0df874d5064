"""``deepthings``: DeepThings (Zhao, Barijough, Gerstlauer, IEEE TCAD 2018).

DeepThings fuses the first L layers of the network into one stack (Fused Tile
Partitioning), cuts its output into an N x M grid of tiles, and lets idle devices pull
tiles from the gateway one at a time (work stealing); the gateway then runs the remaining
layers itself. Here the requester is the gateway.

Work stealing is simulated: tiles, in row-major order, go each to the device that becomes
free first (backlog, then each tile's input transfer from the requester and its compute).
The best L (any segment boundary), N and M (1..4 each, at most one tile per row/column of
the output) are chosen per model and cluster by the predicted latency.

Simplifications: DeepThings's data-reuse partitioning (sharing overlapped tile data
between devices) is not modelled; each tile receives its whole input region.
"""

from __future__ import annotations

import numpy as np

from meshci.cost.model import CostModel
from meshci.planning.evaluate import timeline
from meshci.tiling import grid_regions
from meshci.trunk.region import Region

MAX_GRID = 4


def steal(model: CostModel, layers: int, tiles: list[Region]) -> list[tuple[int, Region]]:
    """Simulated work stealing: each tile to the device free first."""
    free = model.backlog.copy()
    req = model.requester
    c_in = model.tables.channels[0] * 4
    out = []
    for tile in tiles:
        need = model.input_region(0, layers, tile)
        costs = model.tile_compute_all(0, layers, tile)
        recv = np.where(
            np.arange(model.n_devices) == req, 0.0, model.latency[req] + need.area * c_in * model.sec_per_byte[req]
        )
        done = free + recv + costs
        d = int(np.argmin(done))
        free[d] = done[d]
        out.append((d, tile))
    return out


def plan_deepthings(model: CostModel) -> list[tuple[int, int, list[tuple[int, Region]]]]:
    n_seg = model.n_segments
    best: tuple[float, list] | None = None
    for layers in range(1, n_seg + 1):
        h, w = model.tables.heights[layers], model.tables.widths[layers]
        for n in range(1, min(MAX_GRID, h) + 1):
            for m in range(1, min(MAX_GRID, w) + 1):
                tiles = steal(model, layers, grid_regions(h, w, n, m))
                blocks = [(0, layers, tiles)]
                if layers < n_seg:
                    rest = Region.full(model.tables.heights[n_seg], model.tables.widths[n_seg])
                    blocks.append((layers, n_seg, [(model.requester, rest)]))
                latency, _ = timeline(model, blocks, "p2p")
                if best is None or latency < best[0]:
                    best = (latency, blocks)
    assert best is not None  # a trunk has at least one segment
    return best[1]
