"""The asyncio mesh node: moves bytes and fires timers around the sans-IO cores.

Decisions live elsewhere: who is in the mesh (`membership`), what a request does next
(`request`), how tiles are auctioned (`meshci.auction`), what the plan is
(`meshci.planning`). This module only owns sockets, tasks and counters.

Connections: every node dials each peer it learns about and uses that outbound
connection to send; what arrives on any connection (outbound or accepted) is dispatched
the same way. A client (`meshci infer`) gets its answer on the connection it asked on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from meshci.cost.cluster import LinkSpec
from meshci.errors import MeshciError, PlanningError
from meshci.auction.bidder import Bidder
from meshci.auction.errors import AuctionError, MessageFormatError
from meshci.auction.messages import Award, CallForBids, Close, Outgoing
from meshci.cost.links import LinkEstimator
from meshci.node.auction import (
    AUCTION_KINDS, NetworkAuction, auction_items, awarded_plan, from_message, to_message,
)
from meshci.node.latency import BoundaryCosts, PlanCalibration, plan_hops
from meshci.node.discovery import BEACON_INTERVAL_S, DiscoveryProtocol, discovery_socket, encode_beacon
from meshci.node.membership import (
    HEARTBEAT_INTERVAL_S, Address, Advert, Dial, Membership, PeerDown, PeerUp,
)
from meshci.node.request import (
    Action, Compute, RequesterRun, RequestStateError, SendPiece, TrunkDone, WorkerRun,
    cluster_from_view, device_signature, tensor_bytes,
)
from meshci.models.registry import check_model_allowed
from meshci.node.runtime import LoadedModel, Runtime
from meshci.planning import STRATEGIES, Plan, make_plan
from meshci.planning.evaluate import evaluate_plan
from meshci.trunk import Region
from meshci.wire import Connection, HandshakeLimiter, Message, MsgType
from meshci.wire.errors import ConnectionClosed, HandshakeTimeout, RemoteProtocolError, WireError

log = logging.getLogger(__name__)

LOOPBACK_LINK = LinkSpec(mbps=1000.0, latency_ms=0.2)
# Timeouts, one consistent chain: a worker that cannot build its model within
# REQUEST_TIMEOUT_S fails the request (so its requester hears why before giving up); the
# requester waits REQUEST_TIMEOUT_S for the trunk and then cancels the request everywhere;
# worker state no cancel reached is swept WORK_TTL_S after it was created (longer than any
# request can live). Pieces with no PLAN at all are dropped after ORPHAN_PIECE_TTL_S; a
# context whose PLAN is still loading is never swept (that load is bounded by its own timeout).
REQUEST_TIMEOUT_S = 300.0
ORPHAN_PIECE_TTL_S = 30.0
WORK_TTL_S = REQUEST_TIMEOUT_S + 2 * ORPHAN_PIECE_TTL_S
CANCEL_SEND_TIMEOUT_S = 5.0
LEAVE_TIMEOUT_S = 2.0  # close() waits at most this for its LEAVE notices
PLAN_TTL_S = 30.0
MAX_INPUT_SIDE = 4096
# a tile predicted to compute within this runs on the event loop, not the compute thread:
# short enough for heartbeats and other requests, and it saves the thread's two wake-ups
INLINE_COMPUTE_S = 0.05
LINK_STEP = 2.0  # a cached plan is reused until a link's measured cost moves by this factor
RATIO_STEP = 1.05  # ... or a device's learned compute ratio moves by this factor
REPLAN_MIN_S = 10.0  # ... and is at least this old


class JoinRefused(MeshciError):
    """The mesh refused this node (duplicate name) or no --join peer could be reached."""


class RequestFailed(Exception):
    """A request cannot complete; the message is the reason sent back to the client."""


@dataclass(frozen=True)
class NodeConfig:
    name: str
    listen: Address
    join: tuple[Address, ...] = ()
    secret: bytes | None = None  # None only together with insecure=True
    insecure: bool = False
    threads: int = 1
    gflops: float = 1.0
    measure_curves: bool = False  # measure per-segment speed curves per model (nodes that measured their gflops)
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    default_link: LinkSpec = LOOPBACK_LINK
    join_timeout_s: float = 10.0
    discover: Address | None = None  # broadcast address:port for LAN beacons (None: off)
    # user models (`pkg.mod:callable`) this node may import: exact names or `pkg.*`; built-in
    # models are always served. Anyone who can send a request names the model, so the default
    # is none: a request cannot make the node import arbitrary installed code
    allow_models: tuple[str, ...] = ()


@dataclass
class _RequesterContext:
    run: RequesterRun
    loaded: LoadedModel
    done: asyncio.Future[torch.Tensor]
    devices: frozenset[str]
    path_s: float = 0.0  # critical path (compute + transfer) of the trunk output so far


@dataclass
class _WorkerContext:
    requester: str
    run: WorkerRun | None = None
    loaded: LoadedModel | None = None
    early: list[tuple[Message, float]] = field(default_factory=list)  # pieces before the plan
    path_in: dict[int, float] = field(default_factory=dict)  # block -> latest input path
    created: float = field(default_factory=time.monotonic)
    plan_pending: bool = False  # a PLAN arrived and its model is loading: not an orphan


class Node:
    """One mesh node. `await start()`, then `await wait_closed()`; `stop()` from anywhere."""

    def __init__(self, config: NodeConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        self.name = config.name
        self.runtime = runtime or Runtime(config.threads, curves=config.measure_curves)
        self._handshakes = HandshakeLimiter(max_pending=64)
        self.membership = Membership(config.name, config.listen, incarnation=time.time_ns(),
                                     advert=Advert(gflops=config.gflops))
        self._server: asyncio.base_events.Server | None = None
        self._discovery: asyncio.DatagramTransport | None = None
        self._outbound: dict[str, Connection] = {}
        self._dialing: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._inbound: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._requests: dict[int, _RequesterContext] = {}
        self._work: dict[int, _WorkerContext] = {}
        self._auctions: dict[int, tuple[NetworkAuction, asyncio.Event]] = {}
        # DPFL plans by (model, seed, size, strategy, devices and speeds): the cuts depend on
        # stable facts; for edgeci the network auction still reassigns tiles per request
        self._plans: dict[tuple[Any, ...], tuple[Plan, float, tuple[Any, ...]]] = {}  # plan, made, links
        self._replanning: set[tuple[Any, ...]] = set()
        self._items: dict[int, tuple[Plan, list[Any]]] = {}  # auction items of a cached plan
        self._stopped = asyncio.Event()
        self.links = LinkEstimator()
        self.boundary = BoundaryCosts()  # measured per-message delivery and per-tile handling
        self.calibration = PlanCalibration()  # learned from this node's own completed requests
        self._advert_heard: dict[str, float] = {}  # peer -> when its own heartbeat's advert arrived
        self._warm: set[tuple[str, str, int, tuple[int, int]]] = set()  # (device, model, seed, size) built
        self.bidder = Bidder(config.name, self._compute_s, self._link_s)
        # auction id -> (when this node's bidder first heard of it, its auctioneer): the
        # commitment is released, and the entry deleted, together and exactly once
        self._bid_auctions: dict[str, tuple[float, str]] = {}
        self._cancelled: dict[int, float] = {}  # request id -> when it was cancelled here
        self._beating: set[str] = set()  # peers with a heartbeat send in flight
        self.sent_bytes: dict[str, int] = defaultdict(int)
        self.received_bytes: dict[str, int] = defaultdict(int)
        self.relayed_boundary_bytes = 0
        self.requests_served = 0
        self.errors_replied = 0

    # ---- lifecycle -----------------------------------------------------------------
    @property
    def address(self) -> Address:
        return self.membership.address

    async def start(self) -> Address:
        self._server = await asyncio.start_server(self._accept, self.config.listen.host,
                                                  self.config.listen.port, ssl=self.config.server_ssl)
        port = self._server.sockets[0].getsockname()[1]
        self.membership.address = Address(self.config.listen.host, port)
        if self.config.join:
            await self._join()
        if self.config.discover is not None:
            await self._start_discovery(self.config.discover)
        self._spawn(self._heartbeat_loop())
        return self.membership.address

    async def _start_discovery(self, target: Address) -> None:
        loop = asyncio.get_running_loop()
        secret = None if self.config.insecure else self.config.secret
        transport, _ = await loop.create_datagram_endpoint(
            lambda: DiscoveryProtocol(secret, self._on_beacon), sock=discovery_socket(target.port))
        self._discovery = transport

        async def beacons() -> None:
            while not self._stopped.is_set():
                try:
                    transport.sendto(encode_beacon(self.membership.self_digest(), secret),
                                     (target.host, target.port))
                except OSError as exc:
                    # no route for broadcast right now (interface down): try again later
                    log.info("cannot send a discovery beacon to %s: %s", target, exc)
                await asyncio.sleep(BEACON_INTERVAL_S)

        self._spawn(beacons())

    def _on_beacon(self, digest: dict[str, Any], sender_ip: str) -> None:
        if digest.get("name") == self.name:
            if digest.get("incarnation") != self.membership.incarnation:
                log.warning("another node announces our name %r from %s", self.name, sender_ip)
            return
        self._handle_events(self.membership.learn(digest, time.monotonic(), sender_ip))

    def stop(self) -> None:
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()
        await self.close()

    async def close(self) -> None:
        self._stopped.set()
        leave = Message(MsgType.LEAVE, 0, {"name": self.name})
        sends = [self._send_quietly(conn, leave) for conn in list(self._outbound.values())]
        try:
            await asyncio.wait_for(asyncio.gather(*sends), LEAVE_TIMEOUT_S)
        except TimeoutError:
            # a stalled peer (full send buffer) must not hold up shutdown: it will notice silence
            log.info("some LEAVE notices were not sent within %.0f s", LEAVE_TIMEOUT_S)
        if self._server is not None:
            self._server.close()
        if self._discovery is not None:
            self._discovery.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self._outbound.values()) + list(self._inbound):
            conn.abort()
        self.runtime.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed: %r", task.exception(), exc_info=task.exception())

    def _compute_s(self, item: Any) -> float:
        return self.runtime.bid_compute_s(item, self.config.gflops)

    def _link_s(self, n_bytes: int, peer: str) -> float:
        """A bidder's price for moving `n_bytes` to or from `peer`: the same measured
        per-message cost the planner sees (`_link_view`), plus the bytes' wire time."""
        if peer == self.name:
            return 0.0
        spec = self.links.estimate(peer, self.config.default_link)
        latency_ms = self.boundary.link_latency_ms(peer, spec.latency_ms)
        return LinkSpec(spec.mbps, latency_ms).transfer_s(n_bytes)

    # ---- connections ---------------------------------------------------------------
    async def _open(self, address: Address) -> Connection:
        return await Connection.open(address.host, address.port, secret=self.config.secret,
                                     name=self.name, ssl=self.config.client_ssl,
                                     insecure=self.config.insecure)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = await Connection.accept(reader, writer, secret=self.config.secret, name=self.name,
                                           insecure=self.config.insecure, limiter=self._handshakes)
        except (WireError, OSError) as exc:
            # a peer that fails the handshake is dropped (wire logged the reason); keep serving
            log.info("rejected connection from %s: %s", writer.get_extra_info("peername"), exc)
            writer.close()
            return
        self._inbound.add(conn)
        try:
            await self._serve(conn)
        finally:
            self._inbound.discard(conn)
            conn.abort()

    async def _serve(self, conn: Connection) -> None:
        """Read and dispatch messages until the connection ends."""
        while not conn.closed:
            before = conn.bytes_received
            try:
                msg = await conn.recv()
            except (ConnectionClosed, RemoteProtocolError) as exc:
                # peer hung up or sent garbage (wire aborted and logged it): drop this connection
                log.debug("connection from %r ended: %s", conn.peer_name, exc)
                if conn.peer_name:
                    self.membership.on_disconnect(conn.peer_name, time.monotonic())
                return
            self.received_bytes[msg.kind.name] += conn.bytes_received - before
            self._proof_of_life(conn.peer_name)
            try:
                await self._dispatch(conn, msg)
            except (KeyError, TypeError, ValueError, RequestStateError) as exc:
                # a well-framed but malformed message: answer with the reason, keep serving
                log.warning("bad %s from %r: %s", msg.kind.name, conn.peer_name, exc)
                self._spawn(self._reply_error(conn, msg.request_id, f"bad {msg.kind.name}: {exc}"))

    def _proof_of_life(self, name: str) -> None:
        """Any authenticated frame from a live peer proves it alive, not only its heartbeats:
        a heartbeat may wait behind a multi-MB tile on a slow link."""
        peer = self.membership.peer(name) if name else None
        if peer is None or not peer.heard_directly or peer.status.value == "dead":
            return
        self._handle_events(self.membership.on_heartbeat(
            {**peer.digest(), "advert": peer.advert.to_json()}, time.monotonic()))

    async def _connection_to(self, name: str) -> Connection:
        conn = self._outbound.get(name)
        if conn is not None and not conn.closed:
            return conn
        async with self._dialing[name]:
            conn = self._outbound.get(name)
            if conn is not None and not conn.closed:
                return conn
            peer = self.membership.peer(name)
            if peer is None:
                raise ConnectionClosed(f"no address known for {name!r}")
            conn = await self._open(peer.address)
            if conn.peer_name != name:
                conn.abort()
                raise ConnectionClosed(f"{peer.address} answered as {conn.peer_name!r}, not {name!r}")
            self._outbound[name] = conn
            self._spawn(self._serve(conn))
            await self._send(conn, Message(MsgType.JOIN, 0, self.membership.join_payload()))
            return conn

    async def _send(self, conn: Connection, msg: Message) -> None:
        before = conn.bytes_sent
        try:
            await conn.send(msg)
        finally:
            self.sent_bytes[msg.kind.name] += conn.bytes_sent - before

    async def _send_quietly(self, conn: Connection, msg: Message) -> None:
        try:
            await self._send(conn, msg)
        except WireError as exc:
            # best effort (a LEAVE at shutdown, a heartbeat): the peer may be gone already
            log.debug("could not send %s to %r: %s", msg.kind.name, conn.peer_name, exc)

    async def send_to(self, name: str, msg: Message) -> None:
        """Send to a peer by name over this node's outbound connection (dialled on demand)."""
        conn = await self._connection_to(name)
        await self._send(conn, msg)

    async def _reply_error(self, conn: Connection, request_id: int, reason: str) -> None:
        self.errors_replied += 1
        await self._send_quietly(conn, Message(MsgType.ERROR, request_id, {"reason": reason}))

    # ---- membership ----------------------------------------------------------------
    async def _join(self) -> None:
        """Join through the --join peers: the first that accepts wins; a refusal is fatal."""
        deadline = time.monotonic() + self.config.join_timeout_s
        last_error = "no --join peer given"
        while time.monotonic() < deadline:
            for address in self.config.join:
                try:
                    conn = await self._open(address)
                    await self._send(conn, Message(MsgType.JOIN, 0, self.membership.join_payload()))
                    reply = await asyncio.wait_for(conn.recv(), timeout=5.0)
                except (WireError, OSError, TimeoutError) as exc:
                    # that peer is not reachable yet: try the next one, then retry until the deadline
                    last_error = f"{address}: {exc}"
                    continue
                if reply.kind is MsgType.ERROR:
                    conn.abort()
                    raise JoinRefused(f"join through {address} refused: {reply.meta.get('reason')}")
                now = time.monotonic()
                name = conn.peer_name
                self._outbound[name] = conn
                self._spawn(self._serve(conn))
                self._handle_events(self.membership.on_heartbeat(reply.meta, now, address.host))
                self._handle_events(self.membership.on_welcome(reply.meta, now))
                log.info("joined the mesh through %s (%s)", name, address)
                return
            await asyncio.sleep(0.3)
        raise JoinRefused(f"could not join the mesh: {last_error}")

    def _handle_events(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Dial):
                self._spawn(self._greet(event.name))
            elif isinstance(event, PeerDown):
                self._peer_down(event.name, event.reason)
            elif isinstance(event, PeerUp):
                log.info("%s: peer %s joined", self.name, event.name)

    async def _greet(self, name: str) -> None:
        try:
            await self._connection_to(name)
        except WireError as exc:
            # unreachable for now: the failure detector decides whether it is dead
            log.info("cannot reach %s yet: %s", name, exc)

    def _peer_down(self, name: str, reason: str) -> None:
        conn = self._outbound.pop(name, None)
        if conn is not None:
            conn.abort()
        for rid, ctx in list(self._requests.items()):
            if name in ctx.devices and not ctx.done.done():
                ctx.done.set_exception(RequestFailed(f"device {name} failed during the request: {reason}"))
        # work for a requester that died will never be gathered: forget it and its commitments
        for rid, work in list(self._work.items()):
            if work.requester == name:
                self._cancel_work(rid, f"requester {name} is down: {reason}")
        for auction_id, (_since, auctioneer) in list(self._bid_auctions.items()):
            if auctioneer == name:
                self._release_bid(auction_id)
        self.links.forget(name)
        self.boundary.forget(name)

    def _advert(self) -> Advert:
        backlog = max(0.0, self.runtime.queued_s)
        return self.runtime.advert(self.config.gflops, backlog, self._link_view())

    def _link_view(self) -> tuple[tuple[str, float, float], ...]:
        """(peer, Mbit/s, per-message ms) per measured link: bandwidth from timed transfers;
        the per-message latency is the one-way delivery this node measured on tile messages
        (half the heartbeat round trip before any) plus its own per-tile handling, so that a
        plan pays for each block boundary what a boundary really costs here."""
        known = self.links.known()
        names = sorted(set(known) | set(self.boundary.peers()))
        fallback = self.config.default_link
        return tuple((n, known[n].mbps if n in known else fallback.mbps,
                      self.boundary.link_latency_ms(n, known[n].latency_ms if n in known else fallback.latency_ms))
                     for n in names)

    async def _heartbeat_loop(self) -> None:
        while not self._stopped.is_set():
            now = time.monotonic()
            self._handle_events(self.membership.tick(now))
            self.membership.set_advert(self._advert())
            beat = {**self.membership.heartbeat(), "sent": time.perf_counter()}
            for peer in self.membership.peers():
                if peer.status.value != "dead" and peer.name in self._outbound \
                        and peer.name not in self._beating:
                    # at most one heartbeat in flight per peer: a send stuck behind a blocked
                    # connection is not joined by another every interval
                    self._beating.add(peer.name)
                    self._spawn(self._beat(peer.name, self._outbound[peer.name],
                                           Message(MsgType.GOSSIP, 0, beat)))
            self._drop_orphans(now)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def _beat(self, name: str, conn: Connection, msg: Message) -> None:
        try:
            await self._send_quietly(conn, msg)
        finally:
            self._beating.discard(name)

    def _drop_orphans(self, now: float) -> None:
        for key, (plan, made, _links) in list(self._plans.items()):
            if now - made > PLAN_TTL_S:
                del self._plans[key]
                self._items.pop(id(plan), None)
        for auction_id, (since, _auctioneer) in list(self._bid_auctions.items()):
            if now - since > WORK_TTL_S:
                self._release_bid(auction_id)  # its request ended long ago, however it ended
        for rid, ctx in list(self._work.items()):
            age = now - ctx.created
            if ctx.run is None and not ctx.plan_pending and age > ORPHAN_PIECE_TTL_S:
                log.warning("dropping %d pieces of request %d: no plan arrived", len(ctx.early), rid)
                self._cancel_work(rid, "no plan arrived")
            elif age > WORK_TTL_S and not ctx.plan_pending:
                # no cancel reached us (lost with its requester's connection): the request is over
                self._cancel_work(rid, f"unfinished after {WORK_TTL_S:.0f} s")
        for rid, when in list(self._cancelled.items()):
            if now - when > WORK_TTL_S:
                del self._cancelled[rid]

    # ---- dispatch ------------------------------------------------------------------
    async def _dispatch(self, conn: Connection, msg: Message) -> None:
        kind = msg.kind
        now = time.monotonic()
        peer_host = conn.peer_address[0] if isinstance(conn.peer_address, tuple) else None
        if kind is MsgType.JOIN and msg.meta.get("welcome"):
            # the answer to a JOIN we sent on one of our outbound connections
            self._handle_events(self.membership.on_heartbeat(msg.meta, now, peer_host))
            self._handle_events(self.membership.on_welcome(msg.meta, now))
        elif kind is MsgType.JOIN:
            events, refusal = self.membership.on_join(msg.meta, now, peer_host)
            if refusal is not None:
                await self._reply_error(conn, 0, refusal.reason)
                conn.abort()
                return
            await self._send(conn, Message(MsgType.JOIN, 0, {**self.membership.heartbeat(),
                                                             **self.membership.welcome(),
                                                             "welcome": True}))
            self._handle_events(events)
        elif kind is MsgType.GOSSIP:
            self._handle_events(self.membership.on_heartbeat(msg.meta, now, peer_host))
            self._advert_heard[str(msg.meta.get("name", ""))] = now  # its backlog is as of now
            echo = msg.meta.get("echo", {}).get(self.name) if isinstance(msg.meta.get("echo"), dict) else None
            if isinstance(echo, (int, float)):
                rtt = time.perf_counter() - echo
                self.links.observe_rtt(conn.peer_name, rtt)
                wall = msg.meta.get("wall")
                if isinstance(wall, (int, float)):
                    self.boundary.observe_echo(conn.peer_name, rtt, float(wall), time.time())
            self._spawn(self._echo(conn.peer_name, msg.meta.get("sent")))
        elif kind is MsgType.LEAVE:
            self._handle_events(self.membership.on_leave(conn.peer_name, now))
        elif kind is MsgType.INFER:
            self._spawn(self._serve_infer(conn, msg))
        elif kind is MsgType.PLAN:
            self._spawn(self._guarded(msg.request_id, self._on_plan(conn.peer_name, msg)))
        elif kind is MsgType.TILE:
            received_at = time.time()
            sent_at = msg.meta.get("sent_at")
            if isinstance(sent_at, (int, float)) and msg.tensors:
                mbps = self.links.estimate(conn.peer_name, self.config.default_link).mbps
                wire_s = tensor_bytes(msg.tensors[0]) * 8.0 / (mbps * 1e6)
                self.boundary.observe_delivery(conn.peer_name, float(sent_at), received_at, wire_s,
                                               self.runtime.loop_free_wall)
            # handled in a task: forwarding pieces must not stall reading this connection
            # (other peers' heartbeats and tiles arrive behind it)
            self._spawn(self._guarded(msg.request_id, self._on_tile(msg, received_at)))
        elif kind in AUCTION_KINDS:
            try:
                message = from_message(msg, conn.peer_name)
            except MessageFormatError as exc:
                # a malformed auction message is a peer's mistake: log and drop it
                log.warning("dropping %s from %r: %s", kind.name, conn.peer_name, exc)
                return
            self._spawn(self._guarded(msg.request_id,
                                      self._route_auction(msg.request_id, [Outgoing(self.name, message)])))
        elif kind is MsgType.STATE and msg.meta.get("op") == "stats":
            await self._send(conn, Message(MsgType.STATE, msg.request_id, self.stats()))
        elif kind is MsgType.ERROR:
            self._on_error(conn.peer_name, msg)
        else:
            raise ValueError(f"{kind.name} is not served by a node")

    async def _echo(self, peer: str, sent: Any) -> None:
        """Answer a heartbeat's timestamp once, so the sender can measure the round trip."""
        if not isinstance(sent, (int, float)) or peer not in self._outbound:
            return
        await self._send_quietly(self._outbound[peer], Message(
            MsgType.GOSSIP, 0, {**self.membership.heartbeat(), "echo": {peer: sent}, "wall": time.time()}))

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "gflops": self.config.gflops,
            "sent_bytes": dict(self.sent_bytes),
            "received_bytes": dict(self.received_bytes),
            "relayed_boundary_bytes": self.relayed_boundary_bytes,
            "tiles_computed": self.runtime.tiles_computed,
            "compute_s": self.runtime.compute_s,
            # CPU of the event-loop thread (stats runs on it) less the tiles it computed inline
            "loop_cpu_s": time.thread_time() - self.runtime.inline_cpu_s,
            "requests_served": self.requests_served,
            "errors_replied": self.errors_replied,
            "peers": {p.name: p.status.value if p.heard_directly else "known"
                      for p in self.membership.peers()},
            "links": {peer: {"mbps": spec.mbps, "latency_ms": spec.latency_ms}
                      for peer, spec in sorted(self.links.known().items())},
            "planned_links": {peer: {"mbps": mbps, "latency_ms": ms} for peer, mbps, ms in self._link_view()},
            "tile_handling_ms": (self.boundary.handling_s or 0.0) * 1000.0,
            "rss_mb": _rss_mb(),
            "peak_rss_mb": _peak_rss_mb(),
        }

    def _on_error(self, sender: str, msg: Message) -> None:
        rid = msg.request_id
        reason = str(msg.meta.get("reason", "unknown error"))
        if msg.meta.get("op") == "cancel":
            self._on_cancel(sender, rid, reason)
            return
        ctx = self._requests.get(rid)
        if ctx is not None and sender not in ctx.devices:
            # only a device of the request may fail it: another client's ERROR is not a reason
            log.warning("ignoring an error about request %d from %r, not one of its devices", rid, sender)
        elif ctx is not None and not ctx.done.done():
            ctx.done.set_exception(RequestFailed(f"{sender}: {reason}"))
        else:
            log.warning("error from %s about request %d: %s", sender, rid, reason)

    # ---- requester side ------------------------------------------------------------
    async def _serve_infer(self, conn: Connection, msg: Message) -> None:
        try:
            meta, logits = await self._infer(msg)
        except (RequestFailed, MeshciError, RequestStateError, ValueError, TypeError, KeyError) as exc:
            # the request cannot be served (unknown model, bad size, a device failed):
            # the client gets the reason, the node keeps serving
            log.warning("request %d failed: %s", msg.request_id, exc)
            await self._reply_error(conn, msg.request_id, str(exc))
            return
        except Exception as exc:  # noqa: BLE001
            # a bug in some part (planner, auction, model code) must not leave the client
            # waiting or stop the node: log the traceback, answer with the reason
            log.exception("request %d failed with an internal error", msg.request_id)
            await self._reply_error(conn, msg.request_id, f"internal error: {type(exc).__name__}: {exc}")
            return
        self.requests_served += 1
        await self._send_quietly(conn, Message(MsgType.RESULT, msg.request_id, meta, (logits,)))

    async def _infer(self, msg: Message) -> tuple[dict[str, Any], torch.Tensor]:
        began = time.perf_counter()
        meta = msg.meta
        model = str(meta["model"])
        seed = int(meta.get("seed", 0))
        strategy = str(meta.get("strategy", "edgeci"))
        if strategy not in STRATEGIES:
            raise RequestFailed(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
        check_model_allowed(model, self.config.allow_models)
        x = _request_input(meta, msg.tensors)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        loaded = await self.runtime.load(model, seed, size, head=True)
        trunk = loaded.trunk
        loaded_at = time.perf_counter()

        peers = self.membership.alive()
        heard_now = time.monotonic()
        ages = {p.name: heard_now - self._advert_heard[p.name] for p in peers if p.name in self._advert_heard}
        raw_cluster = cluster_from_view(self.name, self._advert(), peers, self.config.default_link,
                                        model=model, size=size, advert_age_s=ages)
        # every strategy plans on the same cluster: the measured curves and links with the
        # corrections learned from this node's completed requests
        cluster = self.calibration.apply(raw_cluster)
        loop = asyncio.get_running_loop()
        plan_key = (model, seed, size, strategy, device_signature(raw_cluster))
        # what moves the cached plan to a background re-plan: the links, the compute ratios
        links = _link_signature(cluster) + _ratio_signature(self.calibration.compute_ratio)
        cached = self._plans.get(plan_key)
        if cached is not None and time.monotonic() - cached[1] < PLAN_TTL_S:
            plan = cached[0]
            stale = time.monotonic() - cached[1] > REPLAN_MIN_S
            if cached[2] != links and stale and plan_key not in self._replanning:
                # the measured link costs moved: re-plan off this request's critical path
                # (planning takes a slow device hundreds of ms); later requests use it. At
                # most every REPLAN_MIN_S: planning competes with tiles for the device's CPU
                self._replanning.add(plan_key)
                self._spawn(self._replan(plan_key, trunk, cluster, strategy, links))
        else:
            plan = await loop.run_in_executor(None, make_plan, trunk, cluster, strategy)
            self._plans[plan_key] = (plan, time.monotonic(), links)
        planned_at = time.perf_counter()
        rid = random.getrandbits(62) | 1
        participants = {d.name for d in cluster.devices}
        try:
            auction_rounds = plan.auction_rounds
            rounds_s = 0.0
            if strategy == "edgeci" and len(cluster.devices) > 1:
                plan, auction_rounds, rounds_s = await self._auction(rid, loaded, cluster, plan)
            auctioned_at = time.perf_counter()

            run = RequesterRun(plan, self.name, loaded.geometry(plan))
            devices = run.devices()
            done: asyncio.Future[torch.Tensor] = loop.create_future()
            self._requests[rid] = _RequesterContext(run, loaded, done, frozenset(devices))
            try:
                plan_msg = Message(MsgType.PLAN, rid, {"plan": plan.to_json(), "model": model, "seed": seed,
                                                       "size": list(size)})
                for device in devices:
                    if device == self.name:
                        await self._on_plan(self.name, plan_msg)
                    else:
                        await self.send_to(device, plan_msg)
                await self._execute(rid, run.start(x), path_s=0.0)
                output = await asyncio.wait_for(done, REQUEST_TIMEOUT_S)
                trunk_at = time.perf_counter()
                head_began = time.perf_counter()
                logits = await self.runtime.call(trunk.head, output)
                head_s = time.perf_counter() - head_began
                path_s = self._requests[rid].path_s + head_s
            except WireError as exc:
                # a device could not be reached (PLAN or input tiles): the request fails, with why
                raise RequestFailed(f"lost a device during the request: {exc}") from exc
            except TimeoutError as exc:
                # pieces never all arrived (a silent device): fail instead of waiting forever
                raise RequestFailed(f"request timed out after {REQUEST_TIMEOUT_S:.0f} s") from exc
            finally:
                self._requests.pop(rid, None)
        except Exception as exc:
            # the request failed here: tell every participant (bidders, devices) to drop its
            # state and commitments, then let the caller answer the client with the reason
            self._cancel_everywhere(rid, participants, str(exc) or type(exc).__name__)
            raise
        latency = time.perf_counter() - began
        calibration = self._calibrate(model, seed, size, trunk, raw_cluster, plan, devices,
                                      trunk_at - auctioned_at)
        probs = torch.softmax(logits.flatten(), 0)
        top = torch.topk(probs, min(5, probs.numel()))
        result: dict[str, Any] = {
            "model": model,
            "strategy": strategy,
            "requester": self.name,
            "latency_s": latency,
            "load_s": loaded_at - began,
            "planning_s": planned_at - loaded_at,
            "auction_s": auctioned_at - planned_at,
            "auction_rounds_s": rounds_s,
            "execution_s": trunk_at - auctioned_at,
            "head_s": head_s,
            "critical_path_s": path_s,
            "top5": [[int(i), float(p)] for p, i in zip(top.values, top.indices)],
            "devices": devices,
            "shares": _shares(loaded.flops, plan),
            "auction_rounds": auction_rounds,
            "routing": plan.routing,
            "predicted_latency_s": plan.predicted_latency_s,
            **calibration,
            "plan": plan.to_json(),
        }
        if meta.get("check"):
            reference = await self.runtime.call(trunk.forward, x)
            result["max_abs_diff"] = float((reference - logits).abs().max())
            result["check_ok"] = bool(torch.allclose(logits, reference, rtol=1e-4, atol=1e-5))
        return result, logits

    def _calibrate(self, model: str, seed: int, size: tuple[int, int], trunk: Any, raw_cluster: Any,
                   plan: Plan, devices: list[str], measured_s: float) -> dict[str, Any]:
        """Teach `self.calibration` from a completed request: its measured trunk time
        against the uncorrected live model's prediction for the plan that ran. Cold
        requests (a device built the model during it) are not learned from, nor requests
        computed by a device described by a declared GFLOP/s instead of measured curves
        (a declaration is what the user says the device is, not an estimate to correct)."""
        keys = {(d, model, seed, size) for d in devices}
        cold = not keys <= self._warm
        self._warm |= keys
        hops = plan_hops(plan)
        try:
            predicted, finishes = evaluate_plan(trunk, raw_cluster, plan)
            scaled, _ = evaluate_plan(trunk, self.calibration.scaled(raw_cluster), plan)
        except PlanningError as exc:
            # the plan names a device the view no longer has (it left mid-request): no sample
            log.debug("no calibration sample: %s", exc)
            return {"hops": hops, "cold": cold}
        computing = frozenset(t.device for b in plan.blocks for t in b.tiles)
        measured_model = all(d.curves for d in raw_cluster.devices if d.name in computing)
        learned = (None if cold or not measured_model
                   else self.calibration.observe(computing, hops, predicted, scaled, measured_s))
        ratios = {d: round(float(r), 3) for d, r in sorted(self.calibration.compute_ratio.items())}
        log.info("%s %s on %s: %d hops, plan says %.1f ms, predicted %.1f ms (uncorrected; %.1f ms with compute ratios), "
                 "measured %.1f ms, block finishes %s ms; learned %s; compute ratios %s, %.2f ms per hop",
                 plan.strategy, model, ",".join(sorted(computing)), hops, plan.predicted_latency_s * 1e3,
                 predicted * 1e3, scaled * 1e3,
                 measured_s * 1e3, [round(max(f.values(), default=0.0) * 1e3, 1) for f in finishes],
                 "nothing (cold)" if cold else learned if measured_model else "nothing (declared speeds)", ratios, self.calibration.extra_latency_ms())
        return {"hops": hops, "cold": cold, "predicted_uncorrected_s": float(predicted),
                "compute_ratios": ratios, "hop_correction_ms": self.calibration.extra_latency_ms()}

    async def _replan(self, key: tuple[Any, ...], trunk: Any, cluster: Any, strategy: str,
                      links: tuple[Any, ...]) -> None:
        try:
            plan = await asyncio.get_running_loop().run_in_executor(None, make_plan, trunk, cluster, strategy)
            self._plans[key] = (plan, time.monotonic(), links)
        finally:
            self._replanning.discard(key)

    async def _auction(self, rid: int, loaded: LoadedModel, cluster: Any, plan: Plan) -> tuple[Plan, int, float]:
        """AWAS over the network for the row strips of the blocks DPFL chose; returns the
        plan, the auction's round trips and the seconds its rounds took."""
        trunk = loaded.trunk
        bidders = [d.name for d in cluster.devices]
        items = self._items.get(id(plan))
        if items is None or items[0] is not plan:
            items = self._items[id(plan)] = (plan, auction_items(trunk, plan))
        auction = NetworkAuction(rid, self.name, items[1], bidders)
        wake = asyncio.Event()
        self._auctions[rid] = (auction, wake)
        try:
            began = time.perf_counter()
            await self._route_auction(rid, auction.start(time.monotonic()))
            while not auction.done:
                deadline = auction.machine.next_deadline
                wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(wake.wait(), wait)
                except TimeoutError:
                    pass  # a round's deadline passed: tick() drops the silent bidders
                wake.clear()
                await self._route_auction(rid, auction.tick(time.monotonic()))
            rounds_s = time.perf_counter() - began
            new_plan = awarded_plan(trunk, plan, auction, flops=loaded.flops)
        except AuctionError as exc:
            # the auction cannot produce an assignment (e.g. nobody to bid): say so to the client
            raise RequestFailed(f"auction failed: {exc}") from exc
        finally:
            self._auctions.pop(rid, None)
        return new_plan, auction.result().rounds, rounds_s

    async def _route_auction(self, rid: int, outgoing: list[Outgoing]) -> None:
        """Deliver auction messages: to this node's own bidder or auctioneer, or to peers."""
        queue = list(outgoing)
        while queue:
            out = queue.pop(0)
            message = out.message
            if out.to != self.name:
                try:
                    await self.send_to(out.to, to_message(rid, message))
                except WireError as exc:
                    # unreachable bidder: the auction's round deadline drops it
                    log.info("auction %d: cannot reach %s: %s", rid, out.to, exc)
                continue
            if isinstance(message, (CallForBids, Award, Close)):
                self.bidder.base_backlog_s = max(0.0, self.runtime.queued_s)
                if message.auction_id not in self._bid_auctions:
                    if rid in self._cancelled:
                        log.info("auction %d was cancelled: dropping a late %s", rid, type(message).__name__)
                        continue
                    self._bid_auctions[message.auction_id] = (time.monotonic(), message.sender)
                queue += self.bidder.receive(message, time.monotonic())
                if isinstance(message, Close) and message.auction_id not in self.bidder.auctions():
                    self._release_bid(message.auction_id)  # the auction is over and we won nothing
            else:
                entry = self._auctions.get(rid)
                if entry is None:
                    log.info("auction %d is over: dropping a late %s from %s", rid,
                             type(message).__name__, message.sender)
                    continue
                auction, wake = entry
                queue += auction.receive(message, time.monotonic())
                wake.set()

    # ---- worker side ---------------------------------------------------------------
    async def _on_plan(self, sender: str, msg: Message) -> None:
        rid = msg.request_id
        if rid in self._cancelled:
            log.info("dropping the PLAN of cancelled request %d", rid)
            return
        ctx = self._work.setdefault(rid, _WorkerContext(sender))
        ctx.requester = sender
        ctx.plan_pending = True
        try:
            plan = Plan.from_json(msg.meta["plan"])
            if plan.requester != sender:
                raise ValueError(f"the plan names {plan.requester!r} as requester, it came from {sender!r}")
            size = tuple(int(v) for v in msg.meta["size"])
            check_model_allowed(str(msg.meta["model"]), self.config.allow_models)
            ctx.loaded = await asyncio.wait_for(
                self.runtime.load(str(msg.meta["model"]), int(msg.meta.get("seed", 0)),
                                  (size[0], size[1]), head=False), REQUEST_TIMEOUT_S)
            if self._work.get(rid) is not ctx:
                return  # cancelled while the model loaded
            ctx.run = WorkerRun(plan, self.name, ctx.loaded.geometry(plan))
        except (MeshciError, KeyError, TypeError, ValueError, RuntimeError, OSError, TimeoutError) as exc:
            # a plan this node cannot serve (bad plan, unknown model, the build helper
            # process failed or outlasted the request): tell the requester why, keep serving
            if isinstance(exc, TimeoutError):
                exc = RequestFailed(f"model build took over {REQUEST_TIMEOUT_S:.0f} s")
            await self._fail_request(rid, sender, f"{self.name} cannot serve the plan: {exc}")
            return
        finally:
            ctx.plan_pending = False
        early, ctx.early = ctx.early, []
        for piece, received_at in early:
            await self._on_tile(piece, received_at)

    async def _on_tile(self, msg: Message, received_at: float) -> None:
        rid = msg.request_id
        block = int(msg.meta["block"])
        region = Region.from_list(msg.meta["region"])
        (tensor,) = msg.tensors
        path = float(msg.meta.get("path_s", 0.0)) + max(0.0, received_at - float(msg.meta.get("sent_at", received_at)))
        if msg.meta.get("stage") == "gather":
            req = self._requests.get(rid)
            if req is None:
                log.info("dropping a gathered piece of finished or unknown request %d", rid)
                return
            if block == len(req.run.plan.blocks):
                req.path_s = max(req.path_s, path)
            try:
                actions = req.run.on_gather(block, region, tensor)
            except RequestStateError as exc:
                # a gathered piece that fits nothing: the request cannot complete
                await self._fail_request(rid, self.name, f"bad piece from a worker: {exc}")
                return
            await self._execute(rid, actions, path)
            return
        if rid in self._cancelled:
            log.debug("dropping a piece of cancelled request %d", rid)
            return
        ctx = self._work.setdefault(rid, _WorkerContext(""))
        if ctx.run is None:
            ctx.early.append((msg, received_at))
            return
        ctx.path_in[block] = max(ctx.path_in.get(block, 0.0), path)
        try:
            actions = ctx.run.on_piece(block, region, tensor)
        except RequestStateError as exc:
            # a piece that fits no tile of ours: the request is broken, tell its requester
            await self._fail_request(rid, ctx.requester, f"{self.name}: {exc}")
            return
        await self._execute(rid, actions, ctx.path_in[block])

    async def _execute(self, rid: int, actions: list[Action], path_s: float) -> None:
        for action in actions:
            if isinstance(action, SendPiece):
                await self._send_piece(rid, action, path_s)
            elif isinstance(action, Compute):
                self._spawn(self._guarded(rid, self._compute(rid, action, path_s, time.perf_counter())))
            elif isinstance(action, TrunkDone):
                req = self._requests.get(rid)
                if req is not None and not req.done.done():
                    req.done.set_result(action.output)

    async def _send_piece(self, rid: int, action: SendPiece, path_s: float) -> None:
        meta = {"block": action.block, "region": action.region.to_list(), "stage": action.stage,
                "path_s": path_s, "sent_at": time.time()}
        msg = Message(MsgType.TILE, rid, meta, (action.tensor,))
        if action.dest == self.name:
            await self._on_tile(msg, time.time())
            return
        began = time.perf_counter()
        try:
            await self.send_to(action.dest, msg)
        except WireError as exc:
            # the next device is gone: the request cannot complete, its requester must know
            await self._fail_request(rid, self._requester_of(rid), f"cannot reach {action.dest}: {exc}")
            return
        # send() returns once the last chunk is drained: a (slightly optimistic) transfer time
        self.links.observe_transfer(action.dest, tensor_bytes(action.tensor), time.perf_counter() - began)
        self.relayed_boundary_bytes += action.relayed_bytes

    def _requester_of(self, rid: int) -> str:
        if rid in self._requests or rid in self._auctions:
            return self.name
        ctx = self._work.get(rid)
        if ctx is not None:
            return ctx.requester
        bid = self._bid_auctions.get(str(rid))
        return bid[1] if bid is not None else ""

    async def _guarded(self, rid: int, work: Awaitable[None]) -> None:
        """Run one piece of request `rid`'s work; any error fails that request at once."""
        try:
            await work
        except Exception as exc:  # noqa: BLE001
            # a bug or an unforeseen error in request work (model code, a malformed piece)
            # must not leave the client waiting for the timeout: log the traceback and fail
            # the request with the reason; the node keeps serving
            log.exception("request %d: error on %s", rid, self.name)
            await self._fail_request(rid, self._requester_of(rid),
                                     f"error on {self.name}: {type(exc).__name__}: {exc}")

    async def _compute(self, rid: int, action: Compute, path_s: float, issued: float) -> None:
        ctx = self._work.get(rid)
        if ctx is None or ctx.run is None or ctx.loaded is None:
            return
        # queued work outside any auction this node's bidder still holds (those it counts itself)
        predicted = self.runtime.tile_s(ctx.loaded, action.start, action.end, action.out, self.config.gflops)
        estimate = predicted if str(rid) not in self.bidder.auctions() else 0.0
        inline = predicted <= INLINE_COMPUTE_S
        self.runtime.queued_s += estimate
        try:
            y, seconds, handoff = await self.runtime.run_block(
                ctx.loaded.trunk, action.start, action.end, action.x, action.have, action.out,
                inline=inline)
        except (RuntimeError, ValueError, MeshciError) as exc:
            # a tile that cannot be computed (shape mismatch, out of memory): fail the request
            await self._fail_request(rid, ctx.requester, f"{self.name} failed a tile: {exc}")
            return
        finally:
            self.runtime.queued_s -= estimate
        # per-tile handling: inline, the wait for the loop to start the task; on the thread,
        # the hand-off there and back
        self.boundary.observe_handling(time.perf_counter() - issued - seconds if inline else handoff)
        if self._work.get(rid) is not ctx:
            return  # the request was cancelled while this tile computed: nobody wants it
        actions = ctx.run.on_computed(action.block, action.tile, y)
        if ctx.run.done:
            self._work.pop(rid, None)
            self._release_bid(str(rid))
        await self._execute(rid, actions, path_s + seconds)

    def _release_bid(self, auction_id: str) -> None:
        """Release this node's bidder commitment for an auction and forget the auction."""
        self.bidder.release(auction_id)
        self._bid_auctions.pop(auction_id, None)

    def _cancel_work(self, rid: int, reason: str) -> None:
        """Forget every piece of worker-side state of a request that will not complete."""
        ctx = self._work.pop(rid, None)
        if ctx is not None or str(rid) in self._bid_auctions:
            log.info("request %d cancelled on %s: %s", rid, self.name, reason)
        self._release_bid(str(rid))
        self._cancelled[rid] = time.monotonic()

    def _on_cancel(self, sender: str, rid: int, reason: str) -> None:
        """The requester of `rid` says it failed: drop its work here (only its requester may)."""
        ctx = self._work.get(rid)
        bid = self._bid_auctions.get(str(rid))
        if (ctx is not None and ctx.requester == sender) or (bid is not None and bid[1] == sender):
            self._cancel_work(rid, f"cancelled by {sender}: {reason}")
        elif ctx is None and bid is None:
            log.debug("cancel of request %d from %s: nothing of it here", rid, sender)
        else:
            log.warning("ignoring a cancel of request %d from %s, not its requester", rid, sender)

    def _cancel_everywhere(self, rid: int, participants: set[str], reason: str) -> None:
        """Tell every other participant of a failed request to drop its state (best effort)."""
        notice = Message(MsgType.ERROR, rid, {"op": "cancel", "reason": reason})
        for name in sorted(participants - {self.name}):
            self._spawn(self._notify(name, notice))
        self._cancel_work(rid, reason)

    async def _notify(self, name: str, msg: Message) -> None:
        try:
            await asyncio.wait_for(self.send_to(name, msg), CANCEL_SEND_TIMEOUT_S)
        except (WireError, TimeoutError) as exc:
            # the participant is gone or stalled: its own sweep or our death cleans it up
            log.info("cannot tell %s about request %d: %s", name, msg.request_id, exc)

    async def _fail_request(self, rid: int, requester: str, reason: str) -> None:
        log.warning("request %d: %s", rid, reason)
        self._cancel_work(rid, reason)
        if requester == self.name or rid in self._requests:
            req = self._requests.get(rid)
            if req is not None and not req.done.done():
                req.done.set_exception(RequestFailed(reason))
            return
        if requester:
            try:
                await self.send_to(requester, Message(MsgType.ERROR, rid, {"reason": reason}))
            except WireError as exc:
                # the requester is gone too: nobody left to tell
                log.info("cannot tell %s that request %d failed: %s", requester, rid, exc)


def _link_signature(cluster: Any) -> tuple[tuple[str, str, int, int], ...]:
    """The cluster's links on a coarse logarithmic scale (factors of 2): a plan made for
    one set of measured link costs serves requests until they move by a step."""
    def step(value: float) -> int:
        return round(math.log(max(value, 1e-3)) / math.log(LINK_STEP))

    return tuple(sorted((*sorted(pair), step(spec.latency_ms), step(spec.mbps))
                        for pair, spec in cluster.links.items()))


def _ratio_signature(ratios: dict[str, float]) -> tuple[tuple[str, int], ...]:
    return tuple((name, round(math.log(max(r, 1e-3)) / math.log(RATIO_STEP))) for name, r in sorted(ratios.items()))


def _request_input(meta: dict[str, Any], tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The request's input image (1, 3, H, W): sent by the client, or made from a seed."""
    if tensors:
        x = tensors[0].float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise RequestFailed(f"input must be (3, H, W) or (1, 3, H, W), got {tuple(tensors[0].shape)}")
    else:
        h, w = (int(v) for v in meta.get("size", (224, 224)))
        if not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
            raise RequestFailed(f"input size {h}x{w} outside 1..{MAX_INPUT_SIDE}")
        generator = torch.Generator().manual_seed(int(meta.get("input_seed", 0)))
        x = torch.randn(1, 3, h, w, generator=generator)
    if not (1 <= x.shape[-2] <= MAX_INPUT_SIDE and 1 <= x.shape[-1] <= MAX_INPUT_SIDE):
        raise RequestFailed(f"input size {tuple(x.shape[-2:])} outside 1..{MAX_INPUT_SIDE}")
    return x.contiguous()


def _shares(flops: Callable[[int, int, Region], float], plan: Plan) -> dict[str, float]:
    """Each device's share of the plan's trunk FLOPs (halo work included)."""
    work: dict[str, float] = defaultdict(float)
    for block in plan.blocks:
        for tile in block.tiles:
            work[tile.device] += flops(block.start, block.end, tile.region)
    total = sum(work.values()) or 1.0
    return {name: value / total for name, value in sorted(work.items())}


def _rss_mb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        # no procfs (not Linux): report the peak instead
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
