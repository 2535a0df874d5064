"""Thin asyncio adapter over the sans-IO codec and handshake: it only moves bytes and fires
the handshake timer. Every decision lives in `frames` and `handshake`.

Receiving is an `asyncio.BufferedProtocol` (`_WireProtocol`) whose `get_buffer()` hands the
transport the decoder's current payload buffer, so a tensor's bytes go from the socket (or
from the TLS layer) straight into the tensor that `recv()` returns: no intermediate `bytes`,
no copy. Only the fixed prefix, the header and frames of at most `SCRATCH_BYTES` pass
through a small scratch buffer; reads never reach past the current frame.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import socket
import ssl as ssl_module
import struct
import termios
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from meshci.wire.errors import (
    ConnectionClosed,
    HandshakeRefused,
    HandshakeTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from meshci.wire.frames import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameMac, encode, encode_chunks
from meshci.wire.handshake import HANDSHAKE_MAX_FRAME_BYTES, Handshake, HandshakeResult, Role
from meshci.wire.limiter import HandshakeLimiter
from meshci.wire.messages import Message, MsgType
from meshci.wire.tls import bound_name

log = logging.getLogger(__name__)

# Buffers below this size are joined into one write; larger ones are written as memoryview
# chunks of WRITE_CHUNK bytes with a drain after each, so a slow link holds at most about one
# chunk in the transport's buffer (back-pressure) and nothing is joined or pickled.
COALESCE_BYTES = 64 << 10
WRITE_CHUNK = 1 << 20
# Receive side: prefix, header and small frames are read into a scratch buffer this large.
SCRATCH_BYTES = 64 << 10
# Back-pressure on receive: once this many messages, or this many bytes received, wait for
# recv(), the connection stops reading until the application takes one or calls recv().
# Memory held per connection while the application is not receiving: about these limits.
RECV_QUEUE_MESSAGES = 64
RECV_QUEUE_BYTES = 1 << 20


@dataclass(frozen=True)
class FrameArrival:
    """When a received frame's bytes arrived (this process's `time.perf_counter()`): its
    first read at `began` carried `first_bytes` of it, its last byte came at `ended`. The
    rest, `nbytes - first_bytes`, crossed the link in `ended - began`: the link's delivered
    rate, measured where the bytes land rather than where `send()` returned."""

    nbytes: int
    began: float
    ended: float
    first_bytes: int

    def rate_sample(self, min_bytes: int) -> tuple[int, float] | None:
        """(bytes, seconds) for a bandwidth sample, or None when too little of the frame
        arrived after its first read to say anything."""
        streamed = self.nbytes - self.first_bytes
        seconds = self.ended - self.began
        if streamed < min_bytes or seconds <= 0:
            return None
        return streamed, seconds


def _waiting_bytes(fd: int) -> int:
    """Bytes received by the kernel on socket `fd` and not yet read (0 if unknown)."""
    if fd < 0:
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


# tcp_info's tcpi_last_data_recv (ms since the kernel last received data on the socket):
# after 8 one-byte fields and 11 u32 fields (linux/tcp.h, stable since 2.6)
_TCP_INFO_LAST_DATA_RECV = 52
# frames at least this large look up when their last byte reached the kernel
PRECISE_END_BYTES = 64 << 10


def _kernel_idle_s(sock: Any) -> float | None:
    """Seconds since the kernel last received data on TCP socket `sock` (ms resolution), or
    None where TCP_INFO is not available (another OS, a socket that is not TCP)."""
    if sock is None or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LAST_DATA_RECV + 4)
    except (OSError, AttributeError, ValueError):
        return None
    if len(info) < _TCP_INFO_LAST_DATA_RECV + 4:
        return None
    return struct.unpack_from("I", info, _TCP_INFO_LAST_DATA_RECV)[0] / 1000.0


class _WireProtocol(asyncio.BufferedProtocol):
    """Moves received bytes into a `FrameDecoder` and queues the messages it yields.

    At most one message is parsed ahead of the application during the handshake (the next
    frame's MAC key is not known yet), `RECV_QUEUE_MESSAGES`/`RECV_QUEUE_BYTES` after it;
    when that many wait, or that many bytes arrived while no `next_message()` waits,
    reading pauses until `next_message()` makes room or waits. A waiting `next_message()`
    lets a frame of any size (up to `max_frame_bytes`) stream into its tensors."""

    def __init__(self, decoder: FrameDecoder) -> None:
        self.decoder = decoder
        self.transport: asyncio.Transport | None = None
        self._fd = -1  # the socket, to see how many bytes wait in the kernel
        self._sock: Any = None  # and when its last bytes reached the kernel
        self.copied_bytes = 0  # bytes that went through the scratch buffer
        self.direct_bytes = 0  # bytes received straight into payload buffers
        self._loop = asyncio.get_running_loop()
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        self._direct = False
        self._messages: deque[tuple[Message, int, FrameArrival]] = deque()
        self._frame_began = 0.0  # when the first bytes of the frame being received arrived
        self._frame_first = 0  # how many of its bytes came in that first read
        self._queued_bytes = 0
        self._partial = 0  # bytes received of frames not yet complete
        self._queue_messages = 1
        self._queue_bytes = RECV_QUEUE_BYTES
        self._held = False
        self._error: RemoteProtocolError | None = None
        self._eof = False
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiters: deque[asyncio.Future[None]] = deque()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # The stream pair a transport was taken over from (accept): kept alive with us, since
        # a StreamWriter that is garbage collected closes its transport.
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._sock = sock

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._error is None:
            view = self.decoder.get_buffer()
            if view is not None:
                self._direct = True
                return view
        self._direct = False
        if self._error is not None:  # the stream is dead: swallow what still arrives
            return self._scratch
        return self._scratch[: self.decoder.read_hint(SCRATCH_BYTES)]

    def _arrived(self, nbytes: int) -> float:
        """Note `nbytes` read now; returns now. At a frame's first read, the bytes already
        waiting in the kernel count as arrived then too (they did not stream in after)."""
        now = time.perf_counter()
        if self._partial == 0:
            self._frame_began, self._frame_first = now, nbytes + _waiting_bytes(self._fd)
        return now

    def buffer_updated(self, nbytes: int) -> None:
        now = self._arrived(nbytes)
        self._partial += nbytes
        if self._direct:
            self.direct_bytes += nbytes
            self.decoder.buffer_updated(nbytes)
        elif self._error is None:
            self.copied_bytes += nbytes
            self.decoder.feed(self._scratch[:nbytes])
        self._parse(now)

    def data_received(self, data: bytes) -> None:
        """Bytes that reached us as an object: those a StreamReader had buffered before
        `Connection.accept` took the transport over."""
        self._partial += len(data)
        if self._error is None:
            self.copied_bytes += len(data)
            self.decoder.feed(data)
        self._parse()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # Keep the write side open after a half-close (plain TCP); TLS cannot do that.
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._lost_exc = exc
        self._wake()
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # -- parsing and back-pressure ---------------------------------------------------------
    def _parse(self, now: float | None = None) -> None:
        if self._error is not None:
            return
        now = time.perf_counter() if now is None else now
        try:
            while not self._held:
                msg = self.decoder.next_message()
                if msg is None:
                    break
                size = self.decoder.last_frame_bytes
                arrival = FrameArrival(size, self._frame_began, self._frame_ended(size, now),
                                       min(self._frame_first, size))
                self._messages.append((msg, size, arrival))
                self._queued_bytes += size
                self._partial = max(0, self._partial - size)
                # the rest of this read (and what waits behind it) begins the next frame
                self._frame_began = now
                self._frame_first = self._partial + (_waiting_bytes(self._fd) if self._partial else 0)
                if not self._below_limits():
                    self._hold()
        except RemoteProtocolError as exc:  # the stream is unusable: stop; recv() reports it
            self._error = exc
            self._hold()
        if (self._waiter is None or self._waiter.done()) and not self._below_limits():
            # Nobody waits in recv(): do not run ahead further, even within a frame.
            self._hold()
        self._wake()

    def _frame_ended(self, size: int, now: float) -> float:
        """When a frame just completed by a read at `now` had its last byte in the kernel.
        A process paused by its CPU quota reads a frame's tail late; when nothing beyond
        the frame has arrived, the kernel's time of its last received data is the tail's."""
        if size < PRECISE_END_BYTES or self._partial > size or _waiting_bytes(self._fd):
            return now
        idle = _kernel_idle_s(self._sock)
        return now if idle is None else max(self._frame_began, now - idle)

    def _below_limits(self) -> bool:
        return (
            len(self._messages) < self._queue_messages
            and self._queued_bytes + self._partial < self._queue_bytes
        )

    def _hold(self) -> None:
        self._held = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _release(self) -> None:
        self._held = False
        if self.transport is not None and not (self._lost or self._eof):
            self.transport.resume_reading()
        self._parse()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def handshake_done(self) -> None:
        """The frame MAC is in place: read and parse ahead up to the normal queue limits."""
        self._queue_messages = RECV_QUEUE_MESSAGES
        if self._held and not self._messages:
            self._release()

    # -- what Connection awaits ------------------------------------------------------------
    async def next_message(self) -> tuple[Message, int, FrameArrival]:
        """The next message and its size on the wire. Raises RemoteProtocolError (bad or
        truncated frame) or ConnectionClosed."""
        while True:
            if self._messages:
                msg, size, arrival = self._messages.popleft()
                self._queued_bytes -= size
                if self._held and self._queue_messages > 1 and self._below_limits():
                    # Read on as soon as there is room (a peer's TLS close_notify, too).
                    # Not during the handshake: the next frame may need the new MAC key.
                    self._release()
                return msg, size, arrival
            if self._error is not None:
                raise self._error
            # Waiting first, then releasing: with a waiter present a frame of any size may
            # stream in, and whatever the release parses at once resolves the waiter.
            self._waiter = self._loop.create_future()
            try:
                if self._held:
                    self._release()
                if not self._messages and self._error is None:
                    if self._lost or self._eof:
                        self._raise_closed()
                    await self._waiter
            finally:
                self._waiter = None

    def _raise_closed(self) -> None:
        if self.decoder.in_frame:
            raise RemoteProtocolError(
                f"connection closed in the middle of a frame ({self.decoder.bytes_wanted} bytes missing)"
            )
        if self._lost_exc is not None:
            raise ConnectionClosed(f"connection lost: {self._lost_exc}")
        raise ConnectionClosed("peer closed the connection")

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self.transport is not None and self.transport.is_closing() and not self._lost:
            await asyncio.sleep(0)  # let connection_lost run, as StreamWriter.drain does
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter
        if self._lost:
            raise ConnectionResetError("connection lost")

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


class Connection:
    """An authenticated (or explicitly insecure) framed connection to one peer.

    Build it with `open()` (client) or `accept()` (inside an `asyncio.start_server`
    callback); both run the handshake and return only once the peer is known. `send` and
    `recv` may be used from different tasks; each is serialised by its own lock.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: _WireProtocol,
        *,
        name: str,
        result: HandshakeResult,
        max_frame_bytes: int,
        bytes_sent: int = 0,
        bytes_received: int = 0,
    ) -> None:
        self._transport = transport
        self._proto = protocol
        self.name = name
        self.peer_name = result.peer_name
        self.authenticated = result.authenticated
        self.peer_address: Any = transport.get_extra_info("peername")
        self.bytes_sent = bytes_sent
        self.bytes_received = bytes_received
        self.last_arrival: FrameArrival | None = None  # of the message recv() returned last
        self._send_mac: FrameMac | None = result.send_mac
        self._max_frame_bytes = max_frame_bytes
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._closed = False

    # -- construction ----------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        secret: bytes | None,
        name: str,
        ssl: ssl_module.SSLContext | None = None,
        timeout: float = 5.0,
        insecure: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> Connection:
        """Connect to `host:port` and run the client side of the handshake.

        Raises ConnectionClosed when the peer cannot be reached or hangs up,
        HandshakeTimeout, or RemoteProtocolError/AuthenticationError. The messages name the
        failure, not the address (callers say which peer they dialled)."""
        handshake = Handshake(Role.CLIENT, name, secret, insecure=insecure)
        decoder = FrameDecoder(max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    lambda: _WireProtocol(decoder), host, port, ssl=ssl
                )
        except TimeoutError as exc:  # connect (or TLS handshake) hung: report as a timeout
            raise HandshakeTimeout(f"connect timed out after {timeout} s") from exc
        except OSError as exc:  # refused, unreachable, TLS rejected: the peer is not there for us
            raise ConnectionClosed(_reason(exc)) from exc
        except (UnicodeError, ValueError) as exc:  # a host name no resolver takes (a label too long)
            raise ConnectionClosed(f"bad address {str(host)[:80]!r}: {exc}") from exc
        transport = cast(asyncio.Transport, transport)
        return await cls._establish(transport, protocol, handshake, name, timeout, max_frame_bytes)

    @classmethod
    async def accept(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        secret: bytes | None,
        name: str,
        timeout: float = 5.0,
        insecure: bool = False,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        limiter: HandshakeLimiter | None = None,
        first_timeout: float | None = None,
    ) -> Connection:
        """Run the server side of the handshake on a freshly accepted stream pair (from an
        `asyncio.start_server` callback). The connection takes the transport over from the
        stream pair; use only the returned `Connection` afterwards.

        With a `limiter` that has no free slot the connection is refused at once
        (HandshakeRefused). `first_timeout`: the peer's first handshake message must arrive
        within it (an idle socket holds a slot that long only). On failure the stream is
        closed, the reason logged, and the error raised."""
        transport = cast(asyncio.Transport, writer.transport)
        address = writer.get_extra_info("peername")
        source = str(address[0]) if isinstance(address, tuple) else None
        if limiter is not None and not limiter.try_acquire(source):
            log.warning(
                "refusing connection from %s: %d handshakes already in progress (limit %d, %s from %s)",
                address,
                limiter.pending,
                limiter.max_pending,
                limiter.pending_from(source) if source is not None else "?",
                source,
            )
            transport.abort()
            raise HandshakeRefused(f"too many handshakes in progress ({limiter.max_pending})")
        try:
            handshake = Handshake(Role.SERVER, name, secret, insecure=insecure)
            protocol = _WireProtocol(FrameDecoder(max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES))
            protocol.streams = (reader, writer)
            await _take_over(reader, transport, protocol)
            return await cls._establish(transport, protocol, handshake, name, timeout, max_frame_bytes,
                                        first_timeout=first_timeout)
        finally:
            if limiter is not None:
                limiter.release(source)

    @classmethod
    async def _establish(
        cls,
        transport: asyncio.Transport,
        protocol: _WireProtocol,
        handshake: Handshake,
        name: str,
        timeout: float,
        max_frame_bytes: int,
        *,
        first_timeout: float | None = None,
    ) -> Connection:
        address = transport.get_extra_info("peername")
        counts = [0, 0]  # sent, received
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            async with asyncio.timeout(min(timeout, first_timeout or timeout)) as deadline:
                for msg in handshake.initiate():
                    counts[0] += _write_small(transport, encode(msg))
                await protocol.drain()
                while not handshake.complete:
                    msg, n, _arrival = await protocol.next_message()
                    deadline.reschedule(end)  # it spoke: the rest of the whole timeout
                    counts[1] += n
                    for reply in handshake.receive(msg):
                        counts[0] += _write_small(transport, encode(reply))
                    await protocol.drain()
        except TimeoutError as exc:  # the peer opened a connection and never finished speaking
            log.warning("handshake with %s timed out after %.1f s; closing", address, timeout)
            transport.abort()
            raise HandshakeTimeout(f"handshake with {address} timed out after {timeout} s") from exc
        except RemoteProtocolError as exc:  # bad bytes or failed proof: refuse, say why, close
            # a node logs who failed to authenticate to it; a dialler's caller reports it
            level = logging.WARNING if handshake.role is Role.SERVER else logging.INFO
            log.log(level, "handshake with %s rejected: %s; closing", address, exc)
            _refuse(transport, "handshake failed")
            raise
        except ConnectionClosed as exc:  # the peer hung up mid-handshake
            log.warning("handshake with %s failed: %s", address, exc)
            transport.abort()
            raise
        except (ConnectionError, OSError) as exc:  # reset while we wrote: the peer is gone
            log.warning("handshake with %s failed: %s", address, exc)
            transport.abort()
            raise ConnectionClosed(f"connection to {address} lost during the handshake: {exc}") from exc
        except asyncio.CancelledError:  # our caller gave up: leave no half-open socket behind
            transport.abort()
            raise
        result = handshake.result
        bound = bound_name(result.peer_name, transport.get_extra_info("peercert"))
        if bound != result.peer_name:
            # mutual TLS: the certificate does not bear the name the peer claims
            log.info("peer at %s says it is %r but its certificate does not name it: it speaks "
                     "for no node", address, result.peer_name)
            result = dataclasses.replace(result, peer_name=bound)
        # The protocol parsed nothing past the last handshake frame, so the keys and the
        # frame limit apply from the very next frame on.
        protocol.decoder.set_mac(result.recv_mac)
        protocol.decoder.max_frame_bytes = max_frame_bytes
        protocol.handshake_done()
        log.debug(
            "%s %s peer %r at %s (%s)",
            name,
            "accepted" if handshake.role is Role.SERVER else "connected to",
            result.peer_name,
            address,
            "authenticated" if result.authenticated else "INSECURE",
        )
        return cls(
            transport,
            protocol,
            name=name,
            result=result,
            max_frame_bytes=max_frame_bytes,
            bytes_sent=counts[0],
            bytes_received=counts[1],
        )

    # -- traffic ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    async def send(self, msg: Message) -> None:
        """Send one message. Tensor buffers are written as memoryviews, in chunks, awaiting
        `drain()` after each (back-pressure). Raises ConnectionClosed or LocalProtocolError."""
        if self._closed:
            raise ConnectionClosed(f"connection to {self.peer_name!r} is closed")
        async with self._send_lock:
            if self._closed:  # aborted by the receiving side while we waited for the lock
                raise ConnectionClosed(f"connection to {self.peer_name!r} is closed")
            # Encode under the lock: MAC sequence numbers must follow the write order.
            chunks = encode_chunks(
                msg, self._send_mac, max_frame_bytes=self._max_frame_bytes, chunk_bytes=WRITE_CHUNK
            )
            try:
                small = bytearray()
                for chunk in chunks:
                    view = memoryview(chunk)
                    if view.nbytes < COALESCE_BYTES:
                        small += view
                        continue
                    if small:
                        self._write(bytes(small))
                        small.clear()
                    self._write(view)
                    await self._proto.drain()
                if small:
                    self._write(bytes(small))
                await self._proto.drain()
            except (ConnectionError, OSError) as exc:  # reset/broken pipe: the peer is gone
                self._abort()
                raise ConnectionClosed(f"connection to {self.peer_name!r} lost: {exc}") from exc
            except asyncio.CancelledError:  # cancelled mid-frame: the stream is now corrupt
                self._abort()
                raise

    def _write(self, data: bytes | memoryview) -> None:
        self._transport.write(data)
        self.bytes_sent += memoryview(data).nbytes

    async def recv(self) -> Message:
        """The next message; its tensors are the buffers the payload was received into.
        Raises ConnectionClosed when the peer hung up between frames, RemoteProtocolError
        (after aborting the connection, reason logged) on a malformed, truncated or
        unauthenticated frame. Cancelling it loses nothing: frames are parsed by the
        protocol, not by this call."""
        if self._closed:
            raise ConnectionClosed(f"connection to {self.peer_name!r} is closed")
        async with self._recv_lock:
            try:
                msg, size, self.last_arrival = await self._proto.next_message()
            except RemoteProtocolError as exc:  # stream state unknown: abort, never resync
                log.warning(
                    "protocol error from %r at %s: %s; aborting connection",
                    self.peer_name,
                    self.peer_address,
                    exc,
                )
                self._abort()
                raise
            except ConnectionClosed:  # clean end of stream between frames
                self._abort()
                raise
            self.bytes_received += size
            return msg

    async def close(self) -> None:
        """Close the connection (flushing what was sent). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._transport.close()
        await self._proto.wait_closed()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data."""
        self._abort()

    def _abort(self) -> None:
        self._closed = True
        self._transport.abort()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        auth = "authenticated" if self.authenticated else "insecure"
        return f"<Connection {self.name}->{self.peer_name} {self.peer_address} {auth} {state}>"


