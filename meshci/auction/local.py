"""Running auctions in-process: the same state machines as on the network.

`run_local_auction` delivers the messages of one auction between an `Auctioneer` and its
`Bidder`s through an in-memory FIFO, round-tripping each message through its JSON form (as
the node does), and advances a fake clock to the next deadline when nothing is in flight.
`LocalRouter` does the same for several auctions at once over shared bidders, in the
interleaving the caller chooses; it also lets tests drop bidders on purpose.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence

from meshci.auction.auctioneer import AuctionResult, Auctioneer
from meshci.auction.bidder import Bidder
from meshci.auction.errors import AuctionError
from meshci.auction.messages import Item, Outgoing, message_from_json

__all__ = ["LocalRouter", "run_local_auction"]


class LocalRouter:
    """An in-memory network of auctioneers and bidders with a fake clock.

    ``silent`` names bidders that receive messages but never answer (a dead peer).
    """

    def __init__(self, bidders: Sequence[Bidder], *, silent: Collection[str] = ()) -> None:
        self.bidders = {b.name: b for b in bidders}
        if len(self.bidders) != len(bidders):
            raise AuctionError("bidder names must be unique")
        self.auctioneers: dict[str, Auctioneer] = {}
        self.silent = set(silent)
        self.now = 0.0
        self.delivered = 0
        self._queue: deque[tuple[str, Outgoing]] = deque()  # (from, outgoing)

    def add(self, auctioneer: Auctioneer) -> None:
        if auctioneer.name in self.auctioneers or auctioneer.name in self.bidders:
            raise AuctionError(f"name {auctioneer.name!r} already on this router")
        self.auctioneers[auctioneer.name] = auctioneer

    def post(self, sender: str, messages: Sequence[Outgoing]) -> None:
        self._queue.extend((sender, m) for m in messages)

    def step(self) -> bool:
        """Deliver one message; False when none is in flight."""
        if not self._queue:
            return False
        _, out = self._queue.popleft()
        message = message_from_json(out.message.to_json())
        self.delivered += 1
        if out.to in self.auctioneers:
            self.post(out.to, self.auctioneers[out.to].receive(message, self.now))
        elif out.to in self.bidders:
            replies = self.bidders[out.to].receive(message, self.now)
            if out.to not in self.silent:
                self.post(out.to, replies)
        else:
            raise AuctionError(f"message for {out.to!r}, who is not on this router")
        return True

    def run(self) -> None:
        """Deliver everything, firing deadlines, until every auctioneer is done."""
        while True:
            while self.step():
                pass
            pending = [a for a in self.auctioneers.values() if not a.done]
            if not pending:
                return
            deadlines = [a.next_deadline for a in pending if a.next_deadline is not None]
            if not deadlines:
                raise AuctionError("auctions stalled with nothing in flight and no deadline")
            self.now = max(self.now, min(deadlines))
            for a in pending:
                self.post(a.name, a.tick(self.now))


def run_local_auction(
    items: Sequence[Item],
    bidders: Sequence[Bidder],
    now: float = 0.0,
    *,
    auction_id: str = "local",
    auctioneer: str = "auctioneer",
    round_timeout_s: float = 0.25,
    max_bid_rounds: int = 3,
    eps: float = 1e-3,
) -> AuctionResult:
    """Run one auction among in-process bidders, exactly as over the network."""
    router = LocalRouter(bidders)
    router.now = now
    machine = Auctioneer(
        auction_id,
        auctioneer,
        items,
        [b.name for b in bidders],
        round_timeout_s=round_timeout_s,
        max_bid_rounds=max_bid_rounds,
        eps=eps,
    )
    router.add(machine)
    router.post(machine.name, machine.start(now))
    router.run()
    return machine.result()
