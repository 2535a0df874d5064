"""Event-driven replay of a plan: device compute queues and link or medium contention.

The planner's cost model runs blocks one after another with a barrier at each boundary;
the simulator does not: a tile starts as soon as its device is free and every message it
needs has arrived, and a message leaves as soon as the tile it carries is done and its
channel is free. So it shows the overlap that the real mesh gets and the contention that
many devices on one WiFi cell suffer, for 2 to 64 devices (or more).

Tasks and what they wait for:

* ``compute(b, d)``: device ``d``'s tiles of block ``b`` (compute incl. halo, from the cost
  model's per-device speed). Waits for the messages carrying its input rows, and for its
  own previous compute where it holds rows itself. Runs on device ``d`` (one at a time;
  the device is busy with its backlog first).
* ``message(src -> dst)``: bytes at a boundary: p2p the overlap of what ``src``'s tiles
  produced and what ``dst``'s tiles need; under requester routing every output goes to
  the requester (gather) and the requester sends each device its input (scatter) as soon
  as the rows it needs have arrived; after the last block every output goes to the
  requester. Occupies its channel for bytes / bandwidth, arrives one latency later. The
  channel is the directed link (``switched``) or the one shared medium (``shared``).
* ``head``: on the plan's head device, after the whole trunk output (or every tile's part
  of a split head) has arrived; its logits' way back to the requester included.

Each resource serves its waiting tasks in the order they became ready (FIFO). The event
loop is a heap of (time, sequence) events; everything is deterministic.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field

from meshci.cost.cluster import Cluster
from meshci.cost.geometry import BYTES_PER_VALUE
from meshci.cost.model import CostModel
from meshci.planning.plan import Plan
from meshci.trunk import Trunk
from meshci.trunk.region import Region


@dataclass
class _Task:
    name: str
    resource: str
    duration: float
    latency: float = 0.0  # after the resource is released, until dependents may start
    n_bytes: int = 0
    deps_left: int = 0
    dependents: list[int] = field(default_factory=list)
    ready_at: float = 0.0
    start: float | None = None
    done: float | None = None


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of one replay.

    latency_s: when the head finished on the requester. block_finish_s: per block, device
    -> when its compute for that block finished. busy_s: compute seconds per device.
    bytes_moved / messages: traffic over all channels. channel_busy_s: per channel.
    """

    strategy: str
    latency_s: float
    predicted_latency_s: float
    block_finish_s: tuple[dict[str, float], ...]
    busy_s: dict[str, float]
    bytes_moved: int
    messages: int
    channel_busy_s: dict[str, float]
    events: int

    def to_json(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "latency_s": self.latency_s,
            "predicted_latency_s": self.predicted_latency_s,
            "blocks": [{"finish_s": f} for f in self.block_finish_s],
            "busy_s": self.busy_s,
            "utilisation": {d: (b / self.latency_s if self.latency_s > 0 else 0.0) for d, b in self.busy_s.items()},
            "bytes_moved": self.bytes_moved,
            "messages": self.messages,
            "channel_busy_s": self.channel_busy_s,
            "events": self.events,
        }


class _Graph:
    def __init__(self) -> None:
        self.tasks: list[_Task] = []

    def add(self, task: _Task, deps: list[int]) -> int:
        tid = len(self.tasks)
        self.tasks.append(task)
        unique = sorted(set(deps))
        task.deps_left = len(unique)
        for dep in unique:
            self.tasks[dep].dependents.append(tid)
        return tid


def _channel(cluster: Cluster, src: str, dst: str) -> str:
    return "medium" if cluster.medium == "shared" else f"{src}->{dst}"


