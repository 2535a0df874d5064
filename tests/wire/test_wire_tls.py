"""Optional mutual TLS under the HMAC handshake, with a throwaway CA made by the openssl CLI."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import torch
from wire_helpers import check_received_in_place, close_pair, run_on_uvloop

from meshci.wire import (
    Connection,
    ConnectionClosed,
    Message,
    MsgType,
    RemoteProtocolError,
    TlsConfigError,
    WireError,
    client_tls_context,
    server_tls_context,
    valid_name,
)
from meshci.wire.tls import UNVERIFIED

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
SECRET = b"tls test secret, at least 16 b.."
OPENSSL = shutil.which("openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)  # type: ignore[list-item]


def _make_ca(folder: Path, ca: str, leaves: list[str]) -> None:
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1",
             "-subj", f"/CN={ca}", cwd=folder)
    for leaf in leaves:
        _openssl("req", *key, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", "-subj", f"/CN={leaf}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{leaf}.pem", "-days", "1", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if OPENSSL is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available")
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca", ["server", "client"])
    _make_ca(folder, "rogue-ca", ["rogue"])
    return folder


async def _serve(pki: Path, results: asyncio.Queue) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = await Connection.accept(reader, writer, secret=SECRET, name="server", timeout=2.0)
            msg = await conn.recv()
            await conn.send(Message(MsgType.PONG, msg.request_id, msg.meta, msg.tensors))
            await results.put(writer.get_extra_info("peercert"))
            await conn.close()
        except (WireError, OSError) as exc:  # a refused peer: report it to the test
            await results.put(exc)

    ctx = server_tls_context(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    return await asyncio.start_server(handle, HOST, 0, ssl=ctx, ssl_handshake_timeout=2.0)


async def test_mutual_tls_exchange(pki: Path) -> None:
    results: asyncio.Queue = asyncio.Queue()
    server = await _serve(pki, results)
    port = server.sockets[0].getsockname()[1]
    try:
        ctx = client_tls_context(pki / "client.pem", pki / "client.key", pki / "ca.pem")
        conn = await Connection.open(HOST, port, secret=SECRET, name="client", ssl=ctx)
        assert conn._transport.get_extra_info("ssl_object") is not None
        t = torch.randn(1000)
        await conn.send(Message(MsgType.PING, 4, {}, (t,)))
        reply = await conn.recv()
        assert torch.equal(reply.tensors[0], t)
        peercert = await asyncio.wait_for(results.get(), 10)
        assert ("commonName", "client") in [item for rdn in peercert["subject"] for item in rdn]
        await conn.close()
    finally:
        server.close()
        await server.wait_closed()


async def _tls_server(pki: Path) -> tuple[asyncio.Server, asyncio.Queue[Connection], int]:
    """A server named "server" that queues every connection it accepts."""
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(await Connection.accept(reader, writer, secret=SECRET, name="server"))

    ctx = server_tls_context(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    server = await asyncio.start_server(handle, HOST, 0, ssl=ctx, ssl_handshake_timeout=2.0)
    return server, accepted, server.sockets[0].getsockname()[1]


async def _tls_pair(pki: Path) -> tuple[Connection, Connection, asyncio.Server]:
    server, accepted, port = await _tls_server(pki)
    client_ctx = client_tls_context(pki / "client.pem", pki / "client.key", pki / "ca.pem")
    client = await Connection.open(HOST, port, secret=SECRET, name="client", ssl=client_ctx)
    return client, await asyncio.wait_for(accepted.get(), 10), server


async def _in_place_over_tls(pki: Path) -> None:
    client, server_conn, server = await _tls_pair(pki)
    try:
        assert server_conn._transport.get_extra_info("ssl_object") is not None
        await check_received_in_place(client, server_conn)  # decrypted straight into the tensor
        await check_received_in_place(server_conn, client)
    finally:
        await close_pair(client, server_conn, server)


async def test_payload_is_decrypted_in_place(pki: Path) -> None:
    await _in_place_over_tls(pki)


def test_payload_is_decrypted_in_place_on_uvloop(pki: Path) -> None:
    run_on_uvloop(lambda: _in_place_over_tls(pki))


@pytest.mark.parametrize("client_cert", [None, "rogue"])
async def test_client_without_a_cluster_certificate_is_refused(pki: Path, client_cert: str | None) -> None:
    results: asyncio.Queue = asyncio.Queue()
    server = await _serve(pki, results)
    port = server.sockets[0].getsockname()[1]
    try:
        if client_cert is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.load_verify_locations(pki / "ca.pem")
        else:
            ctx = client_tls_context(pki / f"{client_cert}.pem", pki / f"{client_cert}.key", pki / "ca.pem")
        with pytest.raises((ConnectionClosed, RemoteProtocolError)):
            await Connection.open(HOST, port, secret=SECRET, name="client", ssl=ctx, timeout=3.0)
    finally:
        server.close()
        await server.wait_closed()


async def test_client_refuses_a_server_from_another_ca(pki: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    rogue = server_tls_context(pki / "rogue.pem", pki / "rogue.key", pki / "ca.pem")
    server = await asyncio.start_server(handle, HOST, 0, ssl=rogue, ssl_handshake_timeout=2.0)
    port = server.sockets[0].getsockname()[1]
    try:
        ctx = client_tls_context(pki / "client.pem", pki / "client.key", pki / "ca.pem")
        with pytest.raises(ConnectionClosed, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await Connection.open(HOST, port, secret=SECRET, name="client", ssl=ctx, timeout=3.0)
    finally:
        server.close()
        await server.wait_closed()


def test_unreadable_tls_files_are_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="cannot load TLS files"):
        server_tls_context(tmp_path / "missing.pem", tmp_path / "missing.key", tmp_path / "ca.pem")


async def test_a_handshake_name_the_certificate_does_not_bear_speaks_for_nobody(pki: Path) -> None:
    """With mutual TLS, the holder of the secret and of some cluster certificate (here the
    client's) cannot speak as node "server2": the accepted connection is marked unverified,
    a name no node can have, so no node's facts are taken from it."""
    server, accepted, port = await _tls_server(pki)
    client_ctx = client_tls_context(pki / "client.pem", pki / "client.key", pki / "ca.pem")
    try:
        honest = await Connection.open(HOST, port, secret=SECRET, name="client", ssl=client_ctx)
        assert (await asyncio.wait_for(accepted.get(), 10)).peer_name == "client"
        forged = await Connection.open(HOST, port, secret=SECRET, name="server2", ssl=client_ctx)
        seen = await asyncio.wait_for(accepted.get(), 10)
        assert seen.peer_name == UNVERIFIED + "server2" and not valid_name(seen.peer_name)
        # and the other way: a server whose certificate does not bear the name it answers with
        assert forged.peer_name == "server"
        for conn in (honest, forged, seen):
            conn.abort()
    finally:
        server.close()
        await server.wait_closed()
