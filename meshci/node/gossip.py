"""The IO shell of membership: joining, heartbeats and their echoes, LAN discovery, and
the advert this node publishes about itself (`meshci.node.membership` decides; this
module only sends, receives and keeps the clock).

Heartbeats are cheap on purpose: on a slow device every millisecond of event-loop CPU is
a millisecond less for tiles. A heartbeat carries this node's identity and backlog; its
whole advert (curves, links) only when that changed since the last heartbeat to that peer;
the gossip list only when the view changed or every `GOSSIP_EVERY_S`. An echo answers a
heartbeat's timestamp with a few bytes (round trip and clock offset), not a heartbeat.
Any bytes on a peer's connections prove it alive (`Membership.touch`, fed by
`meshci.node.keeper`, which also redials lost connections). Heartbeats and echoes go on
the control lane (`meshci.node.connections`), never behind a tile frame.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from meshci.node.discovery import BEACON_INTERVAL_S, DiscoveryProtocol, discovery_socket, encode_beacon
from meshci.node.membership import HEARTBEAT_INTERVAL_S, Advert, Dial, PeerDown, PeerUp
from meshci.wire import Connection, Message, MsgType
from meshci.wire.errors import WireError

if TYPE_CHECKING:
    from meshci.node.server import Node

log = logging.getLogger(__name__)

GOSSIP_EVERY_S = 5.0  # the peer list rides on a heartbeat at least this often
ADVERT_EVERY_S = 10.0  # ... and the whole advert too, though unchanged
JOIN_REPLY_TIMEOUT_S = 5.0
MAX_CLOCK_SKEW_S = 86_400.0  # a peer clock further off than a day is a forged echo, not a clock


class Gossip:
    """Join, heartbeats, echoes and discovery of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.membership = node.membership
        self._beating: set[str] = set()  # peers with a heartbeat send in flight
        # per peer: (advert JSON it last got, when), (view it last got, when)
        self._advert_sent: dict[str, tuple[Any, float]] = {}
        self._view_sent: dict[str, tuple[Any, float]] = {}
        self.advert_heard: dict[str, float] = {}  # peer -> when its advert (backlog) was stated
        self._discovery: asyncio.DatagramTransport | None = None

    # ---- joining -------------------------------------------------------------------
    async def join(self) -> None:
        """Join through the --join peers: the first that accepts wins; a refusal is fatal."""
        from meshci.node.server import JoinFailed, JoinRefused

        node = self.node
        deadline = time.monotonic() + node.config.join_timeout_s
        last_error = "no --join peer given"
        while time.monotonic() < deadline:
            for address in node.config.join:
                try:
                    conn = await node.connections.open(address)
                    await node.connections.send(conn, self.greeting())
                    reply = await asyncio.wait_for(conn.recv(), timeout=JOIN_REPLY_TIMEOUT_S)
                except (WireError, OSError, TimeoutError) as exc:
                    # that peer is not reachable yet: try the next one, then retry until the deadline
                    last_error = f"{address}: {exc}"
                    continue
                if reply.kind is MsgType.ERROR:
                    conn.abort()
                    raise JoinRefused(f"join through {address} refused: {reply.meta.get('reason')}")
                now = time.monotonic()
                node.connections.adopt(conn.peer_name, conn)
                self.handle(self.membership.on_heartbeat(reply.meta, now, address.host, sender=conn.peer_name))
                self.handle(self.membership.on_welcome(reply.meta, now))
                log.info("joined the mesh through %s (%s)", conn.peer_name, address)
                return
            await asyncio.sleep(0.3)
        raise JoinFailed(f"could not join the mesh within {node.config.join_timeout_s:g} s ({last_error}): "
                         "start a node at a --join address first, or check its port and firewall")

    def greeting(self) -> Message:
        """The JOIN a node sends first on every new outbound connection."""
        return Message(MsgType.JOIN, 0, self.membership.join_payload())

    async def on_join(self, conn: Connection, msg: Message) -> None:
        now = time.monotonic()
        host = _peer_host(conn)
        if msg.meta.get("welcome"):
            # the answer to a JOIN we sent on one of our outbound connections
            self.handle(self.membership.on_heartbeat(msg.meta, now, host, sender=conn.peer_name))
            if msg.meta.get("name") == conn.peer_name:
                self.handle(self.membership.on_welcome(msg.meta, now))
            return
        events, refusal = self.membership.on_join(msg.meta, now, host, sender=conn.peer_name)
        if refusal is not None:
            await self.node.reply_error(conn, 0, refusal.reason)
            conn.abort()
            return
        self.advert_heard[conn.peer_name] = now
        await self.node.connections.send(conn, Message(MsgType.JOIN, 0, {
            **self.membership.heartbeat(), **self.membership.welcome(), "welcome": True}))
        self.handle(events)

    async def on_leave(self, conn: Connection, msg: Message) -> None:
        self.handle(self.membership.on_leave(conn.peer_name, time.monotonic()))

    # ---- peer events ---------------------------------------------------------------
    def handle(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Dial):
                self.node.spawn(self._greet(event.name))
            elif isinstance(event, PeerDown):
                self.node.peer_down(event.name, event.reason)
            elif isinstance(event, PeerUp):
                log.info("%s: peer %s joined", self.node.name, event.name)

    async def _greet(self, name: str) -> None:
        try:
            await self.node.connections.to(name)
        except WireError as exc:
            # unreachable for now: the failure detector decides whether it is dead
            log.info("cannot reach %s yet: %s", name, exc)

    def forget(self, name: str) -> None:
        self._advert_sent.pop(name, None)
        self._view_sent.pop(name, None)
        self.advert_heard.pop(name, None)

    # ---- heartbeats ----------------------------------------------------------------
    async def heartbeat_loop(self) -> None:
        node = self.node
        while not node.stopped:
            now = time.monotonic()
            node.keeper.tick(now)
            self.handle(self.membership.tick(now))
            self.membership.set_advert(node.advert())
            advert = self.membership.advert.to_json()
            advert.pop("backlog_s", None)  # rides on every heartbeat on its own
            view = tuple((p.name, p.incarnation) for p in self.membership.alive())
            for peer in self.membership.peers():
                conn = node.connections.lane(peer.name, MsgType.GOSSIP)
                if peer.status.value == "dead" or conn is None or peer.name in self._beating:
                    continue  # at most one heartbeat in flight per peer: a send stuck behind a
                    # blocked connection is not joined by another every interval
                send_advert = _due(self._advert_sent.get(peer.name), advert, now, ADVERT_EVERY_S)
                send_view = _due(self._view_sent.get(peer.name), view, now, GOSSIP_EVERY_S)
                if send_advert:
                    self._advert_sent[peer.name] = (advert, now)
                if send_view:
                    self._view_sent[peer.name] = (view, now)
                beat = {**self.membership.heartbeat(advert=send_advert, gossip=send_view),
                        "sent": time.perf_counter()}
                self._beating.add(peer.name)
                node.spawn(self._beat(peer.name, conn, Message(MsgType.GOSSIP, 0, beat)))
            for name in [n for n in self.advert_heard if self.membership.peer(n) is None]:
                self.forget(name)  # its tombstone expired: nothing about it is kept
            node.sweep(now)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _beat(self, name: str, conn: Connection, msg: Message) -> None:
        try:
            await self.node.send_quietly(conn, msg)
        finally:
            self._beating.discard(name)

    async def on_gossip(self, conn: Connection, msg: Message) -> None:
        node = self.node
        meta = msg.meta
        if meta.get("op") == "echo":
            self._on_echo(conn.peer_name, meta)
            return
        now = time.monotonic()
        self.handle(self.membership.on_heartbeat(meta, now, _peer_host(conn), sender=conn.peer_name))
        if meta.get("name") == conn.peer_name and self.membership.is_alive(conn.peer_name):
            self.advert_heard[conn.peer_name] = now  # its backlog is as of now
        sent = meta.get("sent")
        back = node.connections.lane(conn.peer_name, MsgType.GOSSIP)
        if type(sent) is float and math.isfinite(sent) and back is not None:
            node.spawn(node.send_quietly(back, Message(
                MsgType.GOSSIP, 0, {"op": "echo", "echo": sent, "wall": time.time()})))

    def _on_echo(self, peer: str, meta: dict[str, Any]) -> None:
        """Our heartbeat's timestamp came back: a round trip, and the peer's clock. Only
        from a peer (alive, or one we dialled and greeted: its first echo may come before
        its first heartbeat), and only a timestamp we could have sent and a clock within
        `MAX_CLOCK_SKEW_S` of ours (a forged echo must not make a link's latency absurd)."""
        sent, wall = meta.get("echo"), meta.get("wall")
        known = self.membership.is_alive(peer) or peer in self.node.connections.outbound
        if not known or type(sent) is not float or not math.isfinite(sent):
            return
        rtt = time.perf_counter() - sent
        if not 0.0 <= rtt < 60.0:
            return  # not a timestamp we could have sent
        self.node.links.observe_rtt(peer, rtt)
        self.membership.observe_rtt(peer, rtt)
        now_wall = time.time()
        if type(wall) is float and abs(wall - now_wall) < MAX_CLOCK_SKEW_S:
            self.node.boundary.observe_echo(peer, rtt, wall, now_wall)

    # ---- discovery -----------------------------------------------------------------
    async def start_discovery(self) -> None:
        node = self.node
        target = node.config.discover
        assert target is not None
        loop = asyncio.get_running_loop()
        secret = None if node.config.insecure else node.config.secret
        transport, _ = await loop.create_datagram_endpoint(
            lambda: DiscoveryProtocol(secret, self._on_beacon), sock=discovery_socket(target.port))
        self._discovery = transport

        async def beacons() -> None:
            while not node.stopped:
                try:
                    transport.sendto(encode_beacon(self.membership.self_digest(), secret, time.time()),
                                     (target.host, target.port))
                except OSError as exc:
                    # no route for broadcast right now (interface down): try again later
                    log.info("cannot send a discovery beacon to %s: %s", target, exc)
                await asyncio.sleep(BEACON_INTERVAL_S)

        node.spawn(beacons())

    def _on_beacon(self, digest: dict[str, Any], sender_ip: str) -> None:
        if digest.get("name") == self.node.name:
            if digest.get("incarnation") != self.membership.incarnation:
                log.warning("another node announces our name %r from %s", self.node.name, sender_ip)
            return
        self.handle(self.membership.learn(digest, time.monotonic(), sender_ip))

    def close(self) -> None:
        if self._discovery is not None:
            self._discovery.close()


def _due(last: tuple[Any, float] | None, current: Any, now: float, every_s: float) -> bool:
    """Whether a part of the heartbeat must ride again: it changed, or it is old."""
    return last is None or last[0] != current or now - last[1] >= every_s


def _peer_host(conn: Connection) -> str | None:
    return conn.peer_address[0] if isinstance(conn.peer_address, tuple) else None


__all__ = ["Gossip", "Advert"]
