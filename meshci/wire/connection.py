"""Thin asyncio adapter over the sans-IO codec and handshake: it only moves bytes and fires
the handshake timer. Every decision lives in `frames` and `handshake`."""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from types import TracebackType
from typing import Any

from meshci.wire.errors import (
    ConnectionClosed,
    HandshakeTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from meshci.wire.frames import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameMac, encode, encode_chunks
from meshci.wire.handshake import HANDSHAKE_MAX_FRAME_BYTES, Handshake, HandshakeResult, Role
from meshci.wire.messages import Message, MsgType

log = logging.getLogger(__name__)

# Buffers below this size are joined into one write; larger ones are written as memoryview
# chunks of WRITE_CHUNK bytes with a drain after each, so a slow link holds at most about one
# chunk in the transport's buffer (back-pressure) and nothing is joined or pickled.
COALESCE_BYTES = 64 << 10
WRITE_CHUNK = 1 << 20
READ_CHUNK = 1 << 20


class Connection:
    """An authenticated (or explicitly insecure) framed connection to one peer.

    Build it with `open()` (client) or `accept()` (inside an `asyncio.start_server`
    callback); both run the handshake and return only once the peer is known. `send` and
    `recv` may be used from different tasks; each is serialised by its own lock.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str,
        result: HandshakeResult,
        decoder: FrameDecoder,
        max_frame_bytes: int,
        bytes_sent: int = 0,
        bytes_received: int = 0,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.name = name
        self.peer_name = result.peer_name
        self.authenticated = result.authenticated
        self.peer_address: Any = writer.get_extra_info("peername")
        self.bytes_sent = bytes_sent
        self.bytes_received = bytes_received
        self._send_mac: FrameMac | None = result.send_mac
        self._decoder = decoder
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
        HandshakeTimeout, or RemoteProtocolError/AuthenticationError."""
        handshake = Handshake(Role.CLIENT, name, secret, insecure=insecure)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, ssl=ssl)
        except TimeoutError as exc:  # connect (or TLS handshake) hung: report as a timeout
            raise HandshakeTimeout(f"connecting to {host}:{port} timed out after {timeout} s") from exc
        except OSError as exc:  # refused, unreachable, TLS rejected: the peer is not there for us
            raise ConnectionClosed(f"cannot connect to {host}:{port}: {exc}") from exc
        return await cls._establish(reader, writer, handshake, name, timeout, max_frame_bytes)

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
    ) -> Connection:
        """Run the server side of the handshake on a freshly accepted stream pair.

        On failure the stream is closed, the reason logged, and the error raised."""
        handshake = Handshake(Role.SERVER, name, secret, insecure=insecure)
        return await cls._establish(reader, writer, handshake, name, timeout, max_frame_bytes)

    @classmethod
    async def _establish(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handshake: Handshake,
        name: str,
        timeout: float,
        max_frame_bytes: int,
    ) -> Connection:
        decoder = FrameDecoder(max_frame_bytes=HANDSHAKE_MAX_FRAME_BYTES)
        address = writer.get_extra_info("peername")
        counts = [0, 0]  # sent, received
        try:
            async with asyncio.timeout(timeout):
                for msg in handshake.initiate():
                    counts[0] += _write_small(writer, encode(msg))
                await writer.drain()
                while not handshake.complete:
                    msg, n = await _read_message(reader, decoder)
                    counts[1] += n
                    for reply in handshake.receive(msg):
                        counts[0] += _write_small(writer, encode(reply))
                    await writer.drain()
        except TimeoutError as exc:  # the peer opened a connection and never finished speaking
            log.warning("handshake with %s timed out after %.1f s; closing", address, timeout)
            writer.transport.abort()
            raise HandshakeTimeout(f"handshake with {address} timed out after {timeout} s") from exc
        except RemoteProtocolError as exc:  # bad bytes or failed proof: refuse, say why, close
            log.warning("handshake with %s rejected: %s; closing", address, exc)
            _refuse(writer, "handshake failed")
            raise
        except ConnectionClosed as exc:  # the peer hung up mid-handshake
            log.warning("handshake with %s failed: %s", address, exc)
            writer.transport.abort()
            raise
        except (ConnectionError, OSError) as exc:  # reset while we wrote: the peer is gone
            log.warning("handshake with %s failed: %s", address, exc)
            writer.transport.abort()
            raise ConnectionClosed(f"connection to {address} lost during the handshake: {exc}") from exc
        except asyncio.CancelledError:  # our caller gave up: leave no half-open socket behind
            writer.transport.abort()
            raise
        result = handshake.result
        decoder.set_mac(result.recv_mac)
        decoder.max_frame_bytes = max_frame_bytes
        log.debug(
            "%s %s peer %r at %s (%s)",
            name,
            "accepted" if handshake.role is Role.SERVER else "connected to",
            result.peer_name,
            address,
            "authenticated" if result.authenticated else "INSECURE",
        )
        return cls(
            reader,
            writer,
            name=name,
            result=result,
            decoder=decoder,
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
            writer = self._writer
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
                    await writer.drain()
                if small:
                    self._write(bytes(small))
                await writer.drain()
            except (ConnectionError, OSError) as exc:  # reset/broken pipe: the peer is gone
                self._abort()
                raise ConnectionClosed(f"connection to {self.peer_name!r} lost: {exc}") from exc
            except asyncio.CancelledError:  # cancelled mid-frame: the stream is now corrupt
                self._abort()
                raise

    def _write(self, data: bytes | memoryview) -> None:
        self._writer.write(data)
        self.bytes_sent += memoryview(data).nbytes

    async def recv(self) -> Message:
        """The next message. Raises ConnectionClosed when the peer hung up between frames,
        RemoteProtocolError (after aborting the connection, reason logged) on a malformed,
        truncated or unauthenticated frame."""
        if self._closed:
            raise ConnectionClosed(f"connection to {self.peer_name!r} is closed")
        async with self._recv_lock:
            try:
                msg, _ = await _read_message(self._reader, self._decoder, self)
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
            except asyncio.CancelledError:  # cancelled mid-frame would desync the decoder
                if self._decoder.in_frame:
                    self._abort()
                raise
            return msg

    async def close(self) -> None:
        """Close the connection (flushing what was sent). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):  # the peer reset first: it is closed either way
            pass

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data."""
        self._abort()

    def _abort(self) -> None:
        self._closed = True
        self._writer.transport.abort()

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


async def _read_message(
    reader: asyncio.StreamReader, decoder: FrameDecoder, conn: Connection | None = None
) -> tuple[Message, int]:
    """Feed the decoder until it yields a message; returns it with the bytes read."""
    received = 0
    while True:
        msg = decoder.next_message()
        if msg is not None:
            return msg, received
        want = min(max(decoder.bytes_wanted, 1), READ_CHUNK)
        try:
            data = await reader.read(want)
        except (ConnectionError, OSError) as exc:  # reset or TLS failure: the peer is gone
            raise ConnectionClosed(f"connection lost: {exc}") from exc
        if not data:
            if decoder.in_frame:
                raise RemoteProtocolError(
                    f"connection closed in the middle of a frame ({decoder.bytes_wanted} bytes missing)"
                )
            raise ConnectionClosed("peer closed the connection")
        received += len(data)
        if conn is not None:
            conn.bytes_received += len(data)
        decoder.feed(data)


def _write_small(writer: asyncio.StreamWriter, buffers: list[bytes | memoryview]) -> int:
    data = b"".join(buffers)
    writer.write(data)
    return len(data)


def _refuse(writer: asyncio.StreamWriter, reason: str) -> None:
    """Best effort: tell the peer why (without details an attacker could use), then close."""
    try:
        writer.write(b"".join(encode(Message(MsgType.ERROR, 0, {"reason": reason}))))
    except (ConnectionError, OSError, LocalProtocolError):  # peer already gone: nothing to tell
        pass
    writer.close()
