"""The life of one request inside the mesh, as pure state machines (sans-IO).

Two sides:

* `RequesterRun` — on the node that received the request (the auctioneer). Once the
  plan is fixed it cuts the input into the first block's tiles, gathers the last
  block's output (and, for `routing="requester"` strategies such as MoDNN and AOFL,
  every intermediate boundary, which it re-scatters), and says when the trunk output
  is complete.
* `WorkerRun` — on every node that holds tiles of the plan. It waits until the pieces
  it has received cover a tile's input region, asks for the tile to be computed, and
  sends each next-block tile's device exactly the intersection of its output with
  that tile's input region, directly peer to peer (`routing="p2p"`).

* `HeadRun` — on the plan's head device. It collects the trunk output (or, when the head
  is split, every last-block tile's part of the head's linear prefix) and says when the
  head can run; the node sends the logits to the requester.

All consume data and return actions (`SendPiece`, `Compute`, `RunHead`); the node
carries them out. A piece addressed to the node itself is delivered locally by the
node, without the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import numpy as np
import torch

from meshci.cost.cluster import Cluster, Device, LinkSpec
from meshci.node.membership import Advert, Peer, curve_key
from meshci.planning.plan import Plan
from meshci.tiling import assemble, crop
from meshci.trunk import Region
from meshci.trunk.gate import combine, partial_sum

Stage = Literal["tile", "gather", "output", "partial", "logits", "sum"]


class Geometry(Protocol):
    """The trunk's geometry as a request needs it (block indices refer to `plan.blocks`)."""

    def need(self, block: int, out: Region) -> Region:
        """Input region (on boundary `block`) that block `block` needs to produce `out`."""

    def map_size(self, boundary: int) -> tuple[int, int]:
        """(H, W) of the feature map entering block `boundary` (len(blocks): trunk output)."""

    def gated(self, block: int) -> int:
        """Channels of block `block`'s input when the block starts with an SE gate (its tiles
        then need every previous tile's partial sums), else 0."""


# ---- actions ------------------------------------------------------------------------

@dataclass(frozen=True)
class SendPiece:
    """Send a rectangle of boundary `block` to `dest`.

    stage "tile": input of a tile of block `block` (goes to the dest's WorkerRun);
    stage "gather": a boundary the requester's RequesterRun re-scatters;
    stage "output": the trunk output (block == len(plan.blocks)) for the head device's HeadRun;
    stage "partial": a last-block tile's part of the split head's prefix (a vector; the
    region is the tile's) for the head device's HeadRun;
    stage "logits": the head's output for the requester;
    stage "sum": a tile's per-channel partial sums of boundary `block` (float64, the region is
    the tile's) for every device of block `block`, which starts with an SE gate.
    relayed_bytes: bytes of this piece the sender did not compute itself (re-scatter).
    """

    dest: str
    block: int
    region: Region
    tensor: torch.Tensor
    stage: Stage
    relayed_bytes: int = 0


@dataclass(frozen=True)
class Compute:
    """Run segments [start, end) on `x` (covering `have`), producing exactly `out`;
    `partial`: then reduce the output to its part of the split head's prefix."""

    block: int
    tile: int
    start: int
    end: int
    x: torch.Tensor
    have: Region
    out: Region
    partial: bool = False
    mean: torch.Tensor | None = None  # the input's per-channel mean, when the block starts with an SE gate


@dataclass(frozen=True)
class RunHead:
    """Run the head: on the whole trunk output, or (`split`) finish it from the summed
    parts of its prefix."""

    input: torch.Tensor
    split: bool


Action = SendPiece | Compute | RunHead


class RequestStateError(Exception):
    """A piece that does not fit the plan (wrong block, outside the map): a peer's mistake."""


def tensor_bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class PieceStore:
    """Rectangles received for one feature map; answers whether they cover a region."""

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.width = width
        self.pieces: list[tuple[Region, torch.Tensor]] = []
        self._mask = np.zeros((height, width), dtype=bool)  # numpy: ~50x cheaper to make than torch

    def add(self, region: Region, tensor: torch.Tensor) -> None:
        if not (0 <= region.r0 < region.r1 <= self.height and 0 <= region.c0 < region.c1 <= self.width):
            raise RequestStateError(f"piece {region.to_list()} lies outside the "
                                    f"{self.height}x{self.width} map")
        if tuple(tensor.shape[-2:]) != (region.height, region.width):
            raise RequestStateError(f"piece {region.to_list()} carries a tensor of shape "
                                    f"{tuple(tensor.shape)}")
        self.pieces.append((region, tensor))
        self._mask[region.r0:region.r1, region.c0:region.c1] = True

    def covers(self, want: Region) -> bool:
        return bool(self._mask[want.r0:want.r1, want.c0:want.c1].all())

    def take(self, want: Region) -> torch.Tensor:
        for region, tensor in self.pieces:
            if region.contains(want):  # the common case: one piece holds it all (no copy)
                return crop(tensor, region, want)
        useful = [(r, t) for r, t in self.pieces if r.intersect(want) is not None]
        return assemble(want, useful)


