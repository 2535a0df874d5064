"""What a block boundary really costs a node, measured (sans-IO: callers pass times).

The planner trades the number of fused blocks against the cost of each boundary, so the
live `Cluster` must carry what a boundary costs here, not a wire constant:

* **delivery**: the one-way time of a tile message from the sender's send call to the
  moment this node's handler has it decoded (framing, MAC, the kernel, the event loop's
  scheduling), less the bytes' wire time. The sender stamps its wall clock; the peers'
  clock offsets come from heartbeat echoes (NTP-style: the peer's wall clock at the echo
  against the middle of the round trip, from the round trip with the smallest RTT seen
  recently), so the figure holds between machines whose clocks differ.
* **handling**: per tile, the time between the moment a tile's input is complete and
  the moment its output is back on the event loop, less the compute itself (hand-off to
  the compute thread and back, waiting for the loop).

Both are EWMAs. `link_latency_ms` gives what a link's messages cost to the planner (the
delivery); the handling is advertised as the node's per-tile overhead (`Advert.tile_ms`,
`Device.tile_overhead_s`): the cost model charges it for every tile the device runs.

`PlanCalibration` closes the loop on a requester: from its own completed requests it
learns how far the live model's prediction for the plan that ran was from the measured
time (per device's compute, and per link crossing, `plan_hops`) and corrects the cluster
it plans on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from meshci.cost.cluster import Cluster, Device, LinkSpec
from meshci.planning.plan import Plan

OFFSET_WINDOW = 8  # clock-offset samples kept per peer (the smallest-RTT one is used)
OUTLIER_FACTOR = 3.0  # a delivery sample counts at most this times the estimate ...
OUTLIER_FLOOR_S = 0.002  # ... plus this


@dataclass
class BoundaryCosts:
    """EWMA per-message delivery per peer and per-tile handling of this node."""

    alpha: float = 0.2
    _delivery_s: dict[str, float] = field(default_factory=dict)
    _offsets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # peer -> [(rtt, offset)]
    handling_s: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")

    def _ewma(self, old: float | None, sample: float) -> float:
        return sample if old is None else (1.0 - self.alpha) * old + self.alpha * sample

    # ---- clocks ----------------------------------------------------------------------
    def observe_echo(self, peer: str, rtt_s: float, peer_wall: float, my_wall_now: float) -> None:
        """A heartbeat echo: it left `rtt_s` ago, the peer stamped `peer_wall` when it
        answered; `my_wall_now` is this node's wall clock on arrival."""
        if not (math.isfinite(rtt_s) and math.isfinite(peer_wall) and rtt_s >= 0):
            return
        offset = peer_wall - (my_wall_now - rtt_s / 2.0)  # peer's clock minus ours
        samples = self._offsets.setdefault(peer, [])
        samples.append((rtt_s, offset))
        del samples[:-OFFSET_WINDOW]

    def clock_offset(self, peer: str) -> float | None:
        """The peer's wall clock minus ours (None before any echo)."""
        samples = self._offsets.get(peer)
        if not samples:
            return None
        return min(samples)[1]

    # ---- samples ---------------------------------------------------------------------
    def observe_delivery(self, peer: str, sent_wall: float, handled_wall: float, wire_s: float = 0.0,
                         loop_free_wall: float = 0.0) -> None:
        """A message stamped `sent_wall` by `peer` reached its handler at `handled_wall`
        (this node's clock); `wire_s`: the part that is bandwidth (bytes over the link);
        `loop_free_wall`: when this node's event loop last came back from computing a tile
        on it (waiting behind this node's own compute is compute, not the link's cost)."""
        offset = self.clock_offset(peer)
        if offset is None or not (math.isfinite(sent_wall) and math.isfinite(handled_wall)):
            return  # no clock offset yet: the sample would be meaningless between machines
        began = max(sent_wall - offset, loop_free_wall)
        sample = max(0.0, handled_wall - began - max(0.0, wire_s))
        old = self._delivery_s.get(peer)
        if old is not None:  # one message stuck behind a long compute moves the estimate, not leaps it
            sample = min(sample, OUTLIER_FACTOR * old + OUTLIER_FLOOR_S)
        self._delivery_s[peer] = self._ewma(old, sample)

    def observe_handling(self, seconds: float) -> None:
        """A tile's wall time from complete input to output on the loop, less its compute."""
        if math.isfinite(seconds):
            self.handling_s = self._ewma(self.handling_s, max(0.0, seconds))

    # ---- answers ---------------------------------------------------------------------
    def delivery_s(self, peer: str) -> float | None:
        return self._delivery_s.get(peer)

    def link_latency_ms(self, peer: str, fallback_ms: float) -> float:
        """Per-message latency of the link to `peer` as the planner should see it: measured
        delivery, or `fallback_ms` before any. (The per-tile handling is the device's own
        cost, charged per tile: `Device.tile_overhead_s`.)"""
        delivery = self._delivery_s.get(peer)
        return fallback_ms if delivery is None else delivery * 1000.0

    def peers(self) -> list[str]:
        return sorted(self._delivery_s)

    def forget(self, peer: str) -> None:
        self._delivery_s.pop(peer, None)
        self._offsets.pop(peer, None)


