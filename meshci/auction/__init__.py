"""AWAS: auction-based workload assignment (EdgeCI, Chen et al., ACM TOIT 2024).

`assign` is the numpy core run over a bid matrix, `balance_strips` levels the strips of a
block after the auction. See the submodules' docstrings for the design.
"""

from meshci.auction.balance import balance_strips
from meshci.auction.core import Assignment, assign, lower_bound
from meshci.auction.errors import AuctionError, MessageFormatError

__all__ = [
    "Assignment",
    "AuctionError",
    "MessageFormatError",
    "assign",
    "balance_strips",
    "lower_bound",
]
