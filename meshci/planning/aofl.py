"""``aofl``: Adaptive Optimal Fused Layers (Zhou, Samavatian, Bacha, Majumdar, Teodorescu,
"Adaptive parallel execution of deep neural networks on heterogeneous edge devices",
SEC 2019).

AOFL fuses consecutive layers into blocks and, per block, chooses its *degree of
parallelism*: how many devices (1 to n, the requester alone included) share it, from
the devices' computing resources and the network, and splits the block's output into row
strips in proportion to the chosen devices' speeds. The requester gathers each block's
output and scatters the next block's inputs (with their halo). Fusing more layers saves
rounds through the requester but costs halo work; more devices share the compute but
each pays a round trip: the programme weighs both.

Candidates of a block [s, e) (`degree_layouts`): the requester alone, and for each degree
k = 1..n the k devices that would finish a 1/k share soonest: what is still queued on
them (their backlog: AOFL sees the devices' load), their input from the requester, their
compute and their output back. The cuts and degrees are then chosen by the programme
over cut positions (`meshci.planning.dpfl` under requester routing, where every block's
input comes from the requester, so one state per boundary suffices: the same optimum as
the paper's recursion ``best(s) = min over e > s, k of block(s, e, k) + best(e)``, with
each block timed from its start under the full cost model, backlog included).

Simplification: devices that would get no row (more devices than rows) sit out.
"""

from __future__ import annotations

import numpy as np

from meshci.cost.model import CostModel
from meshci.planning.dpfl import StripLayout, dpfl, requester_layout
from meshci.planning.splits import layout_from_rows, per_row_seconds, round_rows
from meshci.trunk.region import Region


def degree_layouts(model: CostModel, start: int, end: int) -> list[StripLayout]:
    """The requester alone, and per degree k = 1..n speed-proportional strips over the k
    devices that would finish a 1/k share of the block first (distinct layouts only)."""
    tables = model.tables
    height = tables.heights[end]
    layouts = [requester_layout(model, height)]
    n = model.n_devices
    if n == 1:
        return layouts
    req = model.requester
    rate = per_row_seconds(model, tables.block(start, end))
    remote = np.arange(n) != req
    bytes_in = float(tables.row_bytes[start] * tables.heights[start])
    bytes_out = float(tables.row_bytes[end] * height)
    seen = {layouts[0].signature}
    for k in range(1, min(n, height) + 1):
        share = height / k
        t_in = np.where(remote, model.latency[req] + bytes_in / k * model.sec_per_byte[req], 0.0)
        t_out = np.where(remote, model.latency[:, req] + bytes_out / k * model.sec_per_byte[:, req], 0.0)
        score = np.maximum(model.backlog, t_in) + rate * share + t_out
        chosen = np.sort(np.argsort(score, kind="stable")[:k])
        layout = layout_from_rows(chosen, round_rows(height, 1.0 / rate[chosen]))
        if layout.signature not in seen:
            seen.add(layout.signature)
            layouts.append(layout)
    return layouts


def plan_aofl(model: CostModel) -> list[tuple[int, int, list[tuple[int, Region]]]]:
    cache: dict[tuple[int, int], list[StripLayout]] = {}

    def candidates(s: int, e: int) -> list[StripLayout]:
        hit = cache.get((s, e))
        if hit is None:
            hit = cache[(s, e)] = degree_layouts(model, s, e)
        return hit

    result = dpfl(model, candidates, routing="requester")
    blocks: list[tuple[int, int, list[tuple[int, Region]]]] = []
    alone = False  # the block before ran on the requester alone
    for s, e, layout in result.blocks:
        w = model.tables.widths[e]
        if layout.key == "requester" and alone:
            # consecutive blocks on the requester alone are one block: no transfer between
            # them either way, and one tile's overhead instead of several
            blocks[-1] = (blocks[-1][0], e, [(model.requester, Region.full(model.tables.heights[e], w))])
        else:
            blocks.append((s, e, [(d, Region(a, b, 0, w)) for d, a, b in layout.as_tiles()]))
        alone = layout.key == "requester"
    return blocks
