"""Connections over real loopback sockets: normal exchanges, back-pressure, and every kind of
hostile peer, each rejected with a logged reason while the server keeps serving."""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from wire_helpers import frame_bytes, raw_frame, run_on_uvloop

from meshci.wire import (
    AuthenticationError,
    Connection,
    ConnectionClosed,
    HandshakeTimeout,
    Message,
    MsgType,
    RemoteProtocolError,
    UntrustedPeerError,
    WireError,
    pickle_blob,
    same_message,
    unpickle_trusted,
)
from meshci.wire.connection import WRITE_CHUNK
from meshci.wire.frames import FLAG_BLOB, FLAG_MAC, PREFIX, Direction, FrameDecoder, FrameMac
from meshci.wire.handshake import Handshake, HandshakeResult, Role

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
SECRET = b"loopback test secret, 32 bytes.."
OTHER = b"not the cluster secret, 32 bytes"
HANDSHAKE_TIMEOUT = 0.5
WAIT = 10.0  # safety net only: no assertion depends on it


class EchoServer:
    """Accepts connections, answers each message with a PONG carrying the same payload, and
    reports how each connection ended."""

    def __init__(self, *, insecure: bool = False) -> None:
        self.insecure = insecure
        self.outcomes: asyncio.Queue[BaseException | str] = asyncio.Queue()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self.handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = await Connection.accept(
                reader,
                writer,
                secret=None if self.insecure else SECRET,
                insecure=self.insecure,
                name="server",
                timeout=HANDSHAKE_TIMEOUT,
            )
        except WireError as exc:  # rejected peer: accept() has logged why and closed
            await self.outcomes.put(exc)
            return
        try:
            while True:
                msg = await conn.recv()
                meta = dict(msg.meta)
                if msg.blob is not None:
                    meta["value"] = unpickle_trusted(conn, msg.blob)()
                await conn.send(Message(MsgType.PONG, msg.request_id, meta, msg.tensors))
        except WireError as exc:  # closed or malformed: recv() has logged and aborted
            await self.outcomes.put(exc)
        finally:
            await conn.close()

    async def outcome(self) -> BaseException | str:
        return await asyncio.wait_for(self.outcomes.get(), WAIT)


@pytest.fixture
async def server() -> AsyncIterator[EchoServer]:
    srv = EchoServer()
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture(autouse=True)
def _wire_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshci.wire")


async def normal_exchange(srv: EchoServer) -> None:
    """A genuine peer still gets served."""
    conn = await Connection.open(HOST, srv.port, secret=SECRET, name="client")
    try:
        assert conn.peer_name == "server" and conn.authenticated
        msg = Message(MsgType.PING, 77, {"hello": "mesh"}, (torch.arange(12.0).reshape(3, 4),))
        await conn.send(msg)
        reply = await conn.recv()
        assert reply.kind is MsgType.PONG
        assert same_message(Message(MsgType.PING, reply.request_id, reply.meta, reply.tensors), msg)
    finally:
        await conn.close()
    assert isinstance(await srv.outcome(), ConnectionClosed)


async def send_raw_and_wait_for_close(srv: EchoServer, data: bytes, *, eof: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, srv.port)
    writer.write(data)
    if eof:
        writer.write_eof()
    received = await read_until_closed(reader)
    writer.close()
    return received


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:  # the server aborted (RST) rather than closed: also a close
        return b""


async def raw_authenticated(port: int, secret: bytes = SECRET) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, HandshakeResult]:
    """A hand-driven client: the sans-IO handshake over a plain socket, so the test can
    then write arbitrary bytes as an authenticated peer."""
    reader, writer = await asyncio.open_connection(HOST, port)
    handshake = Handshake(Role.CLIENT, "raw-client", secret)
    decoder = FrameDecoder()
    for msg in handshake.initiate():
        writer.write(frame_bytes(msg))
    while not handshake.complete:
        data = await asyncio.wait_for(reader.read(4096), WAIT)
        assert data, "server closed during the handshake"
        decoder.feed(data)
        while (msg := decoder.next_message()) is not None:
            for reply in handshake.receive(msg):
                writer.write(frame_bytes(reply))
    await writer.drain()
    return reader, writer, handshake.result