def _check_block(plan: Plan, block: int, allow_output: bool) -> None:
    last = len(plan.blocks) if allow_output else len(plan.blocks) - 1
    if not 0 <= block <= last:
        raise RequestStateError(f"block {block} is not in a plan of {len(plan.blocks)} blocks")


class WorkerRun:
    """One node's share of one request: its tiles in every block."""

    def __init__(self, plan: Plan, me: str, geometry: Geometry) -> None:
        self.plan = plan
        self.me = me
        self.geometry = geometry
        self.pending: dict[int, list[int]] = {}
        for b, block in enumerate(plan.blocks):
            mine = [t for t, tile in enumerate(block.tiles) if tile.device == me]
            if mine:
                self.pending[b] = mine
        self.outstanding = sum(len(v) for v in self.pending.values())
        self._stores: dict[int, PieceStore] = {}
        # blocks that start with an SE gate: partial sums by previous tile, tiles waiting for them
        self._sums: dict[int, dict[Region, torch.Tensor]] = {}
        self._waiting: dict[int, list[Compute]] = {}

    @property
    def done(self) -> bool:
        return self.outstanding == 0

    def on_piece(self, block: int, region: Region, tensor: torch.Tensor) -> list[Action]:
        _check_block(self.plan, block, allow_output=False)
        if block not in self.pending:
            raise RequestStateError(f"{self.me} holds no waiting tile in block {block}")
        store = self._stores.get(block)
        if store is None:
            store = self._stores[block] = PieceStore(*self.geometry.map_size(block))
        store.add(region, tensor)
        spec = self.plan.blocks[block]
        partial = block == len(self.plan.blocks) - 1 and self.plan.head_plan.split
        actions: list[Action] = []
        for t in list(self.pending[block]):
            need = self.geometry.need(block, spec.tiles[t].region)
            if store.covers(need):
                self.pending[block].remove(t)
                actions.append(Compute(block, t, spec.start, spec.end, store.take(need), need,
                                       spec.tiles[t].region, partial))
        if not self.pending[block]:
            del self.pending[block]
            del self._stores[block]  # every tile of this block has its input: free it
        if actions and self.geometry.gated(block):
            self._waiting.setdefault(block, []).extend(actions)  # type: ignore[arg-type]
            return self._gate_ready(block)
        return actions

    def on_sum(self, block: int, region: Region, part: torch.Tensor) -> list[Action]:
        """A previous-block tile's partial sums of the input of block `block` (an SE gate)."""
        _check_block(self.plan, block, allow_output=False)
        channels = self.geometry.gated(block) if block > 0 else 0
        if not channels:
            raise RequestStateError(f"block {block} does not start with an SE gate: no partial sums")
        if block not in self.pending and block not in self._waiting:
            raise RequestStateError(f"{self.me} holds no waiting tile in block {block}")
        expected = {t.region for t in self.plan.blocks[block - 1].tiles}
        if region not in expected:
            raise RequestStateError(f"no tile {region.to_list()} of block {block - 1} sends partial sums")
        sums = self._sums.setdefault(block, {})
        if region in sums:
            raise RequestStateError(f"a second partial sum from tile {region.to_list()}")
        if part.dim() != 1 or part.numel() != channels or part.dtype != torch.float64:
            raise RequestStateError(f"partial sums must be a float64 vector of {channels} values, "
                                    f"got {part.dtype} of shape {tuple(part.shape)}")
        sums[region] = part
        return self._gate_ready(block)

    def _gate_ready(self, block: int) -> list[Action]:
        """The tiles of a gated block whose input is complete, once every partial sum is in."""
        sums = self._sums.get(block, {})
        if len(sums) < len({t.region for t in self.plan.blocks[block - 1].tiles}) or block not in self._waiting:
            return []
        h, w = self.geometry.map_size(block)
        mean = combine([sums[r] for r in sorted(sums)], h * w)
        ready = [replace(c, mean=mean) for c in self._waiting.pop(block)]
        if block not in self.pending:
            self._sums.pop(block, None)
        return ready  # type: ignore[return-value]

    def on_computed(self, block: int, tile: int, output: torch.Tensor) -> list[Action]:
        """A tile finished: route its output rows to whoever needs them next (after the
        last block: the trunk output, or its part of the split head, to the head device)."""
        self.outstanding -= 1
        out = self.plan.blocks[block].tiles[tile].region
        nxt = block + 1
        sums: list[Action] = []
        if nxt < len(self.plan.blocks) and self.geometry.gated(nxt):
            # the next block pools this boundary: every one of its devices gets this tile's sums
            part = partial_sum(output)
            sums = [SendPiece(d, nxt, out, part, "sum") for d in self.plan.blocks[nxt].devices]
        return sums + self._route(block, out, output)

    def _route(self, block: int, out: Region, output: torch.Tensor) -> list[Action]:
        nxt = block + 1
        if nxt == len(self.plan.blocks):
            head = self.plan.head_plan
            return [SendPiece(head.device, nxt, out, output, "partial" if head.split else "output")]
        if self.plan.routing == "requester":
            return [SendPiece(self.plan.requester, nxt, out, output, "gather")]
        sent: set[tuple[str, Region]] = set()
        actions: list[Action] = []
        for spec in self.plan.blocks[nxt].tiles:
            part = out.intersect(self.geometry.need(nxt, spec.region))
            if part is None or (spec.device, part) in sent:
                continue
            sent.add((spec.device, part))
            actions.append(SendPiece(spec.device, nxt, part, crop(output, out, part).contiguous(), "tile"))
        return actions


