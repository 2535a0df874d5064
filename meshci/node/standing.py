"""Standing plans: the plan a requester keeps per (model, seed, size, strategy, devices), and
the coarse signatures of the measured costs that decide when it is made again in the
background (`Requester._refresh`) rather than on a request's critical path."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from meshci.cost import Cluster
from meshci.errors import PlanningError
from meshci.planning import Plan
from meshci.planning.evaluate import evaluate_plan
from meshci.trunk import Region

STANDING_PLANS = 16  # standing plans kept (least recently used beyond)
LINK_STEP = 2.0  # a standing plan is made again when a link's measured cost moves by this factor
RATIO_STEP = 1.25  # ... or a device's learned compute ratio moves by this factor (devices correct their own curves)
REPLAN_MIN_S = 10.0  # ... at most this often: planning competes with tiles for the CPU
# a standing award is auctioned again at most this often: an auction costs every bidder
# CPU, and the load it reacts to is mostly the requests it serves
AUCTION_MIN_S = 10.0
AWARD_SLACK = 0.02  # an award predicted this much slower than DPFL's own layout is noted
BACKLOG_STEP = 0.25  # a bidder's backlog moves a step per this share of the plan's latency


@dataclass
class Standing:
    """A standing plan: DPFL's plan for one key, and the network auction's award for it."""

    plan: Plan
    links: tuple[Any, ...]  # the link and ratio signature it was made for
    made: float
    awarded: Plan | None = None  # the layout requests use once the auction ran
    award_note: str = "none"  # what `awarded` is, for the request's result
    bids_for: tuple[Any, ...] | None = None  # the bidder states the award was made for
    auctioned: float = -math.inf
    busy: bool = False  # a background re-plan or auction is running
    shares: dict[str, dict[str, float]] = field(default_factory=dict)  # plan digest -> shares

    @property
    def current(self) -> Plan:
        return self.awarded if self.awarded is not None else self.plan


def _distributed(plan: Plan) -> bool:
    return any(len(b.tiles) > 1 or b.tiles[0].device != plan.requester for b in plan.blocks)


def _bidder_signature(cluster: Cluster, plan: Plan) -> tuple[Any, ...]:
    """What the bidders' bids depend on, in steps: each one's backlog (in steps of
    `BACKLOG_STEP` of the plan's latency) and its links (`_link_signature`)."""
    step = max(1e-3, BACKLOG_STEP * plan.predicted_latency_s)
    backlogs = tuple(sorted((d.name, min(8, int(d.backlog_s / step))) for d in cluster.devices))
    return backlogs + _link_signature(cluster)


def _link_signature(cluster: Cluster) -> tuple[tuple[Any, ...], ...]:
    """The cluster's links and the devices' per-tile overheads on a coarse logarithmic
    scale (factors of 2): a plan made for one set of measured costs serves requests until
    they move by a step."""
    def step(value: float) -> int:
        return round(math.log(max(value, 1e-3)) / math.log(LINK_STEP))

    links = tuple(sorted((*sorted(pair), step(spec.latency_ms), step(spec.mbps))
                         for pair, spec in cluster.links.items()))
    return links + tuple(sorted((d.name, step(d.tile_overhead_s * 1e3)) for d in cluster.devices))


def _ratio_signature(ratios: dict[str, float]) -> tuple[tuple[str, int], ...]:
    return tuple((name, round(math.log(max(r, 1e-3)) / math.log(RATIO_STEP))) for name, r in sorted(ratios.items()))


def _shares(flops: Callable[[int, int, Region], float], plan: Plan) -> dict[str, float]:
    """Each device's share of the plan's trunk FLOPs (halo work included)."""
    work: dict[str, float] = defaultdict(float)
    for block in plan.blocks:
        for tile in block.tiles:
            work[tile.device] += flops(block.start, block.end, tile.region)
    total = sum(work.values()) or 1.0
    return {name: value / total for name, value in sorted(work.items())}


def judged_award(trunk: Any, cluster: Cluster, dpfl_plan: Plan, awarded: Plan) -> tuple[Plan, str]:
    """The award requests use, with its predicted latency from the one cost model every
    strategy is measured by (`evaluate_plan` on the cluster the planner used): the award's
    own figure comes from the bidders' linear strip costs, which miss transfers and the head.
    The award itself stands even where the requester's view predicts DPFL's layout faster:
    the bidders priced it from their own measured speed and load, which the requester's view
    learns only later (a device whose quota was just halved). Returns the plan and a note
    saying how the requester's view compares with DPFL's prediction for its own layout."""
    try:
        award_s, _ = evaluate_plan(trunk, cluster, awarded)
    except PlanningError as exc:
        # a device of the award left the view meanwhile: the award as it is (its request checks)
        return awarded, f"standing award (not judged: {exc})"
    note = "standing award"
    dpfl_s = dpfl_plan.predicted_latency_s  # by the same model when it was planned: no second evaluation
    if award_s > dpfl_s * (1.0 + AWARD_SLACK):
        note += f" (the requester's view predicts it {award_s * 1e3:.0f} ms, DPFL's layout {dpfl_s * 1e3:.0f} ms)"
    return replace(awarded, predicted_latency_s=award_s), note
