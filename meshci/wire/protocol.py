"""The receive side of a connection: an `asyncio.BufferedProtocol` over the sans-IO
`FrameDecoder` (`Connection` in `connection.py` is the rest).

`_WireProtocol.get_buffer()` hands the transport the decoder's current payload buffer, so a
tensor's bytes go from the socket (or from the TLS layer) straight into the tensor that
`recv()` returns: no intermediate `bytes`, no copy. Only the fixed prefix, the header and
frames of at most `SCRATCH_BYTES` pass through a small scratch buffer; reads never reach past
the current frame. Each frame's arrival is timed where its bytes land (`FrameArrival`).
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

from meshci.wire.errors import ConnectionClosed, RemoteProtocolError
from meshci.wire.frames import FrameDecoder
from meshci.wire.messages import Message

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
        self.last_read = time.monotonic()  # when bytes were last read (of any frame, or none yet)
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
        self.last_read = time.monotonic()
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
        self.last_read = time.monotonic()
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

    def heard_at(self) -> float:
        """When bytes last arrived on this connection (`time.monotonic()`): read by us, or
        received by the kernel while reading is paused (a full receive queue) or the event
        loop is busy. Any byte counts, not only a whole frame: the peer is alive."""
        idle = _kernel_idle_s(self._sock) if not self._lost else None
        if idle is None:
            return self.last_read
        return max(self.last_read, time.monotonic() - idle)

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
