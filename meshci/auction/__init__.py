"""AWAS: auction-based workload assignment (EdgeCI, Chen et al., ACM TOIT 2024).

The paper's AWAS balances the workload of a CNN inference over a cluster of IoT devices by
auctioning workload partitions — the tiles of a fused block, each with its "extended"
workload (halo rows included) — so that each goes to the device that matches it best,
valued from the device's computing capability, the work it already carries and its
communication cost. How that maps onto this package:

* The node that receives a request is the auctioneer (`Auctioneer`, sans-IO); every mesh
  device is a bidder (`Bidder`, pure). Items (`Item`) are row strips of a block's output
  with their FLOPs (halo included) and the bytes they receive and send.
* A bidder's valuation of an item is its predicted finish time if it wins it: the work it
  holds (base backlog plus what it won in other auctions), plus its own speed model on the
  item, plus its own link estimates for the item's transfers. Only the device knows these;
  the auctioneer never models a peer.
* Winner determination (`assign`) minimises the block's makespan over the bid matrix: an
  opening round of lowest-finish-time bids, then eps price rises on the contested items
  (those of the bidder finishing last), then, on small matrices, a bounded exact search.
* Balancing (`balance_strips`): the winners' strips are made contiguous in row order and
  their boundaries moved so predicted finish times are level; a device that would slow
  the block is left out, so the degree of parallelism follows from the bids.

Simplified or added here, beyond what the paper describes:

* Network rounds are batched: one CallForBids carries every item of every block of the
  request and each bidder answers one BidBundle; the price rises then run locally at the
  auctioneer over that bid matrix instead of as message rounds, so a request needs 2 round
  trips (Award/AwardReply is the second), 4 or 6 when awards are declined
  (``max_bid_rounds``, default 3). A bidder missing a round's deadline is dropped.
* Bids are per item; a bidder's cost for a bundle is taken as the sum of its item costs
  (no bundle discounts, e.g. shared halo rows of adjacent strips; balancing recovers those).
* Blocks are auctioned one after the other on the same bids; a bidder's backlog delays
  block k only by what is left of it when block k starts.
* Concurrent auctions: bidders account for work won elsewhere and decline awards they can
  no longer honour (capacity, or a finish time beyond their bid's tolerance); declined
  items are re-auctioned. There is no global lock and no preemption.
* The bounded search on small bid matrices (phase 3 of `assign`) is ours, for quality when
  tiles are few and indivisible.

Public API: `assign`, `lower_bound`, `balance_strips`, `Auctioneer`, `Bidder`,
`run_local_auction` / `LocalRouter`, the messages and `message_from_json`.
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
