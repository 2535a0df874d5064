"""``local``: the whole model on the requester (the baseline every speedup is measured
against). One block over all segments, one tile: the requester's whole output map."""

from __future__ import annotations

from meshci.cost.model import CostModel
from meshci.trunk.region import Region


def plan_local(model: CostModel) -> list[tuple[int, int, list[tuple[int, Region]]]]:
    s = model.n_segments
    full = Region.full(model.tables.heights[s], model.tables.widths[s])
    return [(0, s, [(model.requester, full)])]