async def _take_over(
    reader: asyncio.StreamReader, transport: asyncio.Transport, protocol: _WireProtocol
) -> None:
    """Make `protocol` the transport's protocol in place of the StreamReader's, handing it
    whatever the reader had already buffered."""
    # Reading is paused across the switch: uvloop chooses the buffered read path only when
    # reading (re)starts, and no byte may reach the old protocol after the reader is drained.
    transport.pause_reading()
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    failure = reader.exception()
    if failure is None:
        # The reader gets nothing more; marking its end lets read() return what it holds
        # without waiting.
        reader.feed_eof()
        leftover = await reader.read()
        if leftover:
            protocol.data_received(leftover)
    if transport.is_closing():
        # Closed before the switch: the old protocol may already have been told.
        protocol.connection_lost(failure)
    else:
        transport.resume_reading()


def _reason(exc: OSError) -> str:
    """A connect failure in words, without repeating the address."""
    if isinstance(exc, ConnectionError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc)


def _write_small(transport: asyncio.Transport, buffers: list[bytes | memoryview]) -> int:
    data = b"".join(buffers)
    transport.write(data)
    return len(data)


def _refuse(transport: asyncio.Transport, reason: str) -> None:
    """Best effort: tell the peer why (without details an attacker could use), then close."""
    try:
        transport.write(b"".join(encode(Message(MsgType.ERROR, 0, {"reason": reason}))))
    except (ConnectionError, OSError, LocalProtocolError):  # peer already gone: nothing to tell
        pass
    transport.close()
