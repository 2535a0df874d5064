"""``deepthings``: DeepThings (Zhao, Barijough, Gerstlauer, IEEE TCAD 2018).

DeepThings fuses the first L layers of the network into one stack (Fused Tile
Partitioning), cuts its output into an N x M grid of tiles, and lets idle devices pull
tiles from the gateway one at a time (work stealing); the gateway then runs the remaining
layers itself. Here the requester is the gateway.

Work stealing is simulated: tiles, in row-major order, go each to the device that becomes
free first (backlog, then each tile's input transfer from the requester and its compute).
The best L (any segment boundary) and grid N x M are chosen per model and cluster by the
predicted latency (`grids`): every grid up to 5 x 5 (the paper's default), and, where the
cluster has more devices, square or nearly square grids up to about two tiles per device
(`max_grid`) for as long as a larger grid still lowers the latency; at most one tile per
row/column of the output.

Simplifications: DeepThings's data-reuse partitioning (sharing overlapped tile data
between devices) is not modelled; each tile receives its whole input region. The live
mesh runs the simulated schedule as planned (tiles pre-assigned) rather than stealing.
"""

from __future__ import annotations

import math

import numpy as np

from meshci.cost.model import CostModel
from meshci.tiling import gate_cuts
from meshci.planning.evaluate import timeline
from meshci.tiling import grid_regions
from meshci.trunk.region import Region

PAPER_GRID = 5  # DeepThings's default partition: 5 x 5 tiles
TILES_PER_DEVICE = 2  # larger clusters: grids up to about this many tiles per device


def max_grid(n_devices: int) -> int:
    """The largest grid side tried: 5, or more where the cluster has more devices."""
    return max(PAPER_GRID, math.ceil(math.sqrt(TILES_PER_DEVICE * n_devices)))


def grids(height: int, width: int, side: int) -> list[tuple[int, int]]:
    """(rows, cols) of the grids with the longer side ``side``: every one up to 5 x 5 for
    ``side`` <= 5, else the square and the two nearly square ones (at most one tile per
    row and column of a ``height`` x ``width`` map)."""
    if side <= PAPER_GRID:
        out = [(n, m) for n in range(1, side + 1) for m in range(1, side + 1) if max(n, m) == side]
    else:
        out = [(side, side), (side, side - 1), (side - 1, side)]
    return [(n, m) for n, m in out if n <= height and m <= width]


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
    """The fused stack depth and grid of the lowest predicted latency. Per depth, grids
    grow one side at a time: every grid up to 5 x 5, then larger ones up to `max_grid`
    while a larger side still lowers the latency."""
    n_seg = model.n_segments
    best: tuple[float, list] | None = None
    # the fused stack may end at an SE gate but not hold one (its tiles could not pool)
    deepest = min(gate_cuts(model.trunk), default=n_seg)
    for layers in range(1, deepest + 1):
        h, w = model.tables.heights[layers], model.tables.widths[layers]
        here = np.inf  # the best latency at this depth
        for side in range(1, max_grid(model.n_devices) + 1):
            improved = False
            for n, m in grids(h, w, side):
                tiles = steal(model, layers, grid_regions(h, w, n, m))
                blocks = [(0, layers, tiles)]
                if layers < n_seg:
                    rest = Region.full(model.tables.heights[n_seg], model.tables.widths[n_seg])
                    blocks.append((layers, n_seg, [(model.requester, rest)]))
                latency, _ = timeline(model, blocks, "p2p")
                if latency < here:
                    here, improved = latency, True
                if best is None or latency < best[0]:
                    best = (latency, blocks)
            if side >= PAPER_GRID and not improved:
                break  # a larger grid no longer helps at this depth
    assert best is not None  # a trunk has at least one segment
    return best[1]
