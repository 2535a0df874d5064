"""`make_plan`: one entry point for every strategy, and `auto_cuts` for ``inspect``."""

from __future__ import annotations

import time
from collections.abc import Callable

from meshci.cost.cluster import Cluster, Device, LinkSpec
from meshci.cost.geometry import BYTES_PER_VALUE
from meshci.cost.model import CostModel, head_cost
from meshci.errors import PlanningError
from meshci.planning.ablations import plan_edgeci_dp, plan_edgeci_gather
from meshci.planning.aofl import plan_aofl
from meshci.planning.deepthings import plan_deepthings
from meshci.planning.dpfl import DPResult
from meshci.planning.edgeci import plan_edgeci
from meshci.planning.evaluate import TileList, build_plan
from meshci.planning.local import plan_local
from meshci.planning.modnn import plan_modnn
from meshci.planning.plan import STRATEGIES, HeadPlan, Plan
from meshci.trunk import Trunk
from meshci.trunk.region import Region

BlockTiles = list[tuple[int, int, TileList]]

_BASELINES: dict[str, tuple[Callable[[CostModel], BlockTiles], str]] = {
    "local": (plan_local, "p2p"),
    "modnn": (plan_modnn, "requester"),
    "deepthings": (plan_deepthings, "p2p"),
    "aofl": (plan_aofl, "requester"),
}

# EdgeCI and its ablations: a DPFL result and its auction rounds, the routing, the head placed
_EDGECI: dict[str, tuple[Callable[[CostModel], tuple[DPResult, int]], str]] = {
    "edgeci": (plan_edgeci, "p2p"),
    "edgeci-dp": (lambda model: (plan_edgeci_dp(model), 0), "p2p"),
    "edgeci-gather": (plan_edgeci_gather, "requester"),
}


def _dp_blocks(model: CostModel, result: DPResult) -> BlockTiles:
    blocks: BlockTiles = []
    for s, e, layout in result.blocks:
        w = model.tables.widths[e]
        blocks.append((s, e, [(d, Region(a, b, 0, w)) for d, a, b in layout.as_tiles()]))
    return blocks


def choose_head(trunk: Trunk, cluster: Cluster) -> HeadPlan:
    """Where edgeci runs the head: split across the last block's devices when the head
    has a linear prefix (`meshci.trunk.head`), the rest on the device that finishes it
    soonest, the logits' way back to the requester included (the requester on a tie)."""
    cost = head_cost(trunk)
    tail = cost.rest_flops if cost.split else cost.flops
    logits = max(cost.out_features, 1) * BYTES_PER_VALUE
    best = (tail / (cluster.device(cluster.requester).gflops * 1e9), 0, cluster.requester)
    for i, device in enumerate(cluster.devices):
        if device.name != cluster.requester:
            back = cluster.link(device.name, cluster.requester).transfer_s(logits)
            best = min(best, (tail / (device.gflops * 1e9) + back, i + 1, device.name))
    return HeadPlan(best[2], cost.split)


def make_plan(trunk: Trunk, cluster: Cluster, strategy: str, model: CostModel | None = None) -> Plan:
    """The plan of ``strategy`` for ``trunk`` on ``cluster``, with predicted finish times
    and latency under the cost model (`meshci.cost.model`) and the planning time. The
    baselines run the head on the requester, as their authors do; edgeci and its
    ablations (`meshci.planning.ablations`) place it (`choose_head`)."""
    if strategy not in STRATEGIES:
        raise PlanningError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    t0 = time.perf_counter()
    if strategy in _EDGECI:
        head = choose_head(trunk, cluster)
        if model is None or model.cluster is not cluster or model.head_device != cluster.index(head.device):
            model = CostModel(trunk, cluster, head.device, head.split)
        planner, routing = _EDGECI[strategy]
        result, rounds = planner(model)
        blocks = _dp_blocks(model, result)
        per_block = [rounds if lay.key != "requester" else 0 for _, _, lay in result.blocks]
        planning_ms = (time.perf_counter() - t0) * 1e3
        plan = build_plan(trunk, cluster, strategy, blocks, routing, planning_ms, model, per_block, head)
        return _with_rounds(plan, rounds)
    if model is None or model.cluster is not cluster or model.head_device != model.requester:
        model = CostModel(trunk, cluster)
    builder, routing = _BASELINES[strategy]
    blocks = builder(model)
    planning_ms = (time.perf_counter() - t0) * 1e3
    return build_plan(trunk, cluster, strategy, blocks, routing, planning_ms, model)


def _with_rounds(plan: Plan, rounds: int) -> Plan:
    """The request's auction covers all its blocks: the plan's rounds are that auction's."""
    return Plan(
        plan.strategy,
        plan.model,
        plan.input_shape,
        plan.requester,
        plan.blocks,
        plan.routing,
        plan.predicted_latency_s,
        plan.planning_ms,
        rounds,
        plan.head,
    )


def default_cluster(n_devices: int) -> Cluster:
    """A homogeneous cluster of Pi 4 class devices on a 100 Mbit/s switch."""
    if n_devices < 1:
        raise PlanningError(f"need at least one device, got {n_devices}")
    devices = tuple(Device(f"dev{i}", 6.0, 2048) for i in range(n_devices))
    return Cluster(devices, LinkSpec(100.0, 2.0), {}, "switched", devices[0].name)


def auto_cuts(trunk: Trunk, n_devices: int) -> list[int]:
    """DPFL's cuts (block starts after the first) for a default homogeneous cluster of
    ``n_devices`` (see `default_cluster`)."""
    return make_plan(trunk, default_cluster(n_devices), "edgeci").cuts
