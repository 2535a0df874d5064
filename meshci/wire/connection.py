"""Thin asyncio adapter over the sans-IO codec and handshake: it only moves bytes and fires
the handshake timer. Every decision lives in `frames` and `handshake`.

Receiving is an `asyncio.BufferedProtocol` (`_WireProtocol`, in `protocol.py`) that reads a
tensor's bytes straight into the tensor `recv()` returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl as ssl_module
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
from meshci.wire.protocol import RECV_QUEUE_BYTES, RECV_QUEUE_MESSAGES, FrameArrival, _WireProtocol

__all__ = ["Connection", "FrameArrival", "HandshakeLimiter", "RECV_QUEUE_BYTES", "RECV_QUEUE_MESSAGES"]
from meshci.wire.tls import bound_name

log = logging.getLogger(__name__)

# Buffers below this size are joined into one write; larger ones are written as memoryview
# chunks of WRITE_CHUNK bytes with a drain after each, so a slow link holds at most about one
# chunk in the transport's buffer (back-pressure) and nothing is joined or pickled.
COALESCE_BYTES = 64 << 10
WRITE_CHUNK = 1 << 20
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

    def heard_at(self) -> float:
        """When bytes from the peer last arrived (`time.monotonic()`), whole frame or not."""
        return self._proto.heard_at()

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
