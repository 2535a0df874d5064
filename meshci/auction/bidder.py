"""The bidder: one per device, pure (no IO, no clock), bids from what only it knows.

A bidder knows its own speed (``compute_s(item) -> seconds``), its own links
(``link_s(nbytes, peer) -> seconds``) and the work it holds: a base backlog set by its node
(work outside any auction) plus its commitments per auction id, tentative (awarded and
accepted, auction still open) or firm (confirmed by the auction's Close).

* CallForBids: it bids on each item its capacity allows; a bid is its predicted finish time
  ``backlog + cost(item)`` where the backlog counts everything it holds *outside* this
  auction (work won in concurrent auctions included) and the cost is compute (halo rows
  included) plus receiving the input and sending the output.
* Award: it re-checks against what it holds *now*. Items are accepted, in award order,
  while its committed work stays within ``capacity_s`` and its finish stays within
  ``tolerance`` of what its bids promised; the rest are declined (work won elsewhere in the
  meantime is the usual cause) and the auctioneer re-auctions them.
* Memory: with `item_bytes` (an item's activation bytes) and `memory_bytes` (the device's
  budget for one auction's tiles), it bids only on items that fit, and accepts an award's
  items only while their bytes together fit.
* Close: the listed items become firm, any other tentative item of that auction is freed.
  The node calls `release` once the auction's tiles ran (or the request died).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from meshci.auction.errors import AuctionError
from meshci.auction.messages import (
    AuctionMessage,
    Award,
    AwardReply,
    Bid,
    BidBundle,
    CallForBids,
    Close,
    Item,
    Outgoing,
)

__all__ = ["Bidder", "Commitment"]

log = logging.getLogger(__name__)

ComputeTime = Callable[[Item], float]
LinkTime = Callable[[int, str], float]


@dataclass(frozen=True)
class Commitment:
    """Work a bidder holds for an auction: seconds it costs, firm once the auction closed."""

    item_id: str
    cost_s: float
    firm: bool


def _no_link(nbytes: int, peer: str) -> float:
    return 0.0


class Bidder:
    """A device's side of AWAS (see the module docstring)."""

    def __init__(
        self,
        name: str,
        compute_s: ComputeTime,
        link_s: LinkTime = _no_link,
        *,
        backlog_s: float = 0.0,
        capacity_s: float = math.inf,
        tolerance: float = 0.25,
        item_bytes: Callable[[Item], float] | None = None,
        memory_bytes: Callable[[], float] | None = None,
    ) -> None:
        if not name:
            raise AuctionError("a bidder needs a name")
        if not (math.isfinite(backlog_s) and backlog_s >= 0):
            raise AuctionError(f"backlog_s must be finite and >= 0, got {backlog_s}")
        if not capacity_s > 0:
            raise AuctionError(f"capacity_s must be > 0, got {capacity_s}")
        if not tolerance >= 0:
            raise AuctionError(f"tolerance must be >= 0, got {tolerance}")
        self.name = name
        self._compute_s = compute_s
        self._link_s = link_s
        self.base_backlog_s = backlog_s
        self.capacity_s = capacity_s
        self.tolerance = tolerance
        self._held: dict[str, dict[str, Commitment]] = {}
        # Per auction: the backlog it bid with and the cost of each item it bid on.
        self._bid_backlog: dict[str, float] = {}
        self._bid_cost: dict[str, dict[str, float]] = {}
        # Per (auction, round): the reply already given, so a repeated Award gets the same.
        self._replies: dict[tuple[str, int], AwardReply] = {}
        self._item_bytes = item_bytes
        self._memory_bytes = memory_bytes
        self._bid_bytes: dict[str, dict[str, float]] = {}  # auction -> item -> its bytes

    @classmethod
    def from_rates(
        cls,
        name: str,
        gflops: float,
        mbps: float = math.inf,
        latency_ms: float = 0.0,
        **kwargs: float,
    ) -> Bidder:
        """A bidder with a flat speed (GFLOP/s) and one link estimate to every peer."""
        if not gflops > 0 or not mbps > 0 or latency_ms < 0:
            raise AuctionError(f"bad rates for {name!r}: {gflops} GFLOP/s, {mbps} Mbit/s, {latency_ms} ms")

        def compute_s(item: Item) -> float:
            return item.flops / (gflops * 1e9)

        def link_s(nbytes: int, peer: str) -> float:
            if nbytes == 0 or peer == name:
                return 0.0
            return latency_ms / 1e3 + nbytes * 8 / (mbps * 1e6)

        return cls(name, compute_s, link_s, **kwargs)

    # -- what it holds -------------------------------------------------------------

    @property
    def backlog_s(self) -> float:
        """All the work it holds: base backlog plus every commitment."""
        return self.base_backlog_s + sum(
            c.cost_s for held in self._held.values() for c in held.values()
        )

    def backlog_outside(self, auction_id: str) -> float:
        """The work it holds outside `auction_id` (what its bids there build on)."""
        return self.base_backlog_s + sum(
            c.cost_s for aid, held in self._held.items() if aid != auction_id for c in held.values()
        )

    def commitments(self, auction_id: str) -> Mapping[str, Commitment]:
        return dict(self._held.get(auction_id, {}))

    def auctions(self) -> tuple[str, ...]:
        """Auction ids it holds work for."""
        return tuple(aid for aid, held in self._held.items() if held)

    def release(self, auction_id: str) -> None:
        """Forget an auction: its work ran, or its request ended."""
        self._held.pop(auction_id, None)
        self._bid_backlog.pop(auction_id, None)
        self._bid_cost.pop(auction_id, None)
        self._bid_bytes.pop(auction_id, None)
        for key in [k for k in self._replies if k[0] == auction_id]:
            del self._replies[key]

    # -- valuation -------------------------------------------------------------------

    def cost_s(self, item: Item, auctioneer: str) -> float:
        """Seconds this device needs for `item`: compute plus its two transfers."""
        recv_from = item.recv_from or auctioneer
        send_to = item.send_to or auctioneer
        return (
            float(self._compute_s(item))
            + float(self._link_s(item.recv_bytes, recv_from))
            + float(self._link_s(item.send_bytes, send_to))
        )

    def bids_for(
        self, auction_id: str, items: tuple[Item, ...], auctioneer: str
    ) -> tuple[float, tuple[Bid, ...]]:
        """The pure bid function: (backlog it bids with, one bid per item it can take)."""
        backlog = self.backlog_outside(auction_id)
        room = self.capacity_s - self.backlog_s
        memory = self._memory_bytes() if self._memory_bytes is not None else math.inf
        bids = []
        for item in items:
            cost = self.cost_s(item, auctioneer)
            if self._item_bytes is not None and self._item_bytes(item) > memory:
                continue  # its maps alone do not fit this device
            if math.isfinite(cost) and cost >= 0 and cost <= room:
                bids.append(Bid(item.item_id, backlog + cost))
        return backlog, tuple(bids)

    # -- the state machine -------------------------------------------------------------

    def receive(self, message: AuctionMessage, now: float = 0.0) -> list[Outgoing]:
        """Handle one message from an auctioneer; returns the answers to send."""
        if isinstance(message, CallForBids):
            return [self._on_call(message)]
        if isinstance(message, Award):
            return [self._on_award(message)]
        if isinstance(message, Close):
            self._on_close(message)
            return []
        log.warning("%s: ignored %s from %s: not a message for a bidder",
                    self.name, type(message).__name__, getattr(message, "sender", None))
        return []

    def _on_call(self, call: CallForBids) -> Outgoing:
        backlog, bids = self.bids_for(call.auction_id, call.items, call.sender)
        self._bid_backlog[call.auction_id] = backlog
        costs = self._bid_cost.setdefault(call.auction_id, {})
        for bid in bids:
            costs[bid.item_id] = bid.finish_s - backlog
        if self._item_bytes is not None:
            sizes = {item.item_id: float(self._item_bytes(item)) for item in call.items}
            self._bid_bytes.setdefault(call.auction_id, {}).update(sizes)
        return Outgoing(call.sender, BidBundle(call.auction_id, call.round, self.name, backlog, bids))

    def _on_award(self, award: Award) -> Outgoing:
        key = (award.auction_id, award.round)
        if key in self._replies:
            return Outgoing(award.sender, self._replies[key])
        costs = self._bid_cost.get(award.auction_id, {})
        held = self._held.setdefault(award.auction_id, {})
        promised = self._bid_backlog.get(award.auction_id, 0.0) + sum(
            costs.get(i, 0.0) for i in dict.fromkeys(award.item_ids)
        )
        allowed = promised * (1.0 + self.tolerance) + 1e-12
        start = self.backlog_outside(award.auction_id)
        committed = self.backlog_s
        accepted: list[str] = []
        declined: list[str] = []
        taken = 0.0
        sizes = self._bid_bytes.get(award.auction_id, {})
        memory = self._memory_bytes() if self._memory_bytes is not None else math.inf
        held_bytes = sum(sizes.get(i, 0.0) for i in held)
        for item_id in dict.fromkeys(award.item_ids):  # each item once, in award order
            cost = costs.get(item_id)
            if cost is None or item_id in held:
                log.warning("%s: declined %r of auction %s: %s", self.name, item_id, award.auction_id,
                            "never bid on it" if cost is None else "already held")
                declined.append(item_id)
            elif committed + taken + cost > self.capacity_s or start + taken + cost > allowed \
                    or held_bytes + sizes.get(item_id, 0.0) > memory:
                declined.append(item_id)
            else:
                accepted.append(item_id)
                taken += cost
                held_bytes += sizes.get(item_id, 0.0)
        for item_id in accepted:
            held[item_id] = Commitment(item_id, costs[item_id], firm=False)
        if declined:
            log.info("%s: declined %d of %d items of auction %s (holds %.4fs, capacity %.4fs)",
                     self.name, len(declined), len(award.item_ids), award.auction_id, committed,
                     self.capacity_s)
        reply = AwardReply(award.auction_id, award.round, self.name, tuple(accepted), tuple(declined))
        self._replies[key] = reply
        return Outgoing(award.sender, reply)

    def _on_close(self, close: Close) -> None:
        held = self._held.get(close.auction_id, {})
        keep = set(close.item_ids)
        unknown = keep - held.keys()
        if unknown:
            log.warning("%s: Close of auction %s names items it never accepted: %s",
                        self.name, close.auction_id, sorted(unknown))
        self._held[close.auction_id] = {
            i: Commitment(i, c.cost_s, firm=True) for i, c in held.items() if i in keep
        }
        self._bid_cost.pop(close.auction_id, None)
        self._bid_backlog.pop(close.auction_id, None)
        if not self._held[close.auction_id]:
            del self._held[close.auction_id]
