"""The cost model: predicted time of a plan's blocks on a cluster.

Blocks run one after another; a block starts when the previous one has ended (the
planner's barrier; the simulator in `meshci.simulate` relaxes it). For a block that
starts at time ``t0``:

* **receive**: each device needs the input region of its tiles (its output rows plus the
  halo rows of the fused stack). The data comes from the *holders* of the block's input
  boundary: the requester for the first block and under ``routing="requester"`` (it
  gathered everything), else the devices that computed the previous block's tiles
  (``routing="p2p"``). One message per (holder, device) pair carries the overlap of what
  the holder has and what the device needs; nothing is sent to oneself.
* **compute**: a device starts once its inputs have arrived and its backlog (work it
  already held, ``Device.backlog_s``, counted from the start of the request) is done,
  and computes its tiles including halo rows (redundant work counted).
* **send**: output tiles go to the requester after the last block, and after every block
  under ``routing="requester"`` (MoDNN, AOFL gather at each boundary).
* **medium**: ``switched``: every pair has its own link, transfers run in parallel (a
  device's receive ends with its slowest incoming message). ``shared``: one channel,
  transfers one after another: the receives in order of the devices' compute time
  (longest first), then each send when its device is done and the channel is free.

A block's time is its last device's finish (receive + compute + send); the plan's
latency is the end of the last block plus the head on the requester. The send of one
block is the receive of the next, counted once.

Two properties make the bottom-up DP exact (see `meshci.planning.dpfl`): a block's cost
depends only on its own tiles, on the tiles of the block before it (the holders) and on
its start time, and its end time never decreases when it starts later. The planner's DP
therefore keeps, for every boundary and every candidate layout of the block ending
there, the earliest time it can be reached.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from meshci.cost.cluster import Cluster
from meshci.cost.geometry import BYTES_PER_VALUE, BlockTable, StripTables, strip_tables
from meshci.trunk import Trunk
from meshci.trunk.head import HeadCost
from meshci.trunk.region import Region


@dataclass(frozen=True)
class BlockTiming:
    """Outcome of one block: absolute finish time per device index and the block's end."""

    finish: dict[int, float]
    end: float


def head_cost(trunk: Trunk) -> HeadCost:
    """The trunk's head cost: measured at build (`trunk.head_cost`, when the head itself
    stayed in the build helper) or from its head module."""
    known = getattr(trunk, "head_cost", None)
    if isinstance(known, HeadCost):
        return known
    cost = HeadCost.of(trunk.head, trunk.boundary_shape(len(trunk.segments)))
    try:
        trunk.head_cost = cost  # a trunk's head does not change: cost it once
    except AttributeError:
        pass
    return cost


