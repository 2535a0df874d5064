"""AWAS: auction-based workload assignment (EdgeCI, Chen et al., ACM TOIT 2024).

`assign` is the numpy core run over a bid matrix, `balance_strips` levels the strips of a
block after the auction, `Auctioneer` and `Bidder` are the sans-IO state machines that
the mesh node runs, `run_local_auction` drives them in-process. See the submodules'
docstrings for the design.
"""

from meshci.auction.auctioneer import AuctionResult, Auctioneer, Phase
from meshci.auction.balance import balance_strips
from meshci.auction.bidder import Bidder, Commitment
from meshci.auction.core import Assignment, assign, lower_bound
from meshci.auction.errors import AuctionError, MessageFormatError
from meshci.auction.local import LocalRouter, run_local_auction
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
    message_from_json,
)

__all__ = [
    "Assignment",
    "AuctionError",
    "AuctionMessage",
    "AuctionResult",
    "Auctioneer",
    "Award",
    "AwardReply",
    "Bid",
    "BidBundle",
    "Bidder",
    "CallForBids",
    "Close",
    "Commitment",
    "Item",
    "LocalRouter",
    "MessageFormatError",
    "Outgoing",
    "Phase",
    "assign",
    "balance_strips",
    "lower_bound",
    "message_from_json",
    "run_local_auction",
]
