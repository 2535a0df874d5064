"""The asyncio mesh node: one dispatch table over the node's parts.

Decisions live in the sans-IO cores: who is in the mesh (`membership`), what a request
does next (`request`), how tiles are auctioned (`meshci.auction`), what the plan is
(`meshci.planning`). The node is composed of thin IO parts, each in its own module:

* `connections` — sockets: accepted and outbound connections (bulk and control lanes), the read loop;
* `keeper` — byte-level liveness and redials of lost links;
* `gossip` — joining, heartbeats and echoes, discovery, this node's advert;
* `requester` — requests this node received: plan, auction, first tiles, gather, head;
* `worker` — tiles this node computes for any requester, and its bidder.

`Node` wires them together: `_handlers` says in one place which part answers which kind
of message; cross-cutting steps (carry out a request's actions, fail a request, a peer
going down) are here.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from meshci.auction.errors import MessageFormatError
from meshci.auction.messages import Award, CallForBids, Close, Outgoing
from meshci.cost.cluster import LinkSpec
from meshci.cost.links import LinkEstimator
from meshci.cost.profiling import default_data_dir
from meshci.errors import MeshciError, RuntimeFailure
from meshci.node.attempts import while_connected
from meshci.node.auction import AUCTION_KINDS, from_message, to_message
from meshci.node.connections import TLS_HANDSHAKE_TIMEOUT_S, Connections
from meshci.node.fields import MAX_SECONDS, number, reason, shown
from meshci.node.gossip import Gossip
from meshci.node.keeper import LinkKeeper
from meshci.node.latency import BoundaryCosts
from meshci.node.membership import (HEARTBEAT_INTERVAL_S, LEFT_THE_MESH, Address, Advert,
                                    Membership)
from meshci.node.memory_budget import default_budget_mb
from meshci.node.metrics import NodeMetrics
from meshci.node.pieces import Piece, decode as decode_pieces, encode as encode_pieces
from meshci.node.recovery import MAX_DEADLINE_S
from meshci.node.request import Action, Compute, RequestStateError, RunHead, SendPiece, tensor_bytes
from meshci.node.reports import NodeReports
from meshci.node.requester import Requester
from meshci.node.runtime import Runtime
from meshci.node.shipped_store import ShippedStore
from meshci.node.shipping import Shipping
from meshci.node.trace import Span, TraceLog
from meshci.node.worker import Worker
from meshci.trunk import Region
from meshci.wire import Connection, Message, MsgType
from meshci.wire.errors import WireError

log = logging.getLogger(__name__)

__all__ = ["HEARTBEAT_INTERVAL_S", "JoinFailed", "JoinRefused", "Node", "NodeConfig", "RequestFailed"]

LOOPBACK_LINK = LinkSpec(mbps=1000.0, latency_ms=0.2)
# Timeouts, one consistent chain: every request has a deadline (`meshci infer --deadline`,
# at most MAX_DEADLINE_S): its requester answers the client by then and cancels the request
# everywhere; a worker drops a request's state once the deadline its PLAN carried passed
# (`worker.DEADLINE_GRACE_S` later); worker state no cancel or deadline reached is swept
# WORK_TTL_S after it was created (longer than any request can live).
REQUEST_TIMEOUT_S = MAX_DEADLINE_S
WORK_TTL_S = REQUEST_TIMEOUT_S + 60.0
CANCEL_SEND_TIMEOUT_S = 5.0
LEAVE_TIMEOUT_S = 2.0  # close() waits at most this for its LEAVE notices
MAX_PENDING_TILES = 32  # TILE frames of one connection in progress before it is read again
MAX_WALL_S = 1e11  # a wall-clock time a peer states (seconds since 1970): year ~5000 at most


class JoinRefused(MeshciError):
    """The mesh refused this node (duplicate name): fix the command (exit status 2)."""


class JoinFailed(RuntimeFailure):
    """No --join peer could be reached before --join-timeout (exit status 1)."""


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
    data_dir: Path | None = None  # profile cache and heads (None: the default data dir)
    accept_shipped_models: bool = False  # run models a requester ships (`meshci.node.shipping`)
    memory_mb: int | None = None  # memory budget for tiles (None: what the machine has, `memory_budget`)


Handler = Callable[[Connection, Message], Awaitable[None]]
REQUESTER_STAGES = frozenset({"gather", "logits"})  # pieces for the request's requester
BIDDER_MESSAGES = (CallForBids, Award, Close)  # auctioneer -> bidder; the rest go the other way


class Node(NodeReports):
    """One mesh node. `await start()`, then `await wait_closed()`; `stop()` from anywhere."""

    def __init__(self, config: NodeConfig, runtime: Runtime | None = None) -> None:
        self.config = config
        self.name = config.name
        self.memory_budget_mb = config.memory_mb or default_budget_mb()
        self.runtime = runtime or Runtime(config.threads, curves=config.measure_curves,
                                          data_dir=config.data_dir)
        self.membership = Membership(config.name, config.listen, incarnation=time.time_ns(),
                                     advert=Advert(gflops=config.gflops))
        self.links = LinkEstimator()
        self.boundary = BoundaryCosts()  # measured per-message delivery and per-tile handling
        self.metrics = NodeMetrics()  # served with --metrics-port (meshci/node/metrics.py)
        self.trace = TraceLog()  # what this node did for its recent requests (`meshci infer --trace`)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self.relayed_boundary_bytes = 0
        self._tile_pending: dict[Connection, set[asyncio.Task[Any]]] = {}  # TILE work per connection
        self.errors_replied = 0
        self.connections = Connections(config, dispatch=self.dispatch, address_of=self._address_of,
                                       greeting=lambda: self.gossip.greeting(),
                                       on_lost=self._connection_lost, spawn=self.spawn)
        self.gossip = Gossip(self)
        self.keeper = LinkKeeper(self)
        self.worker = Worker(self)
        self.requester = Requester(self)
        self.shipping = Shipping(self, ShippedStore((config.data_dir or default_data_dir()) / "shipped"))
        # which part answers which kind of message (unknown kinds: a peer's mistake)
        self._handlers: dict[MsgType, Handler] = {
            MsgType.JOIN: self.gossip.on_join,
            MsgType.GOSSIP: self.gossip.on_gossip,
            MsgType.LEAVE: self.gossip.on_leave,
            MsgType.INFER: self._on_infer,
            MsgType.PLAN: self._on_plan,
            MsgType.TILE: self._on_tile,
            MsgType.STATE: self._on_state,
            MsgType.ERROR: self._on_error,
            MsgType.MODEL_CODE: self.shipping.on_message,
            **{kind: self._on_auction for kind in AUCTION_KINDS},
        }

    # ---- lifecycle -----------------------------------------------------------------
    @property
    def address(self) -> Address:
        return self.membership.address

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    async def start(self) -> Address:
        tls = {"ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT_S} if self.config.server_ssl else {}
        self._server = await asyncio.start_server(self.connections.accept, self.config.listen.host,
                                                  self.config.listen.port, ssl=self.config.server_ssl,
                                                  backlog=512, **tls)
        port = self._server.sockets[0].getsockname()[1]
        self.membership.address = Address(self.config.listen.host, port)
        if self.config.join:
            await self.gossip.join()
        if self.config.discover is not None:
            await self.gossip.start_discovery()
        self.spawn(self.gossip.heartbeat_loop())
        return self.membership.address

    def stop(self) -> None:
        self._stopped.set()

    async def wait_closed(self) -> None:
        await self._stopped.wait()
        await self.close()

    async def close(self) -> None:
        self._stopped.set()
        leave = Message(MsgType.LEAVE, 0, {"name": self.name})
        lanes = [self.connections.lane(name, MsgType.LEAVE) for name in list(self.connections.outbound)]
        sends = [self.send_quietly(conn, leave) for conn in lanes if conn is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*sends), LEAVE_TIMEOUT_S)
        except TimeoutError:
            # a stalled peer (full send buffer) must not hold up shutdown: it will notice silence
            log.info("some LEAVE notices were not sent within %.0f s", LEAVE_TIMEOUT_S)
        await self.halt()

    async def halt(self) -> None:
        """Stop at once without a LEAVE (`close` sends it first): sockets reset, timers gone;
        to its peers this looks like a killed process."""
        self._stopped.set()
        if self._server is not None:
            self._server.close()
        self.gossip.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.connections.abort_all()
        self.runtime.close()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed: %r", task.exception(), exc_info=task.exception())

    # ---- sending -------------------------------------------------------------------
    async def send_to(self, name: str, msg: Message) -> None:
        """Send to a peer by name over this node's outbound connection (dialled on demand)."""
        await self.connections.send_to(name, msg)

    async def send_quietly(self, conn: Connection, msg: Message) -> None:
        await self.connections.send_quietly(conn, msg)

    async def reply_error(self, conn: Connection, request_id: int, reason: str, *, usage: bool = False) -> None:
        """Answer a request with its failure; `usage`: the request itself was wrong (unknown
        model, impossible size), so the client exits with status 2 rather than 1."""
        self.errors_replied += 1
        meta: dict[str, Any] = {"reason": reason, **({"usage": True} if usage else {})}
        await self.send_quietly(conn, Message(MsgType.ERROR, request_id, meta))

    # ---- dispatch ------------------------------------------------------------------
    async def dispatch(self, conn: Connection, msg: Message) -> None:
        """Hand one message to the part that answers its kind."""
        if conn.peer_name:
            self.membership.touch(conn.peer_name, time.monotonic())
        handler = self._handlers.get(msg.kind)
        try:
            if handler is None:
                raise ValueError(f"{msg.kind.name} is not served by a node")
            await handler(conn, msg)
        except (KeyError, TypeError, ValueError, ArithmeticError, IndexError, AttributeError,
                RequestStateError, MeshciError) as exc:
            # a well-framed but malformed message (a missing key, a wrong type, a number
            # out of range): answer with the reason, keep serving
            why = reason(str(exc) if not isinstance(exc, KeyError) else f"missing {exc}")
            log.warning("bad %s from %s: %s", msg.kind.name, shown(conn.peer_name), why)
            self.spawn(self.reply_error(conn, msg.request_id, f"bad {msg.kind.name}: {why}"))
        except Exception as exc:  # noqa: BLE001
            # a bug in a handler must not end the connection's receive loop (and with it
            # every later message from that peer): log it, answer with the reason
            log.exception("error handling %s from %s", msg.kind.name, shown(conn.peer_name))
            self.spawn(self.reply_error(conn, msg.request_id, f"internal error on {msg.kind.name}: "
                                                              f"{type(exc).__name__}"))

    async def _on_infer(self, conn: Connection, msg: Message) -> None:
        self.spawn(self._serve_infer(conn, msg))

    async def _serve_infer(self, conn: Connection, msg: Message) -> None:
        began = time.perf_counter()
        connected, ok = await while_connected(conn, self.requester.on_infer(conn, msg))
        if not connected:
            # the client went away: its request was cancelled everywhere (`attempts.py`)
            log.info("request %d: the client went away; its work is cancelled", msg.request_id)
        self.metrics.request_done(time.perf_counter() - began, bool(ok))

    async def _on_plan(self, conn: Connection, msg: Message) -> None:
        if msg.meta.get("op") == "need_plan":
            self.spawn(self.requester.on_need_plan(conn.peer_name, msg))
            return
        self._trace_receive(msg.request_id, conn.peer_name, conn.last_arrival, time.time())
        self.spawn(self.guarded(msg.request_id, self.worker.on_plan(conn.peer_name, msg)))

    async def _on_tile(self, conn: Connection, msg: Message) -> None:
        received_at = time.time()
        pieces = decode_pieces(msg.meta, msg.tensors)
        arrival = conn.last_arrival
        peer = self.membership.is_alive(conn.peer_name)  # links are measured to peers only, not
        # to every name a client connects under (each would be one more entry in our advert)
        if peer and arrival is not None and (sample := arrival.rate_sample(RATE_SAMPLE_BYTES)) is not None:
            # bandwidth as delivered: bytes over the time they took to land here
            self.links.observe_arrival(conn.peer_name, *sample)
        path = _path(msg.meta, received_at)
        if peer and "sent_at" in msg.meta and msg.tensors:
            mbps = self.links.estimate(conn.peer_name, self.config.default_link).mbps
            wire_s = sum(tensor_bytes(t) for t in msg.tensors) * 8.0 / (mbps * 1e6)
            self.boundary.observe_delivery(conn.peer_name, float(msg.meta["sent_at"]), received_at, wire_s,
                                           self.runtime.loop_free_wall)
        self._trace_receive(msg.request_id, conn.peer_name, arrival, received_at)
        # handled in a task: forwarding pieces must not stall reading this connection
        # (other peers' heartbeats and tiles arrive behind it) ...
        task = self.spawn(self.guarded(msg.request_id, self.take_pieces(
            msg.request_id, conn.peer_name, pieces, path, msg.meta)))
        pending = self._tile_pending.setdefault(conn, set())
        pending.add(task)
        task.add_done_callback(lambda done: self._tile_done(conn, done))
        if len(pending) >= MAX_PENDING_TILES:
            # ... up to a point: then this connection is not read until its oldest work is
            # done, and the sender feels TCP's back-pressure
            await asyncio.wait(set(pending), return_when=asyncio.FIRST_COMPLETED)

    def _tile_done(self, conn: Connection, task: asyncio.Task[Any]) -> None:
        pending = self._tile_pending.get(conn)
        if pending is not None:
            pending.discard(task)
            if not pending:
                del self._tile_pending[conn]

    async def _on_state(self, conn: Connection, msg: Message) -> None:
        op = msg.meta.get("op")
        if op == "stats":
            answer = self.stats()
        elif op == "peers":
            answer = {"members": self.members()}
        elif op == "trace":
            answer = self.trace_answer(msg.meta.get("request"))
        elif op == "request":
            answer = {"name": self.name, **self.request_state()}
        else:
            raise ValueError("STATE is only answered for op stats, peers, trace and request")
        await self.connections.send(conn, Message(MsgType.STATE, msg.request_id, answer))

    async def _on_error(self, conn: Connection, msg: Message) -> None:
        rid = msg.request_id
        why = reason(msg.meta.get("reason"))  # cut and escaped: it is logged and repeated
        if msg.meta.get("op") == "cancel":
            self.worker.on_cancel(conn.peer_name, rid, why, quiet=msg.meta.get("quiet") is True)
        else:
            lost = msg.meta.get("lost")
            self.requester.on_error(conn.peer_name, rid, why, lost if isinstance(lost, str) else None)

    async def _on_auction(self, conn: Connection, msg: Message) -> None:
        try:
            message = from_message(msg, conn.peer_name)
        except MessageFormatError as exc:
            # a malformed auction message is a peer's mistake: log and drop it
            log.warning("dropping %s from %r: %s", msg.kind.name, conn.peer_name, exc)
            return
        self.spawn(self.guarded(msg.request_id,
                                self.route_auction(msg.request_id, [Outgoing(self.name, message)])))

    async def route_auction(self, rid: int, outgoing: list[Outgoing]) -> None:
        """Deliver auction messages: to this node's own bidder or auctioneer, or to peers."""
        queue = list(outgoing)
        while queue:
            out = queue.pop(0)
            if out.to != self.name:
                try:
                    await self.send_to(out.to, to_message(rid, out.message))
                except WireError as exc:
                    # unreachable bidder: the auction's round deadline drops it
                    log.info("auction %d: cannot reach %s: %s", rid, out.to, exc)
                continue
            if isinstance(out.message, BIDDER_MESSAGES):
                queue += self.worker.bidder_receive(rid, out.message)
            else:
                queue += self.requester.auctioneer_receive(rid, out.message)

    # ---- a request's actions -----------------------------------------------------------
    async def take_pieces(self, rid: int, sender: str, pieces: list[Piece], path: float,
                          meta: dict[str, Any]) -> None:
        """Pieces of a request's maps: for the requester (re-scatter, logits) or for this
        node's tiles and head."""
        mine = [p for p in pieces if p.stage not in REQUESTER_STAGES]
        for piece in pieces:
            if piece.stage == "gather":
                await self.requester.on_gather(rid, sender, piece.block, piece.region, piece.tensor, path)
            elif piece.stage == "logits":
                self.requester.on_logits(rid, sender, piece.tensor, meta.get("head"), path)
        if mine:
            await self.worker.on_pieces(rid, sender, mine, path)

    async def execute(self, rid: int, actions: list[Action], path_s: float) -> None:
        """Carry out a request's actions: tiles and the head to compute, pieces to send (one
        frame per destination)."""
        sends: dict[str, list[SendPiece]] = {}
        for action in actions:
            if isinstance(action, SendPiece):
                sends.setdefault(action.dest, []).append(action)
            elif isinstance(action, Compute):
                self.spawn(self.guarded(rid, self.worker.compute(rid, action, path_s, time.perf_counter())))
            elif isinstance(action, RunHead):
                self.spawn(self.guarded(rid, self.worker.run_head(rid, action, path_s)))
        for dest, group in sends.items():
            await self._send_pieces(rid, dest, group, path_s)

    async def _send_pieces(self, rid: int, dest: str, group: list[SendPiece], path_s: float) -> None:
        if dest == self.name:
            pieces = [Piece(a.block, a.region, a.stage, a.tensor) for a in group]
            await self.take_pieces(rid, self.name, pieces, path_s, {})
            return
        listed, tensors = encode_pieces([(a.block, a.region, a.stage, a.tensor) for a in group])
        sent_at = time.time()
        msg = Message(MsgType.TILE, rid, {"pieces": listed, "path_s": path_s, "sent_at": sent_at}, tensors)
        try:
            await self.send_to(dest, msg)
            self.trace.record(rid, Span(f"send to {dest}", "send", sent_at, time.time() - sent_at,
                                        {"to": dest, "pieces": len(group),
                                         "bytes": sum(tensor_bytes(t) for t in tensors)}))
        except WireError as exc:
            # the next device is gone: the request cannot complete, its requester must know
            await self.fail_request(rid, self._requester_of(rid), f"cannot reach {dest}: {exc}", lost=dest)
            return
        # no bandwidth sample here: send() returns when the bytes reach the socket buffer,
        # not the peer; the receiver measures the link as delivered (`_on_tile`)
        self.relayed_boundary_bytes += sum(a.relayed_bytes for a in group)

    async def deliver_logits(self, rid: int, requester: str, logits: torch.Tensor, head: dict[str, Any],
                             path_s: float) -> None:
        """The head device's answer to the request's requester."""
        if requester == self.name:
            self.requester.on_logits(rid, self.name, logits, head, path_s)
            return
        listed, tensors = encode_pieces([(0, Region(0, 1, 0, 1), "logits", logits)])
        msg = Message(MsgType.TILE, rid, {"pieces": listed, "head": head, "path_s": path_s,
                                          "sent_at": time.time()}, tensors)
        try:
            await self.send_to(requester, msg)
        except WireError as exc:
            # the requester is gone: nobody is waiting for these logits any more
            log.info("cannot send the logits of request %d to %s: %s", rid, requester, exc)

    def _requester_of(self, rid: int) -> str:
        if rid in self.requester.contexts or rid in self.requester.auctions:
            return self.name
        return self.worker.requester_of(rid)

    async def guarded(self, rid: int, work: Awaitable[None]) -> None:
        """Run one piece of request `rid`'s work; any error fails that request at once."""
        try:
            await work
        except Exception as exc:  # noqa: BLE001
            # a bug or an unforeseen error in request work (model code, a malformed piece)
            # must not leave the client waiting for the timeout: log the traceback and fail
            # the request with the reason; the node keeps serving
            log.exception("request %d: error on %s", rid, self.name)
            await self.fail_request(rid, self._requester_of(rid),
                                    f"error on {self.name}: {type(exc).__name__}: {exc}")

    # ---- failures ------------------------------------------------------------------
    async def fail_request(self, rid: int, requester: str, reason: str, *, lost: str | None = None) -> None:
        """Request `rid` cannot complete here: drop its work and tell its requester why
        (`lost`: the device of the request this node could not reach, so the requester runs
        the request again without it)."""
        log.warning("request %d: %s", rid, reason)
        self.worker.cancel(rid, reason)
        if requester == self.name or rid in self.requester.contexts:
            self.requester.fail(rid, reason, lost=lost)
            return
        if requester:
            meta = {"reason": reason, **({"lost": lost} if lost else {})}
            try:
                await self.send_to(requester, Message(MsgType.ERROR, rid, meta))
            except WireError as exc:
                # the requester is gone too: nobody left to tell
                log.info("cannot tell %s that request %d failed: %s", requester, rid, exc)

    def cancel_everywhere(self, rid: int, participants: set[str], reason: str, *, quiet: bool = False) -> None:
        """Tell every other participant of a failed request (or a closed standing auction,
        `quiet`) to drop its state and commitments (best effort)."""
        notice = Message(MsgType.ERROR, rid, {"op": "cancel", "reason": reason, **({"quiet": True} if quiet else {})})
        for name in sorted(participants - {self.name}):
            self.spawn(self._notify(name, notice))
        self.worker.cancel(rid, reason, quiet=quiet)

    async def _notify(self, name: str, msg: Message) -> None:
        try:
            await asyncio.wait_for(self.send_to(name, msg), CANCEL_SEND_TIMEOUT_S)
        except (WireError, TimeoutError) as exc:
            # the participant is gone or stalled: its own sweep or our death cleans it up
            log.info("cannot tell %s about request %d: %s", name, msg.request_id, exc)

    def peer_down(self, name: str, reason: str) -> None:
        if reason != LEFT_THE_MESH:
            self.metrics.peer_failures += 1
        self.connections.drop(name)
        self.requester.device_down(name, reason)
        self.worker.requester_down(name, reason)
        self.links.forget(name)
        self.boundary.forget(name)
        self.gossip.forget(name)

    def _connection_lost(self, name: str, ours: bool) -> None:
        self.membership.on_disconnect(name, time.monotonic())
        if ours and not self.stopped:
            self.keeper.link_lost(name)  # re-dials it; the requests using it run again without it
            return
        # a connection it opened to us: frames of a running attempt may have gone with it,
        # the attempts the peer takes part in run again without it (`attempts.py`)
        self.requester.device_down(name, "its connection was lost")
        for rid, requester in self.worker.with_device(name):
            # our pieces to it (or its to us) may be lost: its requester runs the request again
            self.spawn(self.fail_request(rid, requester, f"{self.name} lost its connection to {name}", lost=name))

    def _address_of(self, name: str) -> Address | None:
        peer = self.membership.peer(name)
        return peer.address if peer is not None else None

    def sweep(self, now: float) -> None:
        """Drop state that outlived its use (called on every heartbeat tick)."""
        self.requester.sweep(now)
        self.worker.sweep(now)


# a frame streams at least this many bytes after its first read to be a bandwidth sample: the
# receiver sees arrivals only when its event loop runs, and on a device in a CPU quota that
# is every few ms; shorter frames would time that rhythm, not the link
RATE_SAMPLE_BYTES = 256 << 10


def _path(meta: dict[str, Any], received_at: float) -> float:
    """The critical path (compute + transfer) behind a frame: the sender's, plus its trip."""
    path = number(meta.get("path_s", 0.0), "path_s")
    sent = number(meta.get("sent_at", received_at), "sent_at", lo=-MAX_WALL_S, hi=MAX_WALL_S)
    return path + min(MAX_SECONDS, max(0.0, received_at - sent))