def plan_hops(plan: Plan) -> int:
    """Link crossings on a plan's critical path: the input leaving the requester, each
    block boundary where the data changes hands or devices trade halos (a boundary
    through the requester under requester routing counts twice: gather, then scatter),
    and the output coming back. 0 for a plan that runs on the requester alone."""
    requester = plan.requester
    holders = frozenset((requester,))
    hops = 0
    last = len(plan.blocks) - 1
    for i, block in enumerate(plan.blocks):
        devices = frozenset(block.devices)
        if devices != holders or len(devices) > 1:
            hops += 1
        holders = devices
        if plan.routing == "requester" and i < last and holders != {requester}:
            hops += 1  # gathered on the requester before the next block
            holders = frozenset((requester,))
    if holders != {requester}:
        hops += 1
    return hops


@dataclass
class PlanCalibration:
    """What the live cost model gets wrong, learned by a requester from its own completed,
    warm requests (sans-IO: callers pass the predictions and the measured time).

    Two terms, both EWMAs:

    * **compute ratio per device**: from a request whose tiles all ran on one device,
      measured trunk time / the uncorrected model's prediction for its plan. The device's
      curves (and GFLOP/s) are scaled by it (its measured curves come from timed runs in
      the node's own process; a request's real compute under the cgroup differs).
    * **per hop, per strategy**: from a request whose tiles ran on several devices, (measured
      - the prediction with the compute ratios applied) / `plan_hops`, added to every link's
      per-message latency when that strategy plans: what its boundaries cost beyond the
      measured links. Kept per strategy: what the model misses differs between layouts (a
      straggler in a few fused blocks, a gather per layer), and one term shared by all would
      charge a strategy with many hops (modnn's layer-wise gathers: 25 on ResNet-34) for
      what a strategy with three missed (measured: modnn predicted 1.9x its latency).

    The planner's cluster is `apply(raw, strategy)`; every strategy gets the same learning. Learning
    is against predictions made without the term being learned, so applying a term does
    not feed back into it. A simplification: whatever the model misses on a multi-device
    plan beyond the compute ratios (small tiles, a worker's own event loop, waiting on a
    slow device) is charged to its hops."""

    alpha: float = 0.3
    per_hop_s: dict[str, float] = field(default_factory=dict)  # strategy -> seconds per hop
    hop_samples: int = 0
    compute_ratio: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")

    def observe(self, computing: frozenset[str], hops: int, raw_predicted_s: float,
                scaled_predicted_s: float, measured_s: float, strategy: str = "") -> tuple[str, float] | None:
        """Learn from one warm request. `computing`: the devices that computed its tiles;
        `raw_predicted_s`: the uncorrected model's prediction for its plan;
        `scaled_predicted_s`: the same with the compute ratios applied (`scaled`).
        Returns what was learned: ("ratio", sample) or ("hop", seconds), or None."""
        if not all(math.isfinite(v) and v > 0 for v in (raw_predicted_s, scaled_predicted_s, measured_s)):
            return None
        if len(computing) == 1:
            (device,) = computing
            sample = measured_s / raw_predicted_s
            old = self.compute_ratio.get(device)
            self.compute_ratio[device] = sample if old is None else (1.0 - self.alpha) * old + self.alpha * sample
            return ("ratio", sample)
        if hops <= 0:
            return None
        sample = (measured_s - scaled_predicted_s) / hops
        old = self.per_hop_s.get(strategy)
        self.per_hop_s[strategy] = sample if old is None else (1.0 - self.alpha) * old + self.alpha * sample
        self.hop_samples += 1
        return ("hop", sample)

    def extra_latency_ms(self, strategy: str = "") -> float:
        """Milliseconds to add to each link's per-message latency when `strategy` plans (0
        before any sample of it)."""
        return self.per_hop_s.get(strategy, 0.0) * 1000.0

    def scaled(self, cluster: Cluster) -> Cluster:
        """`cluster` with each device's compute scaled by its learned ratio."""
        if not self.compute_ratio:
            return cluster
        return replace(cluster, devices=tuple(scale_device(d, self.compute_ratio.get(d.name, 1.0))
                                              for d in cluster.devices))

    def apply(self, cluster: Cluster, strategy: str = "") -> Cluster:
        """The cluster `strategy` plans on: compute ratios and its per-hop latency applied."""
        return with_extra_latency(self.scaled(cluster), self.extra_latency_ms(strategy))


def scale_device(device: Device, ratio: float) -> Device:
    """`device` whose tiles take `ratio` times as long (curves scaled, GFLOP/s divided)."""
    if ratio == 1.0:
        return device
    curves = tuple((model, tuple((a * ratio, b * ratio) for a, b in curve)) for model, curve in device.curves)
    return replace(device, gflops=device.gflops / ratio, curves=curves)


def with_extra_latency(cluster: Cluster, extra_ms: float) -> Cluster:
    """`cluster` with `extra_ms` added to every link's per-message latency (the default
    link's too), none below 0."""
    if extra_ms == 0.0:
        return cluster

    def shift(spec: LinkSpec) -> LinkSpec:
        return LinkSpec(spec.mbps, max(0.0, spec.latency_ms + extra_ms))

    links = {pair: shift(spec) for pair, spec in cluster.links.items()}
    return replace(cluster, default_link=shift(cluster.default_link), links=links)
