"""Errors of the auction: our own mistakes versus a peer's.

Like h11's LocalProtocolError / RemoteProtocolError, the two are kept apart. A local
mistake (a malformed cost matrix, asking for a result before the auction ended) raises
`AuctionError`. A peer's mistake (a bid for an unknown item, a NaN bid, a stale round) never
raises out of the state machines: it is ignored and logged. `MessageFormatError` is raised
only by `message_from_json` when bytes off the wire do not form a message; the node catches
it, logs it and drops the frame.
"""

from __future__ import annotations

from meshci.errors import MeshciError


class AuctionError(MeshciError):
    """A local mistake in using the auction API (bad arrays, wrong state, bad arguments)."""


class MessageFormatError(ValueError):
    """A peer sent something that is not a well-formed auction message."""
