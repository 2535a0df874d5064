"""The receive path over real loopback sockets: tensor payloads land in the received tensor
without a copy (asyncio and uvloop), reading stops while the application does not consume,
and a listener refuses connections beyond its cap on pending handshakes."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import pytest
import torch
from wire_helpers import check_received_in_place, close_pair, mixed_payload, run_on_uvloop

from meshci.wire import (
    Connection,
    ConnectionClosed,
    HandshakeLimiter,
    HandshakeRefused,
    Message,
    MsgType,
    WireError,
    same_message,
)
from meshci.wire.connection import RECV_QUEUE_BYTES, RECV_QUEUE_MESSAGES
from meshci.wire.errors import LocalProtocolError

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
SECRET = b"receive test secret, 32 bytes..."
WAIT = 10.0  # safety net only: no assertion depends on it


async def _wait_for(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.005)


async def _pair(secret: bytes | None = SECRET) -> tuple[Connection, Connection, asyncio.Server]:
    """A connected (client, server-side) pair of connections and the listener."""
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(await Connection.accept(r, w, secret=secret, insecure=secret is None, name="server"))

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    client = await Connection.open(HOST, port, secret=secret, insecure=secret is None, name="client")
    return client, await asyncio.wait_for(accepted.get(), WAIT), server


@pytest.mark.parametrize("secret", [SECRET, None], ids=["authenticated", "insecure"])
async def test_payload_is_received_in_place_both_ways(secret: bytes | None) -> None:
    await _in_place_both_ways(secret)


async def _in_place_both_ways(secret: bytes | None = SECRET) -> None:
    client, server_conn, server = await _pair(secret=secret)
    try:
        await check_received_in_place(client, server_conn)  # accept() path: protocol taken over
        await check_received_in_place(server_conn, client)  # open() path
    finally:
        await close_pair(client, server_conn, server)


def test_payload_is_received_in_place_on_uvloop() -> None:
    run_on_uvloop(_in_place_both_ways)


async def test_frames_sent_right_after_the_handshake_use_the_session_keys() -> None:
    # The client's first frames follow its PROOF at once; the server must not parse them
    # before its handshake has installed the frame MAC.
    client, server_conn, server = await _pair()
    try:
        msgs = [Message(MsgType.PING, i, {"i": i}) for i in range(20)]
        for m in msgs:
            await client.send(m)
        for m in msgs:
            assert same_message(await asyncio.wait_for(server_conn.recv(), WAIT), m)
    finally:
        await close_pair(client, server_conn, server)


async def test_receiver_stops_reading_while_messages_are_not_consumed() -> None:
    client, server_conn, server = await _pair()
    chunk = torch.randn(64 << 10)  # 256 KiB per message, 32 MiB in all: more than socket buffers hold
    count = 128

    async def flood() -> None:
        for i in range(count):
            await client.send(Message(MsgType.TILE, i, {}, (chunk,)))

    task = asyncio.create_task(flood())
    try:
        proto = server_conn._proto
        await _wait_for(lambda: proto._held)
        for _ in range(20):
            await asyncio.sleep(0.005)
            assert len(proto._messages) <= RECV_QUEUE_MESSAGES
            assert proto._queued_bytes <= RECV_QUEUE_BYTES + chunk.numel() * 4 + 1024
        assert not task.done()  # the sender waits on drain: the slow reader holds it back
        for i in range(count):
            got = await asyncio.wait_for(server_conn.recv(), WAIT)
            assert got.request_id == i and torch.equal(got.tensors[0], chunk)
        await asyncio.wait_for(task, WAIT)
    finally:
        task.cancel()
        await close_pair(client, server_conn, server)


async def test_cancelled_recv_loses_no_message() -> None:
    client, server_conn, server = await _pair()
    try:
        waiting = asyncio.create_task(server_conn.recv())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        msg = Message(MsgType.TILE, 1, {}, mixed_payload())
        await client.send(msg)
        assert same_message(await asyncio.wait_for(server_conn.recv(), WAIT), msg)
    finally:
        await close_pair(client, server_conn, server)


# -- cap on pending handshakes ----------------------------------------------------------------
def test_handshake_limiter_counts_slots() -> None:
    limiter = HandshakeLimiter(max_pending=2)
    assert limiter.try_acquire() and limiter.try_acquire()
    assert not limiter.try_acquire() and limiter.refused == 1
    limiter.release()
    assert limiter.pending == 1 and limiter.try_acquire()
    limiter.release()
    limiter.release()
    with pytest.raises(LocalProtocolError):
        limiter.release()
    with pytest.raises(ValueError):
        HandshakeLimiter(max_pending=0)


def test_handshake_limiter_caps_each_source() -> None:
    limiter = HandshakeLimiter(max_pending=4, per_source=2)
    assert limiter.try_acquire("10.0.0.1") and limiter.try_acquire("10.0.0.1")
    assert not limiter.try_acquire("10.0.0.1")  # that address holds its share
    assert limiter.try_acquire("10.0.0.2") and limiter.try_acquire("10.0.0.3")
    assert not limiter.try_acquire("10.0.0.4")  # the total cap still holds
    assert limiter.refused == 2 and limiter.pending_from("10.0.0.1") == 2
    limiter.release("10.0.0.1")
    assert limiter.try_acquire("10.0.0.1")
    for source in ("10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"):
        limiter.release(source)
    assert limiter.pending == 0
    with pytest.raises(LocalProtocolError):
        limiter.release("10.0.0.1")


async def test_listener_refuses_connections_beyond_its_handshake_cap(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshci.wire")
    limiter = HandshakeLimiter(max_pending=2)
    outcomes: asyncio.Queue[BaseException | Connection] = asyncio.Queue()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await outcomes.put(
                await Connection.accept(r, w, secret=SECRET, name="server", timeout=WAIT, limiter=limiter)
            )
        except WireError as exc:  # refused or failed: report it to the test
            await outcomes.put(exc)

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    silent: list[asyncio.StreamWriter] = []
    try:
        for _ in range(2):  # two peers that connect and never speak hold both slots
            silent.append((await asyncio.open_connection(HOST, port))[1])
        await _wait_for(lambda: limiter.pending == 2)
        reader, writer = await asyncio.open_connection(HOST, port)
        refused = await asyncio.wait_for(outcomes.get(), WAIT)
        assert isinstance(refused, HandshakeRefused)
        try:  # closed at once, long before the handshake timeout
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
        except ConnectionResetError:  # aborted (RST) rather than closed: also a refusal
            pass
        writer.close()
        assert "handshakes already in progress" in caplog.text
        for w in silent:
            w.close()
        for _ in silent:
            assert isinstance(await asyncio.wait_for(outcomes.get(), WAIT), ConnectionClosed)
        assert limiter.pending == 0
        conn = await Connection.open(HOST, port, secret=SECRET, name="client")  # served again
        accepted = await asyncio.wait_for(outcomes.get(), WAIT)
        assert isinstance(accepted, Connection) and accepted.peer_name == "client"
        assert limiter.pending == 0
        await conn.close()
        await accepted.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_frame_that_trickles_in_is_timed_as_it_arrives() -> None:
    """The receiver times a frame from its first read to its last byte: a frame whose
    bytes come in over ~0.2 s is measured at that pace, however fast `send()` returned
    on the other side (that is when the bytes left, not when they landed)."""
    from wire_helpers import frame_bytes

    client, server_conn, server = await _pair(secret=None)
    try:
        msg = Message(MsgType.TILE, 5, {"rows": [0, 1]}, (torch.arange(1 << 18, dtype=torch.float32),))
        data = frame_bytes(msg)
        step = len(data) // 10
        for i in range(0, len(data), step):
            client._transport.write(data[i:i + step])  # as a slow link would deliver it
            await asyncio.sleep(0.02)
        got = await asyncio.wait_for(server_conn.recv(), WAIT)
        assert same_message(got, msg)
        arrival = server_conn.last_arrival
        assert arrival is not None and arrival.nbytes == len(data)
        streamed, seconds = arrival.rate_sample(min_bytes=1)
        assert streamed >= len(data) - 2 * step
        assert seconds >= 0.1  # at least 8 of the 10 pauses lie between first and last read
        # a frame that arrives at once gives no rate (nothing streamed after its first read)
        small = Message(MsgType.TILE, 6, {}, (torch.zeros(16),))
        client._transport.write(frame_bytes(small))
        await asyncio.wait_for(server_conn.recv(), WAIT)
        assert server_conn.last_arrival.rate_sample(min_bytes=1) is None
    finally:
        await close_pair(client, server_conn, server)


async def test_a_frame_read_late_is_timed_by_when_its_tail_reached_the_kernel() -> None:
    """A receiver paused by its CPU quota reads a frame's tail late; the frame's end is when
    its last bytes reached the kernel (TCP_INFO), not the late read, so a paused receiver
    does not read its link as slower than it is."""
    import time

    from wire_helpers import frame_bytes

    from meshci.wire.protocol import _kernel_idle_s

    client, server_conn, server = await _pair(secret=None)
    try:
        if _kernel_idle_s(server_conn._proto._sock) is None:
            pytest.skip("no TCP_INFO on this platform")
        msg = Message(MsgType.TILE, 7, {}, (torch.arange(1 << 18, dtype=torch.float32),))
        data = frame_bytes(msg)
        step = len(data) // 10
        chunks = [data[i:i + step] for i in range(0, len(data), step)]
        for chunk in chunks[:-1]:
            client._transport.write(chunk)
            await asyncio.sleep(0.02)
        client._transport.write(chunks[-1])  # the tail lands now...
        time.sleep(0.3)  # ...while the receiver's process is paused
        got = await asyncio.wait_for(server_conn.recv(), WAIT)
        assert same_message(got, msg)
        _, seconds = server_conn.last_arrival.rate_sample(min_bytes=1)
        assert 0.1 <= seconds < 0.3, seconds  # the ~0.18 s it streamed, not the 0.48 s until read
    finally:
        await close_pair(client, server_conn, server)


async def test_bytes_of_an_unfinished_frame_and_bytes_nobody_reads_prove_the_peer_alive() -> None:
    """`heard_at()` moves with every byte that arrives, not with whole frames: half a frame
    counts, and so do bytes the kernel took while the receiver did not read (its queue full,
    or its loop busy)."""
    import time

    from wire_helpers import frame_bytes

    from meshci.wire.protocol import _kernel_idle_s

    client, server_conn, server = await _pair(secret=None)
    try:
        data = frame_bytes(Message(MsgType.TILE, 8, {}, (torch.arange(1 << 18, dtype=torch.float32),)))
        before = server_conn.heard_at()
        await asyncio.sleep(0.05)
        client._transport.write(data[: len(data) // 2])  # half a frame: no message yet
        await _wait_for(lambda: server_conn._proto._partial >= len(data) // 2)  # all of it read
        assert server_conn.heard_at() > before
        assert server_conn._proto._messages == deque()
        half = server_conn.heard_at()
        server_conn._proto.transport.pause_reading()  # the receiver reads nothing more
        await asyncio.sleep(0.05)
        client._transport.write(data[len(data) // 2:])
        time.sleep(0.05)  # the bytes reach the kernel, not the application
        if _kernel_idle_s(server_conn._proto._sock) is not None:  # where TCP_INFO tells
            assert server_conn.heard_at() > half  # the kernel says they came
        server_conn._proto.transport.resume_reading()
        got = await asyncio.wait_for(server_conn.recv(), WAIT)
        assert got.request_id == 8 and server_conn.heard_at() > half
    finally:
        await close_pair(client, server_conn, server)
