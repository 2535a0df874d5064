"""Ablations that credit each part of EdgeCI (Chen, Luo, Fang, Xiong, ACM TOIT 2024).

- ``edgeci-dp``: DPFL alone. The same programme over the same cuts and parallelism
  degrees as ``edgeci`` (the requester alone, or the k devices that would finish a 1/k
  share first), but each split's rows go in proportion to the devices' speeds on the
  block, and there is no auction: what AWAS and the levelled strips add is the gap to
  ``edgeci``.
- ``edgeci-gather``: DPFL + AWAS as ``edgeci`` plans them, but every block boundary goes
  through the requester (routing ``requester``, as MoDNN and AOFL do), with the simulated
  bidders pricing that round trip: what the peer-to-peer boundaries add is the gap to
  ``edgeci``.

Both place the head as ``edgeci`` does (`meshci.planning.strategies.choose_head`).
"""

from __future__ import annotations

from meshci.cost.model import CostModel
from meshci.planning.dpfl import DPResult, StripLayout, dpfl
from meshci.planning.edgeci import block_candidates, plan_edgeci
from meshci.planning.splits import layout_from_rows, per_row_seconds, round_rows


def proportional_candidates(model: CostModel, start: int, end: int, layouts: list[StripLayout]) -> list[StripLayout]:
    """``layouts`` of block [start, end) with each split's rows re-cut in proportion to its
    devices' speeds on the block (same devices, same order; distinct layouts only)."""
    block = model.tables.block(start, end)
    rate = per_row_seconds(model, block)
    out: list[StripLayout] = []
    seen: set[bytes] = set()
    for lay in layouts:
        if lay.key != "requester":
            lay = layout_from_rows(lay.devices, round_rows(block.height, 1.0 / rate[lay.devices]))
        if lay.signature not in seen:
            seen.add(lay.signature)
            out.append(lay)
    return out


def plan_edgeci_dp(model: CostModel) -> DPResult:
    """``edgeci-dp``: DPFL over speed-proportional splits, peer to peer, no auction."""
    levelled = block_candidates(model)
    cache: dict[tuple[int, int], list[StripLayout]] = {}

    def candidates(s: int, e: int) -> list[StripLayout]:
        hit = cache.get((s, e))
        if hit is None:
            hit = cache[(s, e)] = proportional_candidates(model, s, e, levelled(s, e))
        return hit

    return dpfl(model, candidates, routing="p2p")


def plan_edgeci_gather(model: CostModel) -> tuple[DPResult, int]:
    """``edgeci-gather``: DPFL + AWAS with every boundary through the requester."""
    return plan_edgeci(model, routing="requester")
