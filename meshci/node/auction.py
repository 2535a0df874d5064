"""AWAS over the network: the glue between the auction's sans-IO state machines and the
node's messages (pure: no sockets, no clock).

* `auction_items` cuts the blocks DPFL chose into row strips, the auction's items.
* `NetworkAuction` runs the auctioneer of one request and remembers what each bidder's own
  bids say about it (seconds per FLOP, backlog), so strips can be levelled afterwards.
* `awarded_plan` turns the auction's result into the request's `Plan`: per block, the
  winners in row order, strip boundaries moved by `balance_strips` so their predicted
  finish times are close (a device that would slow the block gets no strip).
* `to_message` / `from_message` carry auction messages as JSON in a frame's meta:
  auctioneer -> bidder as CALL_FOR_BIDS (CallForBids) or AWARD (Award, Close);
  bidder -> auctioneer as BIDS (BidBundle) or ACCEPT (AwardReply).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from meshci.auction import balance_strips
from meshci.auction.auctioneer import AuctionResult, Auctioneer
from meshci.auction.errors import MessageFormatError
from meshci.auction.messages import (
    AuctionMessage, Award, AwardReply, BidBundle, CallForBids, Close, Item, Outgoing,
    message_from_json,
)
from meshci.cost.cluster import Cluster
from meshci.planning.evaluate import plan_from_assignment
from meshci.planning.plan import Plan
from meshci.tiling import block_flops, block_input_region, split_rows
from meshci.trunk import Region
from meshci.wire import Message, MsgType

log = logging.getLogger(__name__)

ROUND_TIMEOUT_S = 0.5
ITEMS_PER_TILE = 2
BYTES_PER_VALUE = 4

_KINDS: dict[type, MsgType] = {
    CallForBids: MsgType.CALL_FOR_BIDS,
    Award: MsgType.AWARD,
    Close: MsgType.AWARD,
    BidBundle: MsgType.BIDS,
    AwardReply: MsgType.ACCEPT,
}
AUCTION_KINDS = frozenset(_KINDS.values())


def to_message(request_id: int, message: AuctionMessage) -> Message:
    return Message(_KINDS[type(message)], request_id, message.to_json())


def from_message(msg: Message, sender: str) -> AuctionMessage:
    """Decode an auction message; its claimed sender must be the authenticated peer."""
    message = message_from_json(msg.meta)
    if _KINDS[type(message)] is not msg.kind:
        raise MessageFormatError(f"{type(message).__name__} sent as {msg.kind.name}")
    if message.sender != sender:
        raise MessageFormatError(f"message claims to come from {message.sender!r}, the peer is {sender!r}")
    return message


def auction_items(trunk: Any, plan: Plan) -> list[Item]:
    """Row strips of each block's output: ITEMS_PER_TILE per tile DPFL planned (capped
    at the block's rows), each with its FLOPs (halo rows included) and bytes."""
    items: list[Item] = []
    for b, block in enumerate(plan.blocks):
        c_out, h, w = trunk.boundary_shape(block.end)
        c_in = trunk.boundary_shape(block.start)[0]
        n = max(1, min(h, ITEMS_PER_TILE * len(block.tiles)))
        for i, (r0, r1) in enumerate(split_rows(h, n)):
            out = Region(r0, r1, 0, w)
            need = block_input_region(trunk, block.start, block.end, out)
            items.append(Item(
                item_id=f"{b}:{i}", block=b, rows=(r0, r1),
                flops=float(block_flops(trunk, block.start, block.end, out)),
                recv_bytes=need.area * c_in * BYTES_PER_VALUE,
                send_bytes=out.area * c_out * BYTES_PER_VALUE,
                segments=(block.start, block.end)))
    return items


class NetworkAuction:
    """The auctioneer of one request, plus what the bidders' own bids reveal."""

    def __init__(self, request_id: int, name: str, items: Sequence[Item], bidders: Sequence[str],
                 round_timeout_s: float = ROUND_TIMEOUT_S) -> None:
        self.request_id = request_id
        self.items = {item.item_id: item for item in items}
        self.machine = Auctioneer(str(request_id), name, items, bidders, round_timeout_s=round_timeout_s)
        self.backlog_s: dict[str, float] = {}
        self._cost_per_flop: dict[tuple[str, int], list[float]] = defaultdict(list)

    @property
    def done(self) -> bool:
        return self.machine.done

    def start(self, now: float) -> list[Outgoing]:
        return self.machine.start(now)

    def tick(self, now: float) -> list[Outgoing]:
        return self.machine.tick(now)

    def receive(self, message: AuctionMessage, now: float) -> list[Outgoing]:
        if isinstance(message, BidBundle) and message.auction_id == self.machine.auction_id:
            self.backlog_s[message.sender] = message.backlog_s
            for bid in message.bids:
                item = self.items.get(bid.item_id)
                cost = bid.finish_s - message.backlog_s
                if item is not None and item.flops > 0 and cost >= 0:
                    self._cost_per_flop[(message.sender, item.block)].append(cost / item.flops)
        return self.machine.receive(message, now)

    def seconds_per_flop(self, device: str, block: int) -> float | None:
        costs = self._cost_per_flop.get((device, block))
        return sum(costs) / len(costs) if costs else None

    def result(self) -> AuctionResult:
        return self.machine.result()


def awarded_plan(trunk: Any, cluster: Cluster, dpfl_plan: Plan, auction: NetworkAuction) -> Plan:
    """The request's plan from the auction: DPFL's cuts, the auction's devices per block,
    strips levelled with the bidders' own cost figures."""
    result = auction.result()
    blocks: list[tuple[int, int]] = []
    assignments: list[dict[str, tuple[int, int]]] = []
    for b, block in enumerate(dpfl_plan.blocks):
        _, h, w = trunk.boundary_shape(block.end)
        first_row: dict[str, int] = {}
        for item_id, owner in result.owner.items():
            item = auction.items[item_id]
            if item.block == b:
                first_row[owner] = min(first_row.get(owner, h), item.rows[0])
        order = sorted(first_row, key=lambda d: first_row[d])
        if not order:
            # nobody won anything of this block (every bidder dropped): keep DPFL's tiles
            log.warning("auction %d: block %d unassigned, keeping the DPFL assignment", auction.request_id, b)
            assignments.append({t.device: (t.region.r0, t.region.r1) for t in block.tiles})
            blocks.append((block.start, block.end))
            continue

        def strip_time(device: str, a: int, z: int, start: int = block.start, end: int = block.end,
                       block_index: int = b, width: int = w) -> float:
            rate = auction.seconds_per_flop(device, block_index)
            flops = block_flops(trunk, start, end, Region(a, z, 0, width))
            speed = rate if rate is not None else 1.0 / (cluster.device(device).gflops * 1e9)
            return auction.backlog_s.get(device, 0.0) + flops * speed

        strips = balance_strips(h, order, strip_time)
        assignments.append({device: (a, z) for device, a, z in strips})
        blocks.append((block.start, block.end))
    rounds = [result.rounds] + [0] * (len(blocks) - 1)
    return plan_from_assignment(trunk, cluster, blocks, assignments, strategy=dpfl_plan.strategy,
                                routing=dpfl_plan.routing, auction_rounds=rounds,
                                planning_ms=dpfl_plan.planning_ms)
