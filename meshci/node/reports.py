"""What a node says about itself: its advert and link view (what the planner and bidders
price), its bidder's link price, its spans of a request's timeline, its view of the mesh,
its statistics and what requests leave on it. A mixin of `Node` (`server.py`): reading
the node's parts, deciding nothing."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from meshci import __version__
from meshci.cost.cluster import LinkSpec
from meshci.node.memory import peak_rss_mb, rss_mb
from meshci.node.membership import MAX_ADVERT_LINKS, Advert
from meshci.node.trace import Span, wall_of
from meshci.node.view import member_row, mesh_view

if TYPE_CHECKING:
    from meshci.node.server import Node


class NodeReports:
    def advert(self: Node) -> Advert:
        backlog = max(0.0, self.runtime.queued_s)
        advert = self.runtime.advert(self.config.gflops, backlog, self.link_view(),
                                     _sig3((self.boundary.handling_s or 0.0) * 1000.0))
        return replace(advert, version=__version__, memory_mb=self.memory_budget_mb)

    def link_view(self: Node) -> tuple[tuple[str, float, float], ...]:
        """(peer, Mbit/s, per-message ms) per measured link: bandwidth as delivered here
        (bytes of the tile frames received from the peer over the time they took to land;
        0 when nothing large came from it yet); the per-message latency is the one-way delivery this node measured on tile messages
        (half the heartbeat round trip before any); this node's per-tile handling travels
        beside it (`Advert.tile_ms`), charged per tile. Rounded to 3
        significant digits: they ride in the advert, which is resent when it changes."""
        known = self.links.known()
        names = sorted(n for n in set(known) | set(self.boundary.peers()) if self.membership.is_alive(n))
        names = names[:MAX_ADVERT_LINKS]  # what a peer accepts in an advert
        fallback = self.config.default_link
        # bandwidth 0: not measured here (the planner takes the peer's figure, or its default)
        return tuple((n, _sig3(self.links.measured_mbps(n) or 0.0),
                      _sig3(self.boundary.link_latency_ms(n, known[n].latency_ms if n in known
                                                          else fallback.latency_ms)))
                     for n in names)

    def link_s(self: Node, n_bytes: int, peer: str) -> float:
        """A bidder's price for moving `n_bytes` to or from `peer`: the same measured
        per-message cost the planner sees (`link_view`), plus the bytes' wire time."""
        if peer == self.name:
            return 0.0
        spec = self.links.estimate(peer, self.config.default_link)
        latency_ms = self.boundary.link_latency_ms(peer, spec.latency_ms)
        return LinkSpec(spec.mbps, latency_ms).transfer_s(n_bytes)

    def _trace_receive(self: Node, rid: int, sender: str, arrival: Any, received_at: float) -> None:
        """A PLAN or TILE frame's arrival in the request's timeline: from its first byte read
        to its last."""
        if arrival is None:
            self.trace.record(rid, Span(f"receive from {sender}", "receive", received_at, 0.0, {"from": sender}))
            return
        start = wall_of(arrival.began)
        self.trace.record(rid, Span(f"receive from {sender}", "receive", start, max(0.0, arrival.ended - arrival.began),
                                    {"from": sender, "bytes": arrival.nbytes}))

    def trace_answer(self: Node, rid: Any) -> dict[str, Any]:
        """This node's spans of request `rid`, and its clock offsets to its peers (their clock
        minus ours, from heartbeat echoes) so a client can align every device's times."""
        if isinstance(rid, bool) or not isinstance(rid, int):
            raise ValueError("a trace request names its request id: {'op': 'trace', 'request': ID}")
        offsets = {p.name: offset for p in self.membership.alive()
                   if (offset := self.boundary.clock_offset(p.name)) is not None}
        return {"name": self.name, "spans": [s.to_json() for s in self.trace.spans(rid)], "clock_offsets": offsets}

    def members(self: Node) -> list[dict[str, Any]]:
        """The mesh as this node sees it: itself, then every member it believes up."""
        own = member_row(self.name, str(self.address), "self", self.advert(), 0.0)
        own["requests_in_flight"] = len(self.requester.contexts)
        own["tiles_computed"] = self.runtime.tiles_computed
        return mesh_view(own, self.membership.alive(), time.monotonic())

    def stats(self: Node) -> dict[str, Any]:
        return {
            "name": self.name,
            "gflops": self.config.gflops,
            "sent_bytes": dict(self.connections.sent_bytes),
            "received_bytes": dict(self.connections.received_bytes),
            "relayed_boundary_bytes": self.relayed_boundary_bytes,
            "tiles_computed": self.runtime.tiles_computed,
            "compute_s": self.runtime.compute_s,
            # CPU of the event-loop thread (stats runs on it) less the tiles it computed inline
            "loop_cpu_s": time.thread_time() - self.runtime.inline_cpu_s,
            "requests_served": self.requester.requests_served,
            "errors_replied": self.errors_replied,
            "peer_failures": self.metrics.peer_failures,
            "redials": self.keeper.redials,
            "control_lanes": sum(not c.closed for c in self.connections.control.values()),
            "peers": {p.name: p.status.value if p.heard_directly else "known"
                      for p in self.membership.peers()},
            "links": {peer: {"mbps": spec.mbps, "latency_ms": spec.latency_ms}
                      for peer, spec in sorted(self.links.known().items())},
            "planned_links": {peer: {"mbps": mbps, "latency_ms": ms} for peer, mbps, ms in self.link_view()},
            "tile_handling_ms": (self.boundary.handling_s or 0.0) * 1000.0,
            "advert": self.advert().to_json(),
            "rss_mb": rss_mb(),
            "peak_rss_mb": peak_rss_mb(),
            "memory_budget_mb": self.memory_budget_mb,
            "shipped": {"sent_bytes": self.shipping.bytes_sent, "received_bytes": self.shipping.bytes_received,
                        "tampered": self.shipping.store.tampered},
        }

    def request_state(self: Node) -> dict[str, Any]:
        """Everything requests leave on this node until they end; all zero/empty when idle."""
        return {
            "requests": len(self.requester.contexts),
            "work": len(self.worker.contexts),
            "auctions": len(self.requester.auctions),
            "bid_auctions": len(self.worker.bid_auctions),
            "bidder_auctions": self.worker.bidder.auctions(),
            "bidder_backlog_s": self.worker.bidder.backlog_s - self.worker.bidder.base_backlog_s,
            "queued_s": round(self.runtime.queued_s, 9),
        }


MAX_ADVERTISED = 6e4  # ms or Mbit/s: within every advert bound (`membership.MAX_TILE_MS`)


def _sig3(value: float) -> float:
    """3 significant digits, within what a peer accepts in an advert (a figure that went
    infinite here must not make this node's own adverts refused everywhere)."""
    value = value if math.isfinite(value) else MAX_ADVERTISED
    return float(f"{min(max(value, 0.0), MAX_ADVERTISED):.3g}")