# -- normal operation ----------------------------------------------------------------------
async def test_exchange_and_byte_counters(server: EchoServer) -> None:
    conn = await Connection.open(HOST, server.port, secret=SECRET, name="client")
    big = torch.randn(4 << 20)  # 16 MB
    sent_before = conn.bytes_sent
    await conn.send(Message(MsgType.TILE, 1, {"rows": [0, 8]}, (big,)))
    reply = await conn.recv()
    assert torch.equal(reply.tensors[0], big)
    assert conn.bytes_sent - sent_before >= big.numel() * 4
    assert conn.bytes_received >= big.numel() * 4
    await conn.close()
    await conn.close()  # idempotent
    with pytest.raises(ConnectionClosed):
        await conn.send(Message(MsgType.PING))
    assert isinstance(await server.outcome(), ConnectionClosed)


async def test_concurrent_senders_keep_frames_whole_and_in_mac_order(server: EchoServer) -> None:
    conn = await Connection.open(HOST, server.port, secret=SECRET, name="client")
    msgs = [Message(MsgType.TILE, i, {"i": i}, (torch.full((i * 40_000,), float(i)),)) for i in range(8)]
    await asyncio.gather(*(conn.send(m) for m in msgs))
    replies = {r.request_id: r for r in [await conn.recv() for _ in msgs]}
    for m in msgs:
        assert torch.equal(replies[m.request_id].tensors[0], m.tensors[0])
    await conn.close()


async def test_blob_is_unpickled_only_after_authentication(server: EchoServer) -> None:
    conn = await Connection.open(HOST, server.port, secret=SECRET, name="client")
    await conn.send(Message(MsgType.MODEL_CODE, 3, {}, (), pickle_blob(lambda: 6 * 7)))
    reply = await conn.recv()
    assert reply.meta["value"] == 42
    await conn.close()


async def test_send_applies_back_pressure() -> None:
    # A peer that does not read: send() must wait, holding about one chunk in user space,
    # instead of buffering the whole 64 MB frame.
    # A listener that accepts and never reads.
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(await Connection.accept(r, w, secret=SECRET, name="silent"))

    lazy = await asyncio.start_server(silent, HOST, 0)
    port = lazy.sockets[0].getsockname()[1]
    conn = await Connection.open(HOST, port, secret=SECRET, name="client")
    peer = await accepted.get()
    task = asyncio.create_task(conn.send(Message(MsgType.TILE, 0, {}, (torch.zeros(16 << 20),))))
    for _ in range(50):
        await asyncio.sleep(0.01)
        assert not task.done()
        assert conn._transport.get_write_buffer_size() <= WRITE_CHUNK + (64 << 10)
    received = await peer.recv()  # now the peer reads, and the send completes
    await task
    assert received.tensors[0].numel() == 16 << 20
    await conn.close()
    await peer.close()
    lazy.close()
    await lazy.wait_closed()


# -- hostile peers ---------------------------------------------------------------------------
def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


_TILE = Message(MsgType.TILE, 0, {}, (torch.ones(1000),))
_HELLO = frame_bytes(Handshake(Role.CLIENT, "cut", SECRET).initiate()[0])
_FOREIGN_MAC = b"attacker-chosen key, 32 bytes..."

