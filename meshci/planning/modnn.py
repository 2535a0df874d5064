"""``modnn``: MoDNN (Mao, Chen, Nixon, Krieger, Chen, DATE 2017).

MoDNN partitions every layer separately ("Biased One-Dimensional Partition"): the input
of each conv layer is cut into row strips sized in proportion to each device's computing
capability; the group owner (here: the requester) gathers every layer's output and
scatters the next layer's inputs, halo rows included.

Simplifications: a layer here is a trunk segment (conv+activation, pool, or a residual
block); MoDNN's sparse fully-connected partitioning (MSCC) is not reproduced: the head
runs on the requester, as in every strategy. The capability of a device is its speed on
that segment (GFLOP/s or its measured curve); devices that would get no row sit out.
"""

from __future__ import annotations

import numpy as np

from meshci.cost.model import CostModel
from meshci.planning.splits import proportional_layout
from meshci.trunk.region import Region


def plan_modnn(model: CostModel) -> list[tuple[int, int, list[tuple[int, Region]]]]:
    devices = np.arange(model.n_devices)
    blocks = []
    for k in range(model.n_segments):
        layout = proportional_layout(model, k, k + 1, devices)
        w = model.tables.widths[k + 1]
        blocks.append((k, k + 1, [(d, Region(a, b, 0, w)) for d, a, b in layout.as_tiles()]))
    return blocks
