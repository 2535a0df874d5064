"""AWAS over the network: the glue between the auction's sans-IO state machines and the
node's messages (pure: no sockets, no clock).

* `auction_items` cuts the blocks DPFL chose into row strips, the auction's items.
* `NetworkAuction` runs the auctioneer of one request and remembers what each bidder's own
  bids say about it (a fixed cost and seconds per FLOP per block, fitted from its bids;
  its backlog), so strips can be levelled afterwards.
* `awarded_plan` turns the auction's result into the request's `Plan`: per block, the
  winners in row order, strip boundaries moved by `balance_strips` (closed form: each
  device's strip time is linear in its rows, `LinearStripTime`) so their predicted
  finish times are close (a device that would slow the block gets no strip). The head
  is not in `predicted_latency_s` (it runs on the requester after the trunk).
* `auction_items` name the model and input size (`Item.model`, a `curve_key`), so a bidder
  with measured curves for them prices an item by its curves.
* `to_message` / `from_message` carry auction messages as JSON in a frame's meta (a
  message sent to several bidders is encoded once):
  auctioneer -> bidder as CALL_FOR_BIDS (CallForBids) or AWARD (Award, Close);
  bidder -> auctioneer as BIDS (BidBundle) or ACCEPT (AwardReply).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from meshci.auction.balance import LinearStripTime, balance_strips
from meshci.auction.auctioneer import AuctionResult, Auctioneer
from meshci.auction.errors import MessageFormatError
from meshci.auction.messages import (
    AuctionMessage, Award, AwardReply, BidBundle, CallForBids, Close, Item, Outgoing,
    message_from_json,
)
from meshci.node.membership import curve_key
from meshci.planning.plan import BlockPlan, Plan, TileSpec
from meshci.tiling import block_flops, block_input_region, split_rows
from meshci.trunk import Region
from meshci.wire import Message, MsgType

log = logging.getLogger(__name__)

ROUND_TIMEOUT_S = 0.5
FIT_MIN_SPREAD = 0.02  # fit a bidder's fixed cost only where its items' FLOPs differ this much
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


_ENCODED: dict[int, tuple[AuctionMessage, dict[str, Any]]] = {}  # id -> (message, its JSON form)
_ENCODED_ENTRIES = 8


def to_message(request_id: int, message: AuctionMessage) -> Message:
    """The frame of an auction message. A message sent to several peers (a round's
    CallForBids, one object for every bidder) is encoded once: its JSON form is kept for
    the last few messages (messages are frozen, so the form cannot go stale)."""
    cached = _ENCODED.get(id(message))
    if cached is not None and cached[0] is message:
        meta = cached[1]
    else:
        meta = message.to_json()
        if len(_ENCODED) >= _ENCODED_ENTRIES:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[id(message)] = (message, meta)
    return Message(_KINDS[type(message)], request_id, meta)


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
                segments=(block.start, block.end), model=curve_key(trunk.name, trunk.input_shape[1:])))
    return items


class NetworkAuction:
    """The auctioneer of one request, plus what the bidders' own bids reveal."""

    def __init__(self, request_id: int, name: str, items: Sequence[Item], bidders: Sequence[str],
                 round_timeout_s: float = ROUND_TIMEOUT_S) -> None:
        self.request_id = request_id
        self.items = {item.item_id: item for item in items}
        self.machine = Auctioneer(str(request_id), name, items, bidders, round_timeout_s=round_timeout_s)
        self.backlog_s: dict[str, float] = {}
        self._costs: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)  # (flops, s)

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
                    self._costs[(message.sender, item.block)].append((item.flops, cost))
        return self.machine.receive(message, now)

    def cost_line(self, device: str, block: int) -> tuple[float, float] | None:
        """``(fixed_s, s_per_flop)``: the bidder's bids on the block's items as ``fixed + rate
        * flops``. A bidder pricing by measured curves pays a per-segment overhead on any
        strip: fitted (least squares) where its bids span strips of clearly different FLOPs
        and the fit is sane; otherwise proportional (no fixed part)."""
        costs = self._costs.get((device, block))
        if not costs:
            return None
        n = len(costs)
        mean_f = sum(f for f, _ in costs) / n
        mean_c = sum(c for _, c in costs) / n
        proportional = (0.0, sum(c / f for f, c in costs) / n)
        var = sum((f - mean_f) ** 2 for f, _ in costs)
        if n < 2 or var <= (FIT_MIN_SPREAD * mean_f) ** 2 * n:
            return proportional
        rate = sum((f - mean_f) * (c - mean_c) for f, c in costs) / var
        fixed = mean_c - rate * mean_f
        if not (rate > 0 and fixed >= 0):
            return proportional
        return fixed, rate

    def result(self) -> AuctionResult:
        return self.machine.result()