# name: (bytes sent before any handshake, expected error, logged reason)
UNAUTHENTICATED_ATTACKS = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)), RemoteProtocolError, "bad magic"),
    "truncated frame": (_HELLO[: len(_HELLO) // 2], RemoteProtocolError, "middle of a frame"),
    "4 GB header": (raw_frame(MsgType.HELLO, tensor_bytes=4 << 30)[: PREFIX.size], RemoteProtocolError, "exceeds the limit"),
}

# name: (bytes sent after a genuine handshake, given its keys; expected error; logged reason)
AUTHENTICATED_ATTACKS = {
    "truncated frame": (lambda r: frame_bytes(_TILE, r.send_mac)[:-100], RemoteProtocolError, "middle of a frame"),
    "4 GB header": (
        lambda r: raw_frame(MsgType.TILE, flags=FLAG_MAC, tensor_bytes=4 << 30)[: PREFIX.size],
        RemoteProtocolError,
        "exceeds the limit of 268435456",
    ),
    "bad MAC": (lambda r: _flip_last_byte(frame_bytes(_TILE, r.send_mac)), AuthenticationError, "bad MAC"),
    "foreign key": (
        lambda r: frame_bytes(_TILE, FrameMac(_FOREIGN_MAC, Direction.CLIENT_TO_SERVER)),
        AuthenticationError,
        "bad MAC",
    ),
    "unauthenticated frame": (lambda r: frame_bytes(_TILE), AuthenticationError, "unauthenticated frame"),
}


@pytest.mark.parametrize("attack", list(UNAUTHENTICATED_ATTACKS))
async def test_attack_before_authentication(server: EchoServer, caplog: pytest.LogCaptureFixture, attack: str) -> None:
    data, error, reason = UNAUTHENTICATED_ATTACKS[attack]
    await send_raw_and_wait_for_close(server, data, eof=True)
    assert isinstance(await server.outcome(), error)
    assert reason in caplog.text
    await normal_exchange(server)


@pytest.mark.parametrize("attack", list(AUTHENTICATED_ATTACKS))
async def test_attack_after_authentication(server: EchoServer, caplog: pytest.LogCaptureFixture, attack: str) -> None:
    make, error, reason = AUTHENTICATED_ATTACKS[attack]
    reader, writer, result = await raw_authenticated(server.port)
    writer.write(make(result))
    writer.write_eof()
    await read_until_closed(reader)
    writer.close()
    assert isinstance(await server.outcome(), error)
    assert reason in caplog.text
    await normal_exchange(server)


async def test_wrong_secret_honest_client(server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(AuthenticationError, match="failed to prove"):
        await Connection.open(HOST, server.port, secret=OTHER, name="client")
    outcome = await server.outcome()
    assert isinstance(outcome, AuthenticationError)
    assert "refused the handshake" in caplog.text
    await normal_exchange(server)


async def test_wrong_secret_forged_proof(server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    (hello,) = Handshake(Role.CLIENT, "mallory", OTHER).initiate()
    writer.write(frame_bytes(hello))
    writer.write(frame_bytes(Message(MsgType.PROOF, 0, {"proof": "00" * 32})))
    received = await read_until_closed(reader)
    writer.close()
    assert isinstance(await server.outcome(), AuthenticationError)
    assert "'mallory' failed to prove the cluster secret" in caplog.text
    # The server told the peer it refused (without details), after its CHALLENGE.
    decoder = FrameDecoder()
    decoder.feed(received)
    kinds = []
    while (msg := decoder.next_message()) is not None:
        kinds.append(msg.kind)
    assert kinds == [MsgType.CHALLENGE, MsgType.ERROR]
    await normal_exchange(server)


class CreatesFile:
    """Unpickling this creates a file: the proof that a payload was (not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.path, "w"))


async def test_pickle_from_unauthenticated_socket_is_never_unpickled(
    server: EchoServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    target = tmp_path / "pwned"
    payload = pickle.dumps(CreatesFile(target))
    # 1) a bare pickle stream
    await send_raw_and_wait_for_close(server, payload)
    assert isinstance(await server.outcome(), RemoteProtocolError)
    # 2) the pickle framed as model code, before any handshake
    frame = raw_frame(MsgType.MODEL_CODE, flags=FLAG_BLOB, blob_len=len(payload), payload=payload)
    await send_raw_and_wait_for_close(server, frame)
    assert isinstance(await server.outcome(), RemoteProtocolError)
    assert "blob on an unauthenticated connection" in caplog.text
    # 3) the pickle framed after a HELLO, with a forged MAC flag
    hello = frame_bytes(Handshake(Role.CLIENT, "mallory", OTHER).initiate()[0])
    forged = raw_frame(MsgType.MODEL_CODE, flags=FLAG_BLOB | FLAG_MAC, blob_len=len(payload), payload=payload + bytes(32))
    await send_raw_and_wait_for_close(server, hello + forged)
    assert isinstance(await server.outcome(), RemoteProtocolError)
    assert not target.exists()
    await normal_exchange(server)
    assert not target.exists()


async def test_insecure_connections_never_unpickle(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    payload = pickle.dumps(CreatesFile(target))
    srv = EchoServer(insecure=True)
    await srv.start()
    try:
        conn = await Connection.open(HOST, srv.port, secret=None, insecure=True, name="client")
        assert not conn.authenticated and conn.peer_name == "server"
        assert "insecure connection" in caplog.text
        with pytest.raises(UntrustedPeerError):
            unpickle_trusted(conn, payload)
        with pytest.raises(WireError, match="authenticated"):
            await conn.send(Message(MsgType.MODEL_CODE, 0, {}, (), payload))
        # A hand-built blob frame on the insecure connection is refused by the server.
        frame = raw_frame(MsgType.MODEL_CODE, flags=FLAG_BLOB, blob_len=len(payload), payload=payload)
        conn._transport.write(frame)
        with pytest.raises((ConnectionClosed, RemoteProtocolError)):
            await conn.recv()
        assert isinstance(await srv.outcome(), RemoteProtocolError)
        assert not target.exists()
        # An authenticated client cannot talk to an insecure node (and vice versa).
        with pytest.raises(AuthenticationError):
            await Connection.open(HOST, srv.port, secret=SECRET, name="client")
    finally:
        await srv.stop()
    assert not target.exists()


async def test_peer_that_never_speaks_times_out(server: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = await asyncio.open_connection(HOST, server.port)
    assert await read_until_closed(reader) == b""
    writer.close()
    assert isinstance(await server.outcome(), HandshakeTimeout)
    assert "timed out" in caplog.text
    await normal_exchange(server)


async def test_open_reports_unreachable_peer() -> None:
    listener = await asyncio.start_server(lambda r, w: None, HOST, 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    with pytest.raises(ConnectionClosed, match="refused"):
        await Connection.open(HOST, port, secret=SECRET, name="client")


async def test_client_handshake_times_out_on_a_silent_server() -> None:
    async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()  # reads and never answers

    listener = await asyncio.start_server(mute, HOST, 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        with pytest.raises(HandshakeTimeout):
            await Connection.open(HOST, port, secret=SECRET, name="client", timeout=0.3)
    finally:
        listener.close()
        await listener.wait_closed()



def test_works_on_uvloop() -> None:
    async def scenario() -> None:
        srv = EchoServer()
        await srv.start()
        try:
            conn = await Connection.open(HOST, srv.port, secret=SECRET, name="client")
            big = torch.randn(2 << 20)
            await conn.send(Message(MsgType.TILE, 1, {}, (big,)))
            assert torch.equal((await conn.recv()).tensors[0], big)
            await conn.close()
            assert isinstance(await srv.outcome(), ConnectionClosed)
            await send_raw_and_wait_for_close(srv, b"garbage bytes, not a frame", eof=True)
            assert isinstance(await srv.outcome(), RemoteProtocolError)
            await normal_exchange(srv)
        finally:
            await srv.stop()

    run_on_uvloop(scenario)


async def test_dialling_a_host_no_resolver_takes_is_a_wire_error() -> None:
    with pytest.raises(ConnectionClosed, match="bad address"):
        await Connection.open("a." + "b" * 70, 7000, secret=b"s" * 32, name="client", timeout=2.0)
