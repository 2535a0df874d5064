"""In-process execution of a plan: every block tile by tile, then the head.

Exact by construction (the tiling executor crops each tile's input with its halo and pads
only at the real image border); the tests compare it with the plain forward pass for every
strategy. Devices do not matter here: a tile's result does not depend on who computes it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meshci.errors import PlanningError
from meshci.planning.plan import Plan
from meshci.tiling import run_tiled
from meshci.trunk import Trunk
from meshci.trunk.head import HeadSplit


def execute_plan(trunk: Trunk, plan: Plan, x: Tensor) -> Tensor:
    """head(trunk(x)) computed the plan's way (tile by tile per block; a split head from
    each last-block tile's part, as the mesh does)."""
    if tuple(x.shape[1:]) != tuple(plan.input_shape):
        raise PlanningError(f"input of shape {tuple(x.shape[1:])}, the plan is for {tuple(plan.input_shape)}")
    blocks = [(b.start, b.end, [t.region for t in b.tiles]) for b in plan.blocks]
    logits, boundaries = run_tiled(trunk, x, blocks)
    if not plan.head_plan.split:
        return logits
    split = HeadSplit.of(trunk.head, trunk.boundary_shape(len(trunk.segments)))
    if split is None:
        raise PlanningError(f"the plan splits the head of {trunk.name}, which has no linear prefix")
    y = boundaries[-1]
    parts = [split.partial(t.region, y[..., t.region.r0:t.region.r1, t.region.c0:t.region.c1])
             for t in plan.blocks[-1].tiles]
    return split.finish(torch.stack(parts).sum(dim=0))