class RequesterRun:
    """The requester's side of one request, once the plan is fixed."""

    def __init__(self, plan: Plan, me: str, geometry: Geometry) -> None:
        if plan.requester != me:
            raise RequestStateError(f"plan's requester is {plan.requester!r}, not {me!r}")
        self.plan = plan
        self.me = me
        self.geometry = geometry
        n = len(plan.blocks)
        self._stores: dict[int, PieceStore] = {}
        # tiles of each block still waiting for their re-scattered input (routing=requester)
        self._scatter: dict[int, list[int]] = {}
        if plan.routing == "requester":
            self._scatter = {b: list(range(len(plan.blocks[b].tiles))) for b in range(1, n)}

    def devices(self) -> list[str]:
        """Every device holding at least one tile, in plan order."""
        seen: dict[str, None] = {}
        for block in self.plan.blocks:
            for tile in block.tiles:
                seen.setdefault(tile.device, None)
        return list(seen)

    def start(self, x: torch.Tensor) -> list[Action]:
        """Cut the input (1, C, H, W) into the first block's tile inputs."""
        h, w = self.geometry.map_size(0)
        if tuple(x.shape[-2:]) != (h, w):
            raise RequestStateError(f"input is {tuple(x.shape[-2:])}, the plan expects {(h, w)}")
        full = Region(0, h, 0, w)
        actions: list[Action] = []
        sent: set[tuple[str, Region]] = set()
        for spec in self.plan.blocks[0].tiles:
            need = self.geometry.need(0, spec.region)
            if (spec.device, need) in sent:
                continue
            sent.add((spec.device, need))
            actions.append(SendPiece(spec.device, 0, need, crop(x, full, need).contiguous(), "tile"))
        return actions

    def on_gather(self, block: int, region: Region, tensor: torch.Tensor) -> list[Action]:
        """A boundary piece to re-scatter (routing "requester")."""
        _check_block(self.plan, block, allow_output=False)
        if block not in self._scatter:
            raise RequestStateError(f"block {block}'s input is not gathered by the requester")
        store = self._stores.get(block)
        if store is None:
            store = self._stores[block] = PieceStore(*self.geometry.map_size(block))
        store.add(region, tensor)
        # re-scatter: send each waiting tile of this block its input as soon as it is covered
        spec = self.plan.blocks[block]
        own = [t.region for t in self.plan.blocks[block - 1].tiles if t.device == self.me]
        actions: list[Action] = []
        for t in list(self._scatter[block]):
            need = self.geometry.need(block, spec.tiles[t].region)
            if not store.covers(need):
                continue
            self._scatter[block].remove(t)
            piece = store.take(need)
            relayed = 0
            if spec.tiles[t].device != self.me:
                per_cell = tensor_bytes(piece) // max(1, need.area)
                mine = sum(r.area for r in (need.intersect(o) for o in own) if r is not None)
                relayed = per_cell * (need.area - mine)
            actions.append(SendPiece(spec.tiles[t].device, block, need, piece, "tile", relayed))
        if not self._scatter[block]:
            del self._scatter[block]
            del self._stores[block]
        return actions


