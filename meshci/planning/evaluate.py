"""Predicted latency of any plan under the cost model, and plans from given assignments.

`evaluate_plan` is the single judge every strategy is measured by (see
`meshci.cost.model` for the model). `plan_from_assignment` is what the mesh node uses
after it ran the real auction over the network: it turns the blocks and the per-block
device -> rows (or region) assignment into a `Plan` with predicted finish times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshci.cost.cluster import Cluster
from meshci.cost.model import CostModel
from meshci.errors import PlanningError
from meshci.planning.plan import BlockPlan, HeadPlan, Plan, TileSpec
from meshci.trunk import Trunk
from meshci.trunk.region import Region

TileList = Sequence[tuple[int, Region]]


def timeline(
    model: CostModel, blocks: Sequence[tuple[int, int, TileList]], routing: str
) -> tuple[float, list[dict[int, float]]]:
    """Latency and per-block finish times (device index -> seconds) of tiles given by
    device index."""
    n_blocks = len(blocks)
    t = 0.0
    holders: TileList | None = None
    finishes: list[dict[int, float]] = []
    for b, (start, end, tiles) in enumerate(blocks):
        last = b == n_blocks - 1
        gather = last or routing == "requester"
        timing = model.tiles_block(t, start, end, tiles, None if routing == "requester" else holders, gather)
        finishes.append(timing.finish)
        t = timing.end
        holders = tiles
    return t + model.head_s, finishes


def _check(trunk: Trunk, cluster: Cluster, plan: Plan) -> None:
    if plan.blocks[-1].end != len(trunk.segments):
        raise PlanningError(
            f"plan covers segments up to {plan.blocks[-1].end}, the trunk has {len(trunk.segments)}"
        )
    names = set(cluster.names)
    for block in plan.blocks:
        for tile in block.tiles:
            if tile.device not in names:
                raise PlanningError(f"plan names device {tile.device!r}, not in the cluster")
    if plan.requester != cluster.requester:
        raise PlanningError(f"plan is for requester {plan.requester!r}, the cluster's is {cluster.requester!r}")


def evaluate_plan(
    trunk: Trunk, cluster: Cluster, plan: Plan, model: CostModel | None = None
) -> tuple[float, list[dict[str, float]]]:
    """(predicted latency in seconds, per block the finish time of each of its devices)."""
    _check(trunk, cluster, plan)
    head = plan.head_plan
    if model is None or model.head_device != cluster.index(head.device) or model.head_split != (
            head.split and model.head.split):
        model = CostModel(trunk, cluster, head.device, head.split)
    index = {name: i for i, name in enumerate(cluster.names)}
    blocks = [(b.start, b.end, [(index[t.device], t.region) for t in b.tiles]) for b in plan.blocks]
    latency, finishes = timeline(model, blocks, plan.routing)
    names = cluster.names
    return latency, [{names[d]: v for d, v in f.items()} for f in finishes]


def build_plan(
    trunk: Trunk,
    cluster: Cluster,
    strategy: str,
    blocks: Sequence[tuple[int, int, TileList]],
    routing: str,
    planning_ms: float,
    model: CostModel | None = None,
    rounds: Sequence[int] | None = None,
    head: HeadPlan | None = None,
) -> Plan:
    """A `Plan` from tiles given by device index, with predicted finish times filled in
    (`head`: where the head runs; None: whole, on the requester)."""
    if model is None:
        model = CostModel(trunk, cluster, head.device if head else None, bool(head and head.split))
    latency, finishes = timeline(model, blocks, routing)
    names = cluster.names
    rounds = list(rounds) if rounds is not None else [0] * len(blocks)
    block_plans = tuple(
        BlockPlan(
            start,
            end,
            tuple(TileSpec(names[d], region) for d, region in tiles),
            {names[d]: v for d, v in finish.items()},
            rounds[i],
        )
        for i, ((start, end, tiles), finish) in enumerate(zip(blocks, finishes))
    )
    return Plan(
        strategy=strategy,
        model=trunk.name,
        input_shape=tuple(trunk.input_shape),  # type: ignore[arg-type]
        requester=cluster.requester,
        blocks=block_plans,
        routing=routing,
        predicted_latency_s=latency,
        planning_ms=planning_ms,
        auction_rounds=sum(rounds),
        head=head,
    )


def plan_from_assignment(
    trunk: Trunk,
    cluster: Cluster,
    blocks: Sequence[tuple[int, int]],
    assignments: Sequence[Mapping[str, tuple[int, int] | Region | Sequence[Region]]],
    *,
    strategy: str = "edgeci",
    routing: str = "p2p",
    auction_rounds: Sequence[int] | None = None,
    planning_ms: float = 0.0,
) -> Plan:
    """A `Plan` for the given cut blocks [(start, end), ...] and, per block, which device
    computes which part of its output: ``{device: (r0, r1)}`` (full-width rows), or a
    `Region`, or a list of regions. Devices with an empty part are left out. Raises
    `PlanningError` when the parts do not exactly tile a block's output."""
    if len(blocks) != len(assignments):
        raise PlanningError(f"{len(blocks)} blocks but {len(assignments)} assignments")
    index = {name: i for i, name in enumerate(cluster.names)}
    tile_blocks: list[tuple[int, int, TileList]] = []
    for (start, end), assignment in zip(blocks, assignments):
        _, h, w = trunk.boundary_shape(end)
        tiles: list[tuple[int, Region]] = []
        for name, part in assignment.items():
            if name not in index:
                raise PlanningError(f"assignment names device {name!r}, not in the cluster")
            if isinstance(part, Region):
                regions = [part]
            elif len(part) == 2 and all(isinstance(v, int) for v in part):
                regions = [Region(int(part[0]), int(part[1]), 0, w)]  # type: ignore[index]
            else:
                regions = list(part)  # type: ignore[arg-type]
            tiles.extend((index[name], r) for r in regions if not r.empty)
        area = sum(r.area for _, r in tiles)
        full = Region.full(h, w)
        if area != h * w or any(not full.contains(r) for _, r in tiles) or _overlapping(tiles):
            raise PlanningError(f"block [{start},{end}): the parts do not tile its {h}x{w} output")
        tiles.sort(key=lambda t: (t[1].r0, t[1].c0))
        tile_blocks.append((start, end, tiles))
    plan = build_plan(trunk, cluster, strategy, tile_blocks, routing, planning_ms, rounds=auction_rounds)
    _check(trunk, cluster, plan)
    return plan


def _overlapping(tiles: TileList) -> bool:
    regions = [r for _, r in tiles]
    return any(a.intersect(b) is not None for i, a in enumerate(regions) for b in regions[i + 1 :])
