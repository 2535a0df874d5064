"""In-process execution of a plan: every block tile by tile, then the head.

Exact by construction (the tiling executor crops each tile's input with its halo and pads
only at the real image border); the tests compare it with the plain forward pass for every
strategy. Devices do not matter here: a tile's result does not depend on who computes it.
"""

from __future__ import annotations

from torch import Tensor

from meshci.errors import PlanningError
from meshci.planning.plan import Plan
from meshci.tiling import run_tiled
from meshci.trunk import Trunk


def execute_plan(trunk: Trunk, plan: Plan, x: Tensor) -> Tensor:
    """head(trunk(x)) computed the plan's way (tile by tile per block)."""
    if tuple(x.shape[1:]) != tuple(plan.input_shape):
        raise PlanningError(f"input of shape {tuple(x.shape[1:])}, the plan is for {tuple(plan.input_shape)}")
    blocks = [(b.start, b.end, [t.region for t in b.tiles]) for b in plan.blocks]
    logits, _ = run_tiled(trunk, x, blocks)
    return logits
