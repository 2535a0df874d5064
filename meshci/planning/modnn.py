"""``modnn``: MoDNN (Mao, Chen, Nixon, Krieger, Chen, DATE 2017).

MoDNN partitions every layer separately ("Biased One-Dimensional Partition"): the input
of each conv layer is cut into row strips sized in proportion to each device's computing
capability; the group owner (here: the requester) gathers every layer's output and
scatters the next layer's inputs, halo rows included.

A pooling layer belongs to its convolution's layer step, as in the paper: a device pools
the conv rows it just computed before returning them, so each conv (+ its pools) is one
gather-and-scatter round and only the pooled map travels (`layer_steps`). Pools at the
very start of a trunk (no convolution before them) form a step of their own.

Simplifications: a layer here is a trunk segment (conv+activation or a residual block,
with the pool segments after it); MoDNN's sparse fully-connected partitioning (MSCC) is
not reproduced: the head runs on the requester, as in every strategy. The capability of
a device is its speed on that step (GFLOP/s or its measured curve); devices that would
get no row sit out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from meshci.cost.model import CostModel
from meshci.planning.splits import proportional_layout
from meshci.trunk.region import Region


def layer_steps(kinds: Sequence[str]) -> list[tuple[int, int]]:
    """MoDNN's layer steps [start, end) over segments of the given kinds: each segment
    that is not a pool starts a step, and the pools right after it join that step."""
    steps: list[tuple[int, int]] = []
    for k, kind in enumerate(kinds):
        if kind == "pool" and steps:
            steps[-1] = (steps[-1][0], k + 1)
        else:
            steps.append((k, k + 1))
    return steps


def plan_modnn(model: CostModel) -> list[tuple[int, int, list[tuple[int, Region]]]]:
    devices = np.arange(model.n_devices)
    blocks = []
    for s, e in layer_steps([seg.kind for seg in model.trunk.segments]):
        layout = proportional_layout(model, s, e, devices)
        w = model.tables.widths[e]
        blocks.append((s, e, [(d, Region(a, b, 0, w)) for d, a, b in layout.as_tiles()]))
    return blocks