class CostModel:
    """Cost model of one trunk on one cluster (devices addressed by index in the cluster)."""

    def __init__(self, trunk: Trunk, cluster: Cluster, head_device: str | None = None,
                 split_head: bool = False) -> None:
        self.trunk = trunk
        self.cluster = cluster
        self.tables: StripTables = strip_tables(trunk)
        self.n_devices = len(cluster.devices)
        self.n_segments = self.tables.n_segments
        self.requester = cluster.index(cluster.requester)
        self.shared = cluster.medium == "shared"
        names = cluster.names
        n = self.n_devices
        # every pair on the default link, then the pairs the cluster names (cluster.link's rule)
        default = cluster.default_link
        self.latency = np.full((n, n), default.latency_ms / 1000.0)
        self.sec_per_byte = np.full((n, n), 8.0 / (default.mbps * 1e6))
        index = {name: i for i, name in enumerate(names)}
        for pair, spec in cluster.links.items():
            ends = [index.get(name) for name in pair]
            if len(ends) == 2 and None not in ends:
                i, j = ends
                self.latency[i, j] = self.latency[j, i] = spec.latency_ms / 1000.0
                self.sec_per_byte[i, j] = self.sec_per_byte[j, i] = 8.0 / (spec.mbps * 1e6)
        np.fill_diagonal(self.latency, 0.0)
        np.fill_diagonal(self.sec_per_byte, 0.0)
        self.backlog = np.array([d.backlog_s for d in cluster.devices])
        self.speed = np.array([d.gflops * 1e9 for d in cluster.devices])
        # per-segment (a, b) curves where the device has them for this model, else None
        self.curves: list[np.ndarray | None] = []
        for d in cluster.devices:
            curve = d.curve_for(trunk.name, self.n_segments)
            self.curves.append(None if curve is None else np.array(curve, dtype=np.float64))
        # per tile, beyond its compute (what a boundary costs the device's own CPU)
        self.tile_overhead = np.array([max(0.0, d.tile_overhead_s) for d in cluster.devices])
        # every device by GFLOP/s alone: the planners' fast paths
        self.curves_free = all(c is None for c in self.curves) and not self.tile_overhead.any()
        self._place_head(head_device or cluster.requester, split_head)

    # ---- the head -----------------------------------------------------------------------
    def _place_head(self, device: str, split: bool) -> None:
        """Where the last block's output goes and what follows it. Whole head: the trunk
        output is gathered on the head device. Split head: each last-block strip also
        computes its part of the prefix (its share of bin rows) and sends the head device
        one vector. Then the head device runs the (rest of the) head and sends the logits
        to the requester: `head_s`."""
        self.head = cost = head_cost(self.trunk)
        self.head_device = self.cluster.index(device)
        self.head_split = split and cost.split
        h = self.tables.heights[self.n_segments]
        if self.head_split:
            rows = np.arange(h + 1)
            bins = cost.prefix_rows
            # bin rows touched by [r0, r1): the first bin ending after r0, the last starting before r1
            first = np.array([min((i for i in range(bins) if -(-((i + 1) * h) // bins) > r), default=bins)
                              for r in rows])
            last = np.array([max((i + 1 for i in range(bins) if (i * h) // bins < r), default=0) for r in rows])
            self._bins_lo, self._bins_hi = first, last
            self.final_bytes = float(cost.out_features * BYTES_PER_VALUE)
            tail = cost.rest_flops
        else:
            tail = cost.flops
        d = self.head_device
        logits = max(cost.out_features, 1) * BYTES_PER_VALUE
        back = 0.0 if d == self.requester else self.latency[d, self.requester] + logits * self.sec_per_byte[d, self.requester]
        self.head_s = tail / self.speed[d] + back

    def prefix_seconds(self, devices: np.ndarray, r0: np.ndarray, r1: np.ndarray) -> np.ndarray:
        """Seconds for each last-block strip to compute its part of the split head (0 when
        the head is not split)."""
        if not self.head_split:
            return np.zeros(np.asarray(devices).size)
        touched = np.maximum(self._bins_hi[r1] - self._bins_lo[r0], 0)
        return self.head.prefix_flops * touched / self.head.prefix_rows / self.speed[devices]

    def final_send_seconds(self, dests: np.ndarray, out_bytes: np.ndarray, parts: np.ndarray | int = 1) -> np.ndarray:
        """Seconds for each device to send its last-block output `out_bytes` (or, split,
        its `parts` parts of the head) to the head device (0 from itself)."""
        d = self.head_device
        n_bytes = self.final_bytes * np.broadcast_to(parts, np.shape(dests)) if self.head_split else out_bytes
        lat = self.latency[dests, d]
        spb = self.sec_per_byte[dests, d]
        return np.where((n_bytes > 0) & (dests != d), lat + n_bytes * spb, 0.0)

    # ---- compute time -------------------------------------------------------------------
    def strip_compute(self, block: BlockTable, r0: np.ndarray, r1: np.ndarray) -> np.ndarray:
        """Seconds for every device (rows) to compute every strip [r0, r1) (columns)."""
        r0 = np.asarray(r0)
        r1 = np.asarray(r1)
        flops = block.flops(r0, r1)
        times = flops[None, :] / self.speed[:, None]
        for d, curve in enumerate(self.curves):
            if curve is not None:
                seg = curve[block.start : block.end]
                rows = block.rows_hi[:, r1] - block.rows_lo[:, r0]  # [segments, strips]
                times[d] = seg[:, 0].sum() + seg[:, 1] @ rows
        times += self.tile_overhead[:, None]
        empty = r1 <= r0
        if empty.any():
            times[:, empty] = 0.0
        return times

    def input_region(self, start: int, end: int, out: Region) -> Region:
        if out.c0 == 0 and out.c1 == self.tables.widths[end]:
            r0, r1 = self.tables.block(start, end).input_rows(out.r0, out.r1)
            return Region(r0, r1, 0, self.tables.widths[start])
        return self.tables.chain(start, end, out)[0][0]

    def tile_compute_all(self, start: int, end: int, out: Region) -> np.ndarray:
        """Seconds for every device to compute ``out`` of block [start, end) incl. halo."""
        if any(c is not None for c in self.curves):
            return np.array([self.tile_compute(d, start, end, out) for d in range(self.n_devices)])
        if out.empty:
            return np.zeros(self.n_devices)
        if out.c0 == 0 and out.c1 == self.tables.widths[end]:
            block = self.tables.block(start, end)
            return self.strip_compute(block, np.array([out.r0]), np.array([out.r1]))[:, 0]
        return self.tables.chain(start, end, out)[1] / self.speed + self.tile_overhead

    def tile_compute(self, device: int, start: int, end: int, out: Region) -> float:
        """Seconds for ``device`` to compute ``out`` of block [start, end) incl. halo."""
        if out.empty:
            return 0.0
        if out.c0 == 0 and out.c1 == self.tables.widths[end]:
            block = self.tables.block(start, end)
            if self.curves[device] is None:  # strip_compute's entry, without the matrix
                return float(block.flops(out.r0, out.r1) / self.speed[device] + self.tile_overhead[device])
            return float(self.strip_compute(block, np.array([out.r0]), np.array([out.r1]))[device, 0])
        regions, flops = self.tables.chain(start, end, out)
        curve = self.curves[device]
        if curve is None:
            return flops / self.speed[device] + float(self.tile_overhead[device])
        total = float(self.tile_overhead[device])
        for k in range(start, end):
            region = regions[k - start + 1]
            total += curve[k, 0] + curve[k, 1] * region.area / self.tables.widths[k + 1]
        return total

    # ---- transfers ------------------------------------------------------------------------
    def transfer_matrix(self, n_bytes: np.ndarray, sources: np.ndarray, dests: np.ndarray) -> np.ndarray:
        """Seconds per message: ``n_bytes[i, j]`` from ``sources[j]`` to ``dests[i]`` (0 if none)."""
        lat = self.latency[sources[None, :], dests[:, None]]
        spb = self.sec_per_byte[sources[None, :], dests[:, None]]
        return np.where(n_bytes > 0, lat + n_bytes * spb, 0.0)

    def block_timing(
        self,
        t0: float,
        dests: np.ndarray,
        comp: np.ndarray,
        recv: np.ndarray,
        send: np.ndarray,
    ) -> tuple[np.ndarray, float]:
        """Finish time per device of a block that starts at ``t0``.

        ``dests``: device indices taking part (distinct); ``comp``: their compute seconds;
        ``recv[i, j]``: seconds of the message from holder j to ``dests[i]`` (0: none);
        ``send``: seconds of each device's output message to the requester (0: none).
        """
        n = dests.size
        if self.shared:
            per_dest = recv.sum(axis=1)
            order = np.lexsort((np.arange(n), -comp))
            done = np.empty(n)
            done[order] = t0 + np.cumsum(per_dest[order])
            done = np.where(per_dest > 0, done, t0)
            channel = t0 + float(per_dest.sum())
        else:
            done = t0 + (recv.max(axis=1) if recv.size else np.zeros(n))
            channel = t0
        start = np.maximum(done, self.backlog[dests])
        finish = start + comp
        if send.any():
            finish = finish.copy()
            if self.shared:
                for i in np.lexsort((np.arange(n), finish)):
                    if send[i] > 0:
                        channel = max(channel, finish[i]) + send[i]
                        finish[i] = channel
            else:
                finish = finish + send
        return finish, float(finish.max()) if n else t0

    def send_seconds(self, dests: np.ndarray, n_bytes: np.ndarray) -> np.ndarray:
        """Seconds for each device to send ``n_bytes`` to the requester (0 from itself)."""
        req = self.requester
        lat = self.latency[dests, req]
        spb = self.sec_per_byte[dests, req]
        return np.where((n_bytes > 0) & (dests != req), lat + n_bytes * spb, 0.0)

    # ---- strip blocks (fast path used by the DP) -------------------------------------------
    def strip_block(
        self,
        t0: float,
        start: int,
        end: int,
        devices: np.ndarray,
        r0: np.ndarray,
        r1: np.ndarray,
        holders: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
        gather: bool,
        comp: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float]:
        """Timing of a block of full-width strips, one strip per device.

        ``holders``: (devices, r0, r1) of the previous block's strips, or None when the
        requester holds the whole input. ``gather``: outputs go to the requester after.
        ``comp``: precomputed compute seconds per strip (else computed here).
        """
        block = self.tables.block(start, end)
        row_bytes = self.tables.row_bytes[start]
        lo = block.in_lo[r0]
        hi = block.in_hi[r1]
        if comp is None:
            comp = self.strip_compute(block, r0, r1)[devices, np.arange(devices.size)]
        if holders is None:
            src = np.array([self.requester])
            n_bytes = ((hi - lo) * row_bytes).astype(np.float64)[:, None]
            n_bytes[devices == self.requester] = 0.0
        else:
            src, h0, h1 = holders
            rows = np.minimum(hi[:, None], h1[None, :]) - np.maximum(lo[:, None], h0[None, :])
            n_bytes = np.clip(rows, 0, None).astype(np.float64) * row_bytes
            n_bytes[devices[:, None] == src[None, :]] = 0.0
        recv = self.transfer_matrix(n_bytes, src, devices)
        if gather:
            out_bytes = ((r1 - r0) * self.tables.row_bytes[end]).astype(np.float64)
            if end == self.n_segments:
                comp = comp + self.prefix_seconds(devices, r0, r1)
                send = self.final_send_seconds(devices, out_bytes)
            else:
                send = self.send_seconds(devices, out_bytes)
        else:
            send = np.zeros(devices.size)
        return self.block_timing(t0, devices, comp, recv, send)

    # ---- any tiles (generic path used to evaluate plans) -----------------------------------
    def tiles_block(
        self,
        t0: float,
        start: int,
        end: int,
        tiles: Sequence[tuple[int, Region]],
        holders: Sequence[tuple[int, Region]] | None,
        gather: bool,
    ) -> BlockTiming:
        """Timing of a block given as (device index, output region) tiles.

        Several tiles may share a device (DeepThings grids): their inputs arrive as one
        message per holder, their compute adds up, their outputs leave as one message.
        """
        devices = sorted({d for d, _ in tiles})
        pos = {d: i for i, d in enumerate(devices)}
        dests = np.array(devices, dtype=np.int64)
        comp = np.zeros(len(devices))
        out_bytes = np.zeros(len(devices))
        channels_in = self.tables.channels[start] * BYTES_PER_VALUE
        channels_out = self.tables.channels[end] * BYTES_PER_VALUE
        if holders is None:
            holders = [(self.requester, Region.full(self.tables.heights[start], self.tables.widths[start]))]
        src_devices = sorted({d for d, _ in holders})
        src_pos = {d: j for j, d in enumerate(src_devices)}
        n_bytes = np.zeros((len(devices), len(src_devices)))
        # holders by first row: only those starting above a tile's input end can overlap
        # it, and when their last rows are in order too, only those ending below its start
        held = sorted(((have.r0, have.r1, have.c0, have.c1, h) for h, have in holders), key=lambda x: x[0])
        starts = [x[0] for x in held]
        ends = [x[1] for x in held]
        ends_sorted = all(a <= b for a, b in zip(ends, ends[1:]))
        final = end == self.n_segments
        for d, out in tiles:
            i = pos[d]
            comp[i] += self.tile_compute(d, start, end, out)
            out_bytes[i] += out.area * channels_out
            if final and self.head_split:
                comp[i] += self.head.prefix_share(out, self.tables.heights[end]) / self.speed[d]
            need = self.input_region(start, end, out)
            first = bisect.bisect_right(ends, need.r0) if ends_sorted else 0
            for hr0, hr1, hc0, hc1, h in held[first : bisect.bisect_left(starts, need.r1)]:
                if h == d:
                    continue
                # Region.intersect's overlap, as integers (byte counts add up exactly)
                r0, r1 = max(need.r0, hr0), min(need.r1, hr1)
                c0, c1 = max(need.c0, hc0), min(need.c1, hc1)
                if r0 < r1 and c0 < c1:
                    n_bytes[i, src_pos[h]] += (r1 - r0) * (c1 - c0) * channels_in
        recv = self.transfer_matrix(n_bytes, np.array(src_devices, dtype=np.int64), dests)
        if not gather:
            send = np.zeros(len(devices))
        elif final:  # a split head: one part per tile
            parts = np.array([sum(1 for d, _ in tiles if d == dev) for dev in devices])
            send = self.final_send_seconds(dests, out_bytes, parts)
        else:
            send = self.send_seconds(dests, out_bytes)
        finish, end_t = self.block_timing(t0, dests, comp, recv, send)
        return BlockTiming({d: float(finish[pos[d]]) for d in devices}, end_t)