def _within_degree(order: list[str], degree: int, won: dict[str, float]) -> list[str]:
    """The winners of a block, in row order, at most `degree` of them (DPFL's parallelism
    for the block): the auction chooses which devices run a block, DPFL how many. Items are
    priced one by one, each with its own halo, so a block DPFL kept on one device (a deep
    block whose halo covers its whole map) could otherwise be split between two winners
    that each compute nearly all of it. The devices that won the most work are kept."""
    if len(order) <= degree:
        return order
    keep = set(sorted(order, key=lambda d: (-won.get(d, 0.0), order.index(d)))[:max(1, degree)])
    return [d for d in order if d in keep]


def awarded_plan(trunk: Any, dpfl_plan: Plan, auction: NetworkAuction,
                 flops: Callable[[int, int, Region], float] | None = None) -> Plan:
    """The request's plan from the auction: DPFL's cuts, the auction's devices per block,
    strips levelled with the bidders' own cost figures (their bids). Predicted finish
    times are the bidders' own: block k starts when block k-1's last device finishes."""
    result = auction.result()
    count = flops if flops is not None else (
        lambda start, end, out: float(block_flops(trunk, start, end, out)))
    first_rows: dict[int, dict[str, int]] = defaultdict(dict)  # block -> owner -> its first row
    won_flops: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # block -> owner -> FLOPs won
    for item_id, owner in result.owner.items():
        item = auction.items[item_id]
        first = first_rows[item.block]
        first[owner] = min(first.get(owner, item.rows[0]), item.rows[0])
        won_flops[item.block][owner] += item.flops
    blocks: list[BlockPlan] = []
    t = 0.0
    for b, block in enumerate(dpfl_plan.blocks):
        _, h, w = trunk.boundary_shape(block.end)
        first_row = first_rows.get(b, {})
        order = _within_degree(sorted(first_row, key=lambda d: first_row[d]), len(block.tiles),
                               won_flops.get(b, {}))
        if not order:
            # nobody won anything of this block (every bidder dropped): keep DPFL's tiles
            log.warning("auction %d: block %d unassigned, keeping the DPFL assignment", auction.request_id, b)
            blocks.append(BlockPlan(block.start, block.end, block.tiles, dict(block.finish_s)))
            t = max([t, *block.finish_s.values()])
            continue
        # FLOPs of rows [a, z): linear in the rows plus the halo of an interior strip (two
        # geometry calls per block instead of hundreds; monotone, as balancing needs)
        per_row = count(block.start, block.end, Region(0, h, 0, w)) / h
        mid = h // 2
        halo = max(0.0, count(block.start, block.end, Region(mid, mid + 1, 0, w)) - per_row)
        # each device's time for rows [a, z): its start, its fixed cost, the halo, and the
        # rows at its own rate (its bids); a device that bid on nothing here is priced out
        base: dict[str, float] = {}
        rates: dict[str, float] = {}
        for device in order:
            line = auction.cost_line(device, b)
            if line is not None and line[1] * per_row > 0:
                fixed, rate = line
                base[device] = max(t, auction.backlog_s.get(device, 0.0)) + fixed + halo * rate
                rates[device] = per_row * rate
        strip_time = LinearStripTime(base, rates)
        strips = balance_strips(h, order, strip_time)
        finish = {device: strip_time(device, a, z) for device, a, z in strips}
        tiles = tuple(TileSpec(device, Region(a, z, 0, w)) for device, a, z in strips)
        blocks.append(BlockPlan(block.start, block.end, tiles, finish, result.rounds if b == 0 else 0))
        t = max(finish.values())
    return Plan(dpfl_plan.strategy, dpfl_plan.model, dpfl_plan.input_shape, dpfl_plan.requester,
                tuple(blocks), dpfl_plan.routing, t, dpfl_plan.planning_ms, result.rounds, dpfl_plan.head)