class HeadRun:
    """The head device's side of one request: the trunk output (or the parts of the split
    head's prefix, one per last-block tile) until the head can run."""

    def __init__(self, plan: Plan, geometry: Geometry, features: int | None = None) -> None:
        self.plan = plan
        self.split = plan.head_plan.split
        self.features = features  # length of a part of the split head's prefix
        self.expected = {tile.region for tile in plan.blocks[-1].tiles}
        self.parts: dict[Region, torch.Tensor] = {}
        self.store = None if self.split else PieceStore(*geometry.map_size(len(plan.blocks)))
        self.done = False  # the head's input is complete
        self.sent = False  # the node sent the logits (set by the node)

    def on_partial(self, region: Region, part: torch.Tensor) -> list[Action]:
        if not self.split:
            raise RequestStateError("a part of the head's prefix, but the head is not split")
        if region not in self.expected:
            raise RequestStateError(f"no last-block tile {region.to_list()} sends a part of the head")
        if region in self.parts:
            raise RequestStateError(f"a second part of the head for tile {region.to_list()}")
        if part.dim() != 1 or (self.features is not None and part.numel() != self.features):
            raise RequestStateError(f"a part of the head must be a vector of {self.features} values, "
                                    f"got shape {tuple(part.shape)}")
        self.parts[region] = part
        if len(self.parts) < len(self.expected):
            return []
        self.done = True
        total = torch.stack([self.parts[r] for r in sorted(self.parts)]).sum(dim=0)
        return [RunHead(total, split=True)]

    def on_output(self, region: Region, tensor: torch.Tensor) -> list[Action]:
        if self.store is None:
            raise RequestStateError("trunk output for a split head")
        if self.done:
            raise RequestStateError("piece after the trunk output was complete")
        self.store.add(region, tensor)
        h, w = self.store.height, self.store.width
        full = Region(0, h, 0, w)
        if not self.store.covers(full):
            return []
        self.done = True
        return [RunHead(self.store.take(full), split=False)]


# ---- the mesh as a planner sees it ----------------------------------------------------

def cluster_from_view(me: str, advert: Advert, peers: list[Peer], default_link: LinkSpec,
                      medium: str = "switched", *, model: str | None = None,
                      size: tuple[int, int] | None = None,
                      advert_age_s: Mapping[str, float] | None = None) -> Cluster:
    """The `Cluster` a requester plans on: itself plus every live peer, with the speed and
    backlog each one advertised, and the link estimates they advertised (the requester's
    own per-message latency wins over a peer's for the same pair; the bandwidth is the
    lower of the two ends' measurements, each measured as delivered to that end). Given the request's `model` and
    input `size`, a device that advertised its measured curves for them carries them
    (`Device.curves`), so the planner prices its tiles by its curves, not its GFLOP/s.
    `advert_age_s`: how long ago each peer's advert arrived; the backlog it advertised has
    drained for that long since (a heartbeat sent while a previous request's tiles were
    queued must not make the device look busy for the next request)."""
    key = curve_key(model, size) if model is not None and size is not None else None

    ages = advert_age_s or {}

    def device(name: str, adv: Advert) -> Device:
        curves = tuple((model, curve) for k, curve in adv.curves if k == key) if key else ()
        backlog = max(0.0, adv.backlog_s - max(0.0, ages.get(name, 0.0)))
        return Device(name, adv.gflops, backlog_s=backlog, curves=curves[:1],
                      tile_overhead_s=adv.tile_ms / 1000.0)

    devices = [device(me, advert)]
    devices += [device(p.name, p.advert) for p in peers if p.name != me]
    names = {d.name for d in devices}
    links: dict[frozenset[str], LinkSpec] = {}
    rates: dict[frozenset[str], float] = {}
    for owner, adv in [(p.name, p.advert) for p in peers] + [(me, advert)]:
        for other, mbps, latency_ms in adv.links:
            if other not in names or other == owner or not (0 <= mbps < math.inf and 0 <= latency_ms < math.inf):
                continue
            pair = frozenset((owner, other))
            links[pair] = LinkSpec(default_link.mbps, latency_ms)
            if mbps > 0:  # each end measures what it receives: the slower direction counts
                rates[pair] = min(mbps, rates.get(pair, math.inf))
    links = {pair: LinkSpec(rates.get(pair, spec.mbps), spec.latency_ms) for pair, spec in links.items()}
    return Cluster(tuple(devices), default_link, links, medium, me)


def device_signature(cluster: Cluster) -> tuple[tuple[str, float, int], ...]:
    """What a cached plan depends on about the devices: name, GFLOP/s (3 decimals) and a
    digest of the curves each carries (a plan made before a device's curves were measured
    must not be reused once they are)."""
    return tuple(sorted((d.name, round(d.gflops, 3), hash(d.curves) & 0xFFFFFFFF)
                        for d in cluster.devices))
