"""Which queued work a device's compute thread runs next, when several requests (from one
requester or several) wait for it. Pure: no threads, no clock (a request's age is given).

The order:

* **Round-robin between requesters.** The requester served longest ago goes next, so a
  requester with a deep backlog of requests cannot hold a device from another requester
  (each requester is the auctioneer of its own requests; this is how their requests
  share a device's time).
* **Oldest request first within a requester.** Of one requester's requests, the one that
  reached this device first (its `since`) goes first: its requests finish one after
  another instead of all at the end (the mean wait is halved against sharing the device
  between them), and a request is never overtaken by a later one of the same requester,
  so none starves.
* **First in, first out within a request.**

A request waits at most one turn of every other requester with work for each of its
tiles: no request starves while its requester keeps sending.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Request(Generic[T]):
    since: float
    order: int  # ties of `since`: the one pushed first
    items: deque[T] = field(default_factory=deque)


class FairQueue(Generic[T]):
    """Queued work keyed by (requester, request id); `pop` gives the next to run."""

    def __init__(self) -> None:
        self._requesters: dict[str, dict[int, _Request[T]]] = {}
        self._turns: deque[str] = deque()  # requesters with work, the next to be served first
        self._pushed = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, requester: str, request: int, since: float, item: T) -> None:
        """Queue `item` of `request` (from `requester`, first seen here at `since`)."""
        requests = self._requesters.get(requester)
        if requests is None:
            requests = self._requesters[requester] = {}
            self._turns.append(requester)
        entry = requests.get(request)
        if entry is None:
            entry = requests[request] = _Request(since, self._pushed)
        self._pushed += 1
        entry.items.append(item)
        self._size += 1

    def pop(self) -> T | None:
        """The next item to run (None when nothing waits); its requester's turn goes to the
        back of the round."""
        if not self._turns:
            return None
        requester = self._turns.popleft()
        requests = self._requesters[requester]
        request = min(requests, key=lambda rid: (requests[rid].since, requests[rid].order))
        entry = requests[request]
        item = entry.items.popleft()
        self._size -= 1
        if not entry.items:
            del requests[request]
        if requests:
            self._turns.append(requester)
        else:
            del self._requesters[requester]
        return item

    def waiting(self) -> dict[str, dict[int, int]]:
        """Items waiting, by requester and request (for stats and tests)."""
        return {requester: {rid: len(entry.items) for rid, entry in requests.items()}
                for requester, requests in self._requesters.items()}


__all__ = ["FairQueue"]
