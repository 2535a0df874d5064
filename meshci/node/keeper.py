"""Keeps a node's links to its peers: the IO shell of `meshci.node.liveness`.

On every heartbeat tick (before the failure detector runs) the keeper

* tells membership when bytes last arrived on each of a peer's connections, either lane,
  either direction, whole frame or not (`Membership.touch`): a peer streaming a tile that
  takes ten seconds on the wire is heard all along;
* redials the peers whose bulk lane is gone, alive ones and the tombstones of failed ones
  (not those that left), as `Redialer` says: at once, then with jittered, capped
  exponential back-off. A redial greets the peer with a JOIN; the peer's answer (or its
  next heartbeat) is the fresh proof of life that revives a tombstone on either side;
* when one of this node's own lanes to a peer breaks, redials it at once and tells the
  requests that depend on that link: frames written on it may never have arrived, and a
  link that heals in half a second no longer ends in the peer's death 3 s later, which is
  how such requests used to learn it (`link_lost`).

Nothing here decides: it only reads connection times and opens connections.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from meshci.node.liveness import Redialer
from meshci.wire.errors import WireError

if TYPE_CHECKING:
    from meshci.node.server import Node

log = logging.getLogger(__name__)


class LinkKeeper:
    """Byte-level liveness and redials of one node."""

    def __init__(self, node: Node, redialer: Redialer | None = None) -> None:
        self.node = node
        self.redialer = redialer or Redialer()
        self.redials = 0  # dials that restored a lost link
        self.failed_redials = 0

    def tick(self, now: float) -> None:
        node = self.node
        membership = node.membership
        for conn in node.connections.peer_connections():
            membership.touch(conn.peer_name, min(now, conn.heard_at()))
        wanted = set()
        for peer in membership.redial_candidates():
            wanted.add(peer.name)
            if node.connections.is_open(peer.name):
                self.redialer.succeeded(peer.name)
            elif self.redialer.due(peer.name, now):
                node.spawn(self._redial(peer.name))
        for name in self.redialer.tracked():
            if name not in wanted:
                self.redialer.forget(name)

    def link_lost(self, name: str) -> None:
        node = self.node
        reason = f"the connection to {name} was lost"
        node.requester.device_down(name, reason)  # our requests that use it
        for rid, work in list(node.worker.contexts.items()):
            # our work for that requester, or for a request that device takes part in
            if work.requester == name or (work.run is not None and name in work.run.plan.devices):
                # `lost`: the device its requester runs the request again without (`attempts.py`):
                # the one we lost, or, when we lost the requester itself, us
                lost = node.name if work.requester == name else name
                node.spawn(node.fail_request(rid, work.requester, reason, lost=lost))
        peer = node.membership.peer(name)
        if peer is not None and peer.heard_directly and not peer.left and not node.connections.is_open(name) \
                and self.redialer.due(name, time.monotonic()):
            node.spawn(self._redial(name))

    async def _redial(self, name: str) -> None:
        try:
            await self.node.connections.to(name)
        except WireError as exc:
            self.failed_redials += 1
            wait = self.redialer.failed(name, time.monotonic())
            log.info("%s: cannot redial %s (%s); next try in %.2f s", self.node.name, name, exc, wait)
        else:
            self.redials += 1
            self.redialer.succeeded(name)
            log.info("%s: redialled %s", self.node.name, name)
