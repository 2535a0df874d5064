"""The auctioneer: a sans-IO state machine for one request's auction.

The node that receives a request runs one `Auctioneer` over the devices it knows. It never
touches a socket or reads a clock: ``start(now)``, ``receive(message, now)`` and
``tick(now)`` return the messages to send (`Outgoing`), and `next_deadline` tells the
caller when to call ``tick``.

Rounds (each one network round trip):

1. CallForBids with every open item of the request (all blocks) to every live bidder;
   each answers one BidBundle. At the deadline, bidders that have not answered are dropped.
2. The auctioneer runs the price-rise auction (`meshci.auction.core.assign`) over the bid
   matrix, block by block, and sends each winner an Award; each answers an AwardReply.
   Silent winners are dropped; their items, and all declined ones, are open again.
3. If items are open, back to 1 with only those items, at most ``max_bid_rounds`` times
   in all (so at most ``2 * max_bid_rounds`` round trips; 2 when nobody declines). Items
   still open at the end are reported unassigned.

Finally every invited bidder gets a Close listing the items it holds (empty: free
everything of this auction).

Blocks run one after another, so each block is auctioned on its own: block ``k`` starts
when block ``k-1``'s last device finishes (``T_k``), and a bidder's reported backlog
(work it holds from other requests) delays it in block ``k`` only by what is left of it at
``T_k``, ``max(0, backlog - T_k)``.

A peer's mistakes — a message for another auction, from a device not invited or dropped,
for a stale round, a duplicate bundle, a bid for an unknown item, a negative, NaN or
infinite bid — are ignored with a logged reason; the state machine never raises on them.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from meshci.auction.core import assign
from meshci.auction.errors import AuctionError
from meshci.auction.messages import (
    AuctionMessage,
    Award,
    AwardReply,
    BidBundle,
    CallForBids,
    Close,
    Item,
    Outgoing,
)

__all__ = ["AuctionResult", "Auctioneer", "Phase"]

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    IDLE = "idle"
    BIDDING = "bidding"
    AWARDING = "awarding"
    DONE = "done"


@dataclass(frozen=True)
class AuctionResult:
    """The outcome of one auction.

    owner: item id -> winning bidder. finish_s: per block, bidder -> predicted finish time
    (seconds from the auction's end, the request's trunk starting then); makespan_s: per
    block, its duration. rounds: network round trips used; iterations: price-rise steps of
    the core; dropped: bidders dropped for missing a deadline.
    """

    auction_id: str
    owner: Mapping[str, str]
    unassigned: tuple[str, ...]
    finish_s: Mapping[int, Mapping[str, float]]
    makespan_s: Mapping[int, float]
    rounds: int
    iterations: int
    dropped: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> bool:
        return not self.unassigned

    @property
    def latency_s(self) -> float:
        """Predicted end of the last block."""
        return float(sum(self.makespan_s.values()))

    def items_of(self, bidder: str) -> tuple[str, ...]:
        return tuple(i for i, b in self.owner.items() if b == bidder)


class Auctioneer:
    """One request's auction (see the module docstring)."""

    def __init__(
        self,
        auction_id: str,
        name: str,
        items: Sequence[Item],
        bidders: Sequence[str],
        *,
        round_timeout_s: float = 0.25,
        max_bid_rounds: int = 3,
        eps: float = 1e-3,
    ) -> None:
        ids = [item.item_id for item in items]
        if len(set(ids)) != len(ids):
            raise AuctionError(f"auction {auction_id}: item ids must be unique")
        if not bidders or len(set(bidders)) != len(bidders):
            raise AuctionError(f"auction {auction_id}: need distinct bidders, got {list(bidders)}")
        if not round_timeout_s > 0 or max_bid_rounds < 1:
            raise AuctionError("round_timeout_s must be > 0 and max_bid_rounds >= 1")
        self.auction_id = auction_id
        self.name = name
        self.round_timeout_s = round_timeout_s
        self.max_bid_rounds = max_bid_rounds
        self.eps = eps
        self._items = {item.item_id: item for item in items}
        self._blocks = sorted({item.block for item in items})
        self._order = ids
        self._invited = tuple(bidders)
        self._alive = list(bidders)
        self._dropped: list[str] = []
        self.phase = Phase.IDLE
        self.round = 0  # number of the current message round
        self._bid_rounds = 0
        self._iterations = 0
        self._deadline: float | None = None
        self._open: list[str] = list(ids)
        self._fixed: dict[str, tuple[str, float]] = {}  # item -> (bidder, cost_s)
        self._backlog: dict[str, float] = {b: 0.0 for b in bidders}
        self._awaiting: set[str] = set()
        self._answered: set[str] = set()
        self._bundles: dict[str, dict[str, float]] = {}  # bidder -> item -> cost_s
        self._awarded: dict[str, dict[str, float]] = {}  # bidder -> item -> cost_s
        self._result: AuctionResult | None = None

    # -- the caller's side -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def next_deadline(self) -> float | None:
        """When ``tick`` must be called next (None: nothing pending)."""
        return self._deadline

    def start(self, now: float) -> list[Outgoing]:
        if self.phase is not Phase.IDLE:
            raise AuctionError(f"auction {self.auction_id} already started")
        if not self._open:
            return self._finish()
        return self._call(now)

    def result(self) -> AuctionResult:
        if self._result is None:
            raise AuctionError(f"auction {self.auction_id} is not finished (phase {self.phase.value})")
        return self._result

    def tick(self, now: float) -> list[Outgoing]:
        """Fire the round deadline if it passed: silent bidders are dropped."""
        if self._deadline is None or now < self._deadline:
            return []
        for bidder in sorted(self._awaiting):
            log.warning("auction %s: dropped %s: no answer in round %d", self.auction_id, bidder, self.round)
            self._alive.remove(bidder)
            self._dropped.append(bidder)
        self._awaiting.clear()
        if self.phase is Phase.BIDDING:
            return self._close_bidding(now)
        return self._after_awards(now)

    def receive(self, message: AuctionMessage, now: float) -> list[Outgoing]:
        """Handle one message from a bidder; a peer's mistake is logged and ignored."""
        reason = self._reject(message)
        if reason is not None:
            log.warning("auction %s: ignored %s from %r: %s", self.auction_id, type(message).__name__,
                        getattr(message, "sender", None), reason)
            return []
        if isinstance(message, BidBundle):
            self._take_bundle(message)
            if not self._awaiting:
                return self._close_bidding(now)
        elif isinstance(message, AwardReply):
            self._take_reply(message)
            if not self._awaiting:
                return self._after_awards(now)
        return []

    # -- checks on a peer's message ------------------------------------------------------

    def _reject(self, message: AuctionMessage) -> str | None:
        if not isinstance(message, (BidBundle, AwardReply, CallForBids, Award, Close)):
            return "not an auction message"
        if message.auction_id != self.auction_id:
            return f"for auction {message.auction_id!r}"
        if message.sender not in self._invited:
            return "not a bidder of this auction"
        if message.sender in self._dropped:
            return "dropped from this auction earlier"
        if isinstance(message, BidBundle):
            expected = Phase.BIDDING
        elif isinstance(message, AwardReply):
            expected = Phase.AWARDING
        else:
            return "not a message for an auctioneer"
        if self.phase is not expected or message.round != self.round:
            return f"stale: round {message.round}, auction is in round {self.round} ({self.phase.value})"
        if message.sender not in self._awaiting:
            if message.sender in self._answered:
                return f"duplicate answer for round {self.round}"
            return f"not asked in round {self.round}"
        return None

    def _take_bundle(self, bundle: BidBundle) -> None:
        backlog = bundle.backlog_s
        if not (math.isfinite(backlog) and backlog >= 0):
            log.warning("auction %s: bundle of %s has backlog %r: its bids are ignored",
                        self.auction_id, bundle.sender, backlog)
            backlog, bids = 0.0, ()
        else:
            bids = bundle.bids
        open_now = set(self._open)
        costs: dict[str, float] = {}
        for bid in bids:
            cost = bid.finish_s - backlog
            if bid.item_id not in open_now:
                why = "unknown item" if bid.item_id not in self._items else "item not open in this round"
            elif bid.item_id in costs:
                why = "second bid for the item"
            elif not (math.isfinite(bid.finish_s) and cost >= 0):
                why = f"finish_s {bid.finish_s!r} is not a finite time after its backlog {backlog!r}"
            else:
                costs[bid.item_id] = cost
                continue
            log.warning("auction %s: ignored bid of %s for %r: %s",
                        self.auction_id, bundle.sender, bid.item_id, why)
        self._backlog[bundle.sender] = backlog
        self._bundles[bundle.sender] = costs
        self._awaiting.discard(bundle.sender)
        self._answered.add(bundle.sender)

    def _take_reply(self, reply: AwardReply) -> None:
        awarded = self._awarded[reply.sender]
        declined = set(reply.declined)
        for item_id in reply.accepted:
            if item_id not in awarded:
                log.warning("auction %s: %s accepted %r, which it was not awarded",
                            self.auction_id, reply.sender, item_id)
            elif item_id in declined:
                log.warning("auction %s: %s both accepted and declined %r: taken as declined",
                            self.auction_id, reply.sender, item_id)
            else:
                self._fixed[item_id] = (reply.sender, awarded[item_id])
        self._awaiting.discard(reply.sender)
        self._answered.add(reply.sender)

    # -- rounds ----------------------------------------------------------------------------

    def _call(self, now: float) -> list[Outgoing]:
        self.phase = Phase.BIDDING
        self.round += 1
        self._bid_rounds += 1
        self._bundles = {}
        self._awaiting = set(self._alive)
        self._answered = set()
        self._deadline = now + self.round_timeout_s
        items = tuple(self._items[i] for i in self._open)
        # one message for all: the same object to every bidder lets the transport encode it once
        call = CallForBids(self.auction_id, self.round, self.name, items, self.round_timeout_s)
        return [Outgoing(b, call) for b in self._alive]

    def _close_bidding(self, now: float) -> list[Outgoing]:
        new = self._auction_open_items()
        self._awarded = {}
        for item_id, (bidder, cost) in new.items():
            self._awarded.setdefault(bidder, {})[item_id] = cost
        if not self._awarded:
            # Nobody bid on what is open: another round would get the same bids.
            return self._finish()
        self.phase = Phase.AWARDING
        self.round += 1
        self._awaiting = set(self._awarded)
        self._answered = set()
        self._deadline = now + self.round_timeout_s
        return [
            Outgoing(b, Award(self.auction_id, self.round, self.name, tuple(won), float(sum(won.values()))))
            for b, won in self._awarded.items()
        ]

    def _after_awards(self, now: float) -> list[Outgoing]:
        self._open = [i for i in self._order if i not in self._fixed]
        if self._open and self._alive and self._bid_rounds < self.max_bid_rounds:
            return self._call(now)
        return self._finish()

    def _auction_open_items(self) -> dict[str, tuple[str, float]]:
        """Run the core block by block over this round's bids: open item -> (bidder, cost)."""
        bidders = [b for b in self._alive if b in self._bundles]
        index = {b: k for k, b in enumerate(bidders)}
        # every bid of the round in one matrix (bidders x open items), sliced per block
        cost_all = np.array([[bids.get(i, np.inf) for i in self._open]
                             for bids in (self._bundles[b] for b in bidders)], dtype=np.float64)
        columns: dict[int, list[int]] = defaultdict(list)
        for k, item_id in enumerate(self._open):
            columns[self._items[item_id].block].append(k)
        fixed_by_block: dict[int, dict[str, tuple[str, float]]] = defaultdict(dict)
        for item_id, held in self._fixed.items():
            fixed_by_block[self._items[item_id].block][item_id] = held
        backlog = np.array([self._backlog[b] for b in bidders], dtype=np.float64)
        won: dict[str, tuple[str, float]] = {}
        start = 0.0
        for block in self._blocks:
            fixed = fixed_by_block.get(block, {})
            open_k = columns.get(block, [])
            held = dict(fixed)
            if open_k and bidders:
                cost = cost_all[:, open_k]
                base = np.maximum(0.0, backlog - start)
                for bidder, c in fixed.values():
                    if bidder in index:
                        base[index[bidder]] += c
                outcome = assign(cost, base, eps=self.eps)
                self._iterations += outcome.iterations
                for j, k in enumerate(open_k):
                    owner = int(outcome.owner[j])
                    if owner >= 0:
                        item_id = self._open[k]
                        won[item_id] = held[item_id] = (bidders[owner], float(cost[owner, j]))
            start += self._block_span(held, start)
        return won

    def _block_span(self, held: Mapping[str, tuple[str, float]], start: float) -> float:
        work: dict[str, float] = {}
        for bidder, cost in held.values():
            work[bidder] = work.get(bidder, 0.0) + cost
        return max((max(0.0, self._backlog[b] - start) + w for b, w in work.items()), default=0.0)

    def _finish(self) -> list[Outgoing]:
        self.phase = Phase.DONE
        self._deadline = None
        self._awaiting = set()
        finish: dict[int, dict[str, float]] = {}
        makespan: dict[int, float] = {}
        start = 0.0
        for block in sorted({item.block for item in self._items.values()}):
            held = {i: v for i, v in self._fixed.items() if self._items[i].block == block}
            span = self._block_span(held, start)
            ends: dict[str, float] = {}
            for bidder, cost in held.values():
                ends[bidder] = ends.get(bidder, start + max(0.0, self._backlog[bidder] - start)) + cost
            finish[block] = ends
            makespan[block] = span
            start += span
        owner = {i: self._fixed[i][0] for i in self._order if i in self._fixed}
        self._result = AuctionResult(
            auction_id=self.auction_id,
            owner=owner,
            unassigned=tuple(i for i in self._order if i not in self._fixed),
            finish_s=finish,
            makespan_s=makespan,
            rounds=self.round,
            iterations=self._iterations,
            dropped=tuple(self._dropped),
        )
        if self._result.unassigned:
            log.warning("auction %s: %d items unassigned after %d rounds",
                        self.auction_id, len(self._result.unassigned), self.round)
        self.round += 1
        return [
            Outgoing(b, Close(self.auction_id, self.round, self.name,
                              tuple(i for i, w in owner.items() if w == b)))
            for b in self._invited
        ]
