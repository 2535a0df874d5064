"""How many handshakes a listener runs at once (pure bookkeeping)."""

from __future__ import annotations

from meshci.wire.errors import LocalProtocolError


class HandshakeLimiter:
    """Caps the handshakes in progress on one listener, in total and per source address.

    A peer that has proven nothing may hold a connection open until the handshake times
    out; without a cap a flood of such connections exhausts file descriptors, and with only
    a total cap one address can take every slot. Pass one limiter per listening socket to
    `Connection.accept(..., limiter=)`: a connection that arrives while `max_pending`
    handshakes run, or `per_source` from its address, is refused at once (logged)."""

    def __init__(self, max_pending: int = 64, per_source: int | None = None) -> None:
        if max_pending < 1 or (per_source is not None and per_source < 1):
            raise ValueError(f"max_pending and per_source must be at least 1, got {max_pending}, {per_source}")
        self.max_pending = max_pending
        self.per_source = per_source
        self.pending = 0
        self.refused = 0
        self._by_source: dict[str, int] = {}

    def try_acquire(self, source: str | None = None) -> bool:
        """Take a slot for one handshake from `source`; False (and counted) when none is free."""
        mine = self._by_source.get(source, 0) if source is not None else 0
        if self.pending >= self.max_pending or (self.per_source is not None and mine >= self.per_source):
            self.refused += 1
            return False
        self.pending += 1
        if source is not None:
            self._by_source[source] = mine + 1
        return True

    def release(self, source: str | None = None) -> None:
        """Give back a slot taken by `try_acquire(source)`."""
        if self.pending <= 0 or (source is not None and not self._by_source.get(source)):
            raise LocalProtocolError("HandshakeLimiter.release() without a matching acquire")
        self.pending -= 1
        if source is not None:
            self._by_source[source] -= 1
            if not self._by_source[source]:
                del self._by_source[source]

    def pending_from(self, source: str) -> int:
        return self._by_source.get(source, 0)


__all__ = ["HandshakeLimiter"]