def build_tasks(
    trunk: Trunk, cluster: Cluster, plan: Plan, model: CostModel
) -> tuple[_Graph, list[dict[str, int]], int]:
    """The task graph of a plan: (graph, per block device -> compute task, head task)."""
    graph = _Graph()
    names = cluster.names
    index = {n: i for i, n in enumerate(names)}
    req = cluster.requester
    tables = model.tables

    def message(src: str, dst: str, n_bytes: int, deps: list[int], label: str) -> int:
        spec = cluster.link(src, dst)
        occupancy = n_bytes * 8.0 / (spec.mbps * 1e6)
        task = _Task(label, _channel(cluster, src, dst), occupancy, spec.latency_ms / 1000.0, n_bytes)
        return graph.add(task, deps)

    # holders of the current boundary: (device, region it holds, task that produced it or None)
    full0 = Region.full(tables.heights[0], tables.widths[0])
    holders: list[tuple[str, Region, int | None]] = [(req, full0, None)]
    computes: list[dict[str, int]] = []
    for b, block in enumerate(plan.blocks):
        s, e = block.start, block.end
        c_in = tables.channels[s] * BYTES_PER_VALUE
        gate = tables.gate_bytes[s]  # an SE gate: every holder's partial sums, whatever it holds
        by_device: dict[str, list[Region]] = defaultdict(list)
        for tile in block.tiles:
            by_device[tile.device].append(tile.region)
        this: dict[str, int] = {}
        for dev, regions in by_device.items():
            needs = [model.input_region(s, e, r) for r in regions]
            deps: list[int] = []
            per_src: dict[str, tuple[int, list[int]]] = {}
            for h_dev, have, producer in holders:
                overlap = sum(
                    (need.intersect(have) or Region(0, 0, 0, 0)).area for need in needs
                )
                if overlap == 0 and not gate:
                    continue
                if h_dev == dev:
                    if producer is not None:
                        deps.append(producer)
                    continue
                n_bytes, producers = per_src.get(h_dev, (gate, []))
                per_src[h_dev] = (n_bytes + overlap * c_in, producers + ([producer] if producer is not None else []))
            for h_dev, (n_bytes, producers) in per_src.items():
                deps.append(message(h_dev, dev, n_bytes, producers, f"b{b} {h_dev}->{dev}"))
            d = index[dev]
            duration = sum(model.tile_compute(d, s, e, r) for r in regions)
            if b == len(plan.blocks) - 1 and model.head_split:  # the tiles' parts of the head
                duration += sum(model.head.prefix_share(r, tables.heights[e]) for r in regions) / model.speed[d]
            this[dev] = graph.add(_Task(f"b{b} compute {dev}", f"cpu:{dev}", duration), deps)
        computes.append(this)
        last = b == len(plan.blocks) - 1
        outputs = [(t.device, t.region, this[t.device]) for t in block.tiles]
        if plan.routing == "requester" or last:
            # gather: every output tile to the requester (after the last block: to the
            # head device, or, split, each tile's part of the head)
            dest = names[model.head_device] if last else req
            c_out = tables.channels[e] * BYTES_PER_VALUE
            gathered: list[tuple[str, Region, int | None]] = []
            per_dev: dict[str, tuple[int, list[Region]]] = {}
            for dev, region, _ in outputs:
                n_bytes, regs = per_dev.get(dev, (0, []))
                size = int(model.final_bytes) if last and model.head_split else region.area * c_out
                per_dev[dev] = (n_bytes + size, regs + [region])
            for dev, (n_bytes, regs) in per_dev.items():
                producer = this[dev]
                if dev != dest:
                    producer = message(dev, dest, n_bytes, [this[dev]], f"b{b} gather {dev}->{dest}")
                gathered.extend((dest, r, producer) for r in regs)
            holders = gathered
        else:
            holders = outputs
    head_deps = [p for _, _, p in holders if p is not None]
    # the (rest of the) head on the head device, its logits' way back included
    head = graph.add(_Task("head", f"cpu:{names[model.head_device]}", model.head_s), head_deps)
    return graph, computes, head


def run(graph: _Graph, backlog: dict[str, float]) -> int:
    """Run the event loop over the task graph; returns the number of events."""
    tasks = graph.tasks
    events: list[tuple[float, int, str, int | str]] = []
    seq = 0

    def push(t: float, kind: str, ref: int | str) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, ref))
        seq += 1

    waiting: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    busy_until: dict[str, float] = {}
    busy: set[str] = set()
    for dev, until in backlog.items():
        if until > 0:
            busy.add(f"cpu:{dev}")
            push(until, "free", f"cpu:{dev}")
    for tid, task in enumerate(tasks):
        if task.deps_left == 0:
            push(0.0, "ready", tid)
    count = 0

    def start_next(resource: str, now: float) -> None:
        queue = waiting[resource]
        if resource in busy or not queue:
            return
        _, _, tid = heapq.heappop(queue)
        task = tasks[tid]
        task.start = now
        busy.add(resource)
        busy_until[resource] = now + task.duration
        push(now + task.duration, "free", resource)
        push(now + task.duration + task.latency, "done", tid)

    while events:
        now, _, kind, ref = heapq.heappop(events)
        count += 1
        if kind == "ready":
            task = tasks[int(ref)]
            task.ready_at = now
            heapq.heappush(waiting[task.resource], (now, int(ref), int(ref)))
            start_next(task.resource, now)
        elif kind == "free":
            busy.discard(str(ref))
            start_next(str(ref), now)
        else:  # done
            task = tasks[int(ref)]
            task.done = now
            for dep in task.dependents:
                tasks[dep].deps_left -= 1
                if tasks[dep].deps_left == 0:
                    push(now, "ready", dep)
    return count


def simulate_plan(
    trunk: Trunk, cluster: Cluster, plan: Plan, model: CostModel | None = None
) -> SimulationResult:
    """Replay ``plan`` on ``cluster`` event by event (module docstring)."""
    head = plan.head_plan
    model = model or CostModel(trunk, cluster, head.device, head.split)
    graph, computes, head = build_tasks(trunk, cluster, plan, model)
    n_events = run(graph, {d.name: d.backlog_s for d in cluster.devices})
    tasks = graph.tasks
    unfinished = [t.name for t in tasks if t.done is None]
    if unfinished:
        raise RuntimeError(f"simulation left tasks unfinished: {unfinished[:3]}")
    busy: dict[str, float] = {name: 0.0 for name in plan.devices}
    channel_busy: dict[str, float] = defaultdict(float)
    n_bytes = 0
    messages = 0
    for task in tasks:
        if task.resource.startswith("cpu:"):
            busy[task.resource[4:]] = busy.get(task.resource[4:], 0.0) + task.duration
        else:
            messages += 1
            n_bytes += task.n_bytes
            channel_busy[task.resource] += task.duration
    block_finish = tuple(
        {dev: float(tasks[tid].done) for dev, tid in c.items()} for c in computes  # type: ignore[arg-type]
    )
    return SimulationResult(
        strategy=plan.strategy,
        latency_s=float(tasks[head].done),  # type: ignore[arg-type]
        predicted_latency_s=plan.predicted_latency_s,
        block_finish_s=block_finish,
        busy_s=busy,
        bytes_moved=n_bytes,
        messages=messages,
        channel_busy_s=dict(channel_busy),
        events=n_events,
    )
