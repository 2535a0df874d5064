"""The node's sockets: accepted connections, two outbound connections per peer (lanes),
and the loop that reads each connection and hands every message to the node's dispatcher.

Every node dials each peer it learns about and uses those outbound connections to send;
what arrives on any connection (outbound or accepted) is dispatched the same way. A
client (`meshci infer`) gets its answer on the connection it asked on. Nothing here knows
what a message means: the node passes in who to greet a fresh connection with
(`greeting`) and what to do with a message (`dispatch`) or a lost peer (`on_lost`).

Lanes: the *bulk* lane (dialled first, greeted with a JOIN) carries tensors and whatever
must stay in order with them (TILE, PLAN, JOIN, ...); the *control* lane, a second
connection to the same peer opened right after, carries `CONTROL_KINDS` (heartbeats and
echoes, auction messages, ERROR and cancels, LEAVE). A control message never waits for a
multi-megabyte tile frame on the bulk lane's send lock or in its socket buffer. Each lane
is a whole `Connection`: its own handshake, MAC keys and sequence numbers, zero-copy
tensor frames unchanged. Until the control lane is up (or while it is being redialled)
control messages ride the bulk lane.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from meshci.node.auction import AUCTION_KINDS
from meshci.node.liveness import REDIAL_CAP_S
from meshci.node.membership import Address
from meshci.wire import Connection, HandshakeLimiter, Message, MsgType
from meshci.wire.errors import ConnectionClosed, RemoteProtocolError, WireError

if TYPE_CHECKING:
    from meshci.node.server import NodeConfig

log = logging.getLogger(__name__)

Dispatch = Callable[[Connection, Message], Awaitable[None]]

HANDSHAKES = 128  # handshakes in progress on the listener
HANDSHAKES_PER_SOURCE = 8  # ... from one address
FIRST_MESSAGE_TIMEOUT_S = 2.0  # a fresh socket must say HELLO within this
TLS_HANDSHAKE_TIMEOUT_S = 5.0  # with --tls-*: the TLS handshake before ours
# kinds sent on the control lane: small, and late if they wait behind a tile
CONTROL_KINDS = frozenset({MsgType.GOSSIP, MsgType.LEAVE, MsgType.ERROR, MsgType.PING, MsgType.PONG,
                           *AUCTION_KINDS})


class Connections:
    """Accepted and outbound connections of one node, with byte counters by message kind."""

    def __init__(self, config: NodeConfig, *, dispatch: Dispatch,
                 address_of: Callable[[str], Address | None],
                 greeting: Callable[[], Message],
                 on_lost: Callable[[str, bool], None],
                 spawn: Callable[[Any], asyncio.Task[Any]]) -> None:
        self.config = config
        self.name = config.name
        self._dispatch = dispatch
        self._address_of = address_of
        self._greeting = greeting
        self._on_lost = on_lost
        self._spawn = spawn
        # a flood of idle sockets from one address holds at most HANDSHAKES_PER_SOURCE
        # slots, each for FIRST_MESSAGE_TIMEOUT_S: others still get in
        self.handshakes = HandshakeLimiter(max_pending=HANDSHAKES, per_source=HANDSHAKES_PER_SOURCE)
        self.outbound: dict[str, Connection] = {}  # the bulk lane to each peer
        self.control: dict[str, Connection] = {}  # the control lane to each peer
        self._control_dialing: set[str] = set()
        self._control_failed: dict[str, float] = {}  # peer -> when its control dial last failed
        self.inbound: set[Connection] = set()
        self._dialing: dict[str, asyncio.Lock] = {}
        self._dial_waiters: dict[str, int] = {}
        self.sent_bytes: dict[str, int] = defaultdict(int)
        self.received_bytes: dict[str, int] = defaultdict(int)
        # bytes by peer name (metrics); bounded: names past MAX_COUNTED_PEERS count as "other"
        self.peer_sent: dict[str, int] = defaultdict(int)
        self.peer_received: dict[str, int] = defaultdict(int)

    # ---- opening -------------------------------------------------------------------
    async def open(self, address: Address) -> Connection:
        return await Connection.open(address.host, address.port, secret=self.config.secret,
                                     name=self.name, ssl=self.config.client_ssl,
                                     insecure=self.config.insecure)

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = await Connection.accept(reader, writer, secret=self.config.secret, name=self.name,
                                           insecure=self.config.insecure, limiter=self.handshakes,
                                           first_timeout=FIRST_MESSAGE_TIMEOUT_S)
        except (WireError, OSError) as exc:
            # a peer that fails the handshake is dropped (wire logged the reason); keep serving
            log.info("rejected connection from %s: %s", writer.get_extra_info("peername"), exc)
            writer.close()
            return
        self.inbound.add(conn)
        try:
            await self.serve(conn)
        finally:
            self.inbound.discard(conn)
            conn.abort()

    def adopt(self, name: str, conn: Connection) -> None:
        """Use `conn` (opened by the caller, e.g. while joining) as the outbound one to `name`."""
        self.outbound[name] = conn
        self._spawn(self.serve(conn))

    async def to(self, name: str) -> Connection:
        """The outbound connection to a peer, dialled (and greeted) on demand."""
        conn = self.outbound.get(name)
        if conn is not None and not conn.closed:
            return conn
        lock = self._dialing.setdefault(name, asyncio.Lock())
        self._dial_waiters[name] = self._dial_waiters.get(name, 0) + 1
        try:
            async with lock:
                conn = self.outbound.get(name)
                if conn is not None and not conn.closed:
                    return conn
                conn = await self._open_named(name)
                self.adopt(name, conn)
                await self.send(conn, self._greeting())
                self._control_failed.pop(name, None)
                self._open_control(name)
                return conn
        finally:
            # the lock lives only while someone dials that name (names come from gossip)
            self._dial_waiters[name] -= 1
            if not self._dial_waiters[name]:
                del self._dial_waiters[name]
                self._dialing.pop(name, None)

    async def _open_named(self, name: str) -> Connection:
        """A new authenticated connection to the member `name` (at its known address), or
        ConnectionClosed when its address is unknown or another node answers there."""
        address = self._address_of(name)
        if address is None:
            raise ConnectionClosed(f"no address known for {name!r}")
        conn = await self.open(address)
        if conn.peer_name != name:
            conn.abort()
            raise ConnectionClosed(f"{address} answered as {conn.peer_name!r}, not {name!r}")
        return conn

    def is_open(self, name: str) -> bool:
        """Whether the bulk lane to `name` is up (the control lane follows it)."""
        conn = self.outbound.get(name)
        return conn is not None and not conn.closed

    def lane(self, name: str, kind: MsgType) -> Connection | None:
        """The open connection a message of `kind` to `name` goes on: the control lane for
        `CONTROL_KINDS` when it is up (dialled in the background when it is not), else the
        bulk lane; None when neither is open."""
        bulk = self.outbound.get(name)
        if bulk is None or bulk.closed:
            return None
        if kind not in CONTROL_KINDS:
            return bulk
        control = self.control.get(name)
        if control is not None and not control.closed:
            return control
        self._open_control(name)
        return bulk

    def _open_control(self, name: str) -> None:
        failed = self._control_failed.get(name)
        if name in self._control_dialing or (
                failed is not None and asyncio.get_running_loop().time() - failed < REDIAL_CAP_S):
            return
        self._control_dialing.add(name)
        self._spawn(self._dial_control(name))

    async def _dial_control(self, name: str) -> None:
        try:
            conn = await self._open_named(name)
            old = self.control.pop(name, None)
            if old is not None:
                old.abort()
            if not self.is_open(name):  # the peer was dropped while we dialled
                conn.abort()
                return
            self.control[name] = conn
            self._control_failed.pop(name, None)
            self._spawn(self.serve(conn))
        except WireError as exc:
            # control messages ride the bulk lane meanwhile; retried after REDIAL_CAP_S
            log.info("cannot open the control lane to %s: %s", name, exc)
            self._control_failed[name] = asyncio.get_running_loop().time()
            while len(self._control_failed) > MAX_COUNTED_PEERS:
                del self._control_failed[next(iter(self._control_failed))]
        finally:
            self._control_dialing.discard(name)

    def peer_connections(self) -> list[Connection]:
        """Every open connection that speaks for a node (either lane, either direction)."""
        conns = [*self.outbound.values(), *self.control.values(), *self.inbound]
        return [c for c in conns if c.peer_name and not c.closed]

    # ---- traffic -------------------------------------------------------------------
    async def serve(self, conn: Connection) -> None:
        """Read and dispatch messages until the connection ends."""
        while not conn.closed:
            before = conn.bytes_received
            try:
                msg = await conn.recv()
            except (ConnectionClosed, RemoteProtocolError) as exc:
                # peer hung up or sent garbage (wire aborted and logged it): drop this connection
                log.debug("connection from %r ended: %s", conn.peer_name, exc)
                if conn.peer_name:  # and whether it was one of our own lanes to that peer
                    self._on_lost(conn.peer_name, conn in (self.outbound.get(conn.peer_name),
                                                           self.control.get(conn.peer_name)))
                return
            self.received_bytes[msg.kind.name] += conn.bytes_received - before
            _count(self.peer_received, conn.peer_name, conn.bytes_received - before)
            await self._dispatch(conn, msg)

    async def send(self, conn: Connection, msg: Message) -> None:
        before = conn.bytes_sent
        try:
            await conn.send(msg)
        finally:
            self.sent_bytes[msg.kind.name] += conn.bytes_sent - before
            _count(self.peer_sent, conn.peer_name, conn.bytes_sent - before)

    async def send_quietly(self, conn: Connection, msg: Message) -> None:
        try:
            await self.send(conn, msg)
        except WireError as exc:
            # best effort (a LEAVE at shutdown, a heartbeat): the peer may be gone already
            log.debug("could not send %s to %r: %s", msg.kind.name, conn.peer_name, exc)

    async def send_to(self, name: str, msg: Message) -> None:
        """Send to a peer by name over this node's outbound connection of the message's lane
        (the bulk lane dialled on demand)."""
        conn = self.lane(name, msg.kind)
        await self.send(conn if conn is not None else await self.to(name), msg)

    # ---- closing -------------------------------------------------------------------
    def drop(self, name: str) -> None:
        """Abort the outbound connection to `name` (it is down)."""
        for lane in (self.outbound, self.control):
            conn = lane.pop(name, None)
            if conn is not None:
                conn.abort()

    def abort_all(self) -> None:
        for conn in list(self.outbound.values()) + list(self.control.values()) + list(self.inbound):
            conn.abort()


MAX_COUNTED_PEERS = 256


def _count(table: dict[str, int], name: str, n: int) -> None:
    """Add `n` bytes to `name`'s count; a name past the first MAX_COUNTED_PEERS is "other"
    (clients each have their own name: the table must not grow with them)."""
    if name not in table and len(table) >= MAX_COUNTED_PEERS:
        name = "other"
    table[name] += n
