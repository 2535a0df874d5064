"""Issue 5's hostile inputs against a real `meshci node` process: garbage bytes, a truncated
frame, a frame claiming a 4 GB length, a valid frame with a bad MAC, a wrong secret, a pickled
payload from an unauthenticated socket (one that would create a file if unpickled), and a
connection that opens and never speaks. Each is rejected with a reason in the node's log, no
file appears, and the node then serves a normal, exact request."""

from __future__ import annotations

import asyncio
import errno
import pickle
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from meshci.node.client import infer
from meshci.node.local import LocalMesh, NodeProcess
from meshci.wire import Connection, Message, MsgType
from meshci.wire.errors import WireError
from meshci.wire.frames import FLAG_BLOB, MAGIC, PREFIX, VERSION, FrameDecoder, encode
from meshci.wire.handshake import Handshake, Role

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WAIT = 30.0  # safety net only: no assertion depends on it
OTHER_SECRET = b"not the cluster secret, 32 bytes"


class CreatesFile:
    """Unpickling this creates a file: the proof that a payload was (not) unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.path, "w"))


def _frame(msg: Message, mac: object = None) -> bytes:
    return b"".join(bytes(b) for b in encode(msg, mac))  # type: ignore[arg-type]


def _raw_prefix(kind: int, *, flags: int = 0, meta: bytes = b"{}", tensor_bytes: int = 0,
                blob_len: int = 0) -> bytes:
    """A frame prefix built by hand, so its lengths can lie."""
    return PREFIX.pack(MAGIC, VERSION, flags, kind, 0, 0, len(meta), tensor_bytes, blob_len) + meta


async def _send_raw(node: NodeProcess, data: bytes, *, eof: bool = True) -> None:
    """Write `data` on a fresh socket, then wait until the node closes it."""
    reader, writer = await asyncio.open_connection(node.address.host, node.address.port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        await asyncio.wait_for(reader.read(), WAIT)
    except OSError as exc:
        # the node already aborted the connection (RST): also a close; anything else fails
        assert isinstance(exc, (ConnectionResetError, BrokenPipeError)) or exc.errno == errno.ENOTCONN, exc
    writer.close()


async def _bad_mac(node: NodeProcess, secret: bytes) -> None:
    """A genuine handshake by hand, then one frame whose MAC is wrong."""
    reader, writer = await asyncio.open_connection(node.address.host, node.address.port)
    handshake = Handshake(Role.CLIENT, "mallory", secret)
    decoder = FrameDecoder()
    for msg in handshake.initiate():
        writer.write(_frame(msg))
    while not handshake.complete:
        data = await asyncio.wait_for(reader.read(4096), WAIT)
        assert data, "the node closed during the handshake"
        decoder.feed(data)
        while (msg := decoder.next_message()) is not None:
            for reply in handshake.receive(msg):
                writer.write(_frame(reply))
    tile = _frame(Message(MsgType.TILE, 1, {}, (torch.ones(1000),)), handshake.result.send_mac)
    writer.write(tile[:-1] + bytes([tile[-1] ^ 1]))
    writer.write_eof()
    try:
        await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:
        pass  # aborted rather than closed: also a close
    writer.close()


async def _wrong_secret(node: NodeProcess) -> None:
    with pytest.raises(WireError):
        await Connection.open(node.address.host, node.address.port, secret=OTHER_SECRET, name="eve")


def _new_log(node: NodeProcess, since: int, phrase: str) -> str:
    """The node's log written after offset `since`, once `phrase` is in it (or WAIT passed)."""
    deadline = time.monotonic() + WAIT
    text = ""
    while time.monotonic() < deadline:
        text = node.log_text()[since:]
        if phrase in text:
            break
        time.sleep(0.05)
    return text


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[NodeProcess, bytes]]:
    mesh = LocalMesh.create()
    try:
        yield mesh.add("hostile-target"), mesh.secret()
    finally:
        mesh.close()


def _attacks(node: NodeProcess, secret: bytes, target: Path) -> dict[str, object]:
    payload = pickle.dumps(CreatesFile(target))
    hello = _frame(Handshake(Role.CLIENT, "cut", secret).initiate()[0])
    return {
        "garbage bytes": _send_raw(node, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256))),
        "truncated frame": _send_raw(node, hello[: len(hello) // 2]),
        "4 GB length": _send_raw(node, _raw_prefix(MsgType.HELLO, tensor_bytes=4 << 30)),
        "bad MAC": _bad_mac(node, secret),
        "wrong secret": _wrong_secret(node),
        "pickle stream": _send_raw(node, payload),
        "pickle as model code": _send_raw(node, _raw_prefix(MsgType.MODEL_CODE, flags=FLAG_BLOB,
                                                            blob_len=len(payload)) + payload),
        "silent connection": _send_raw(node, b"", eof=False),
    }


# attack -> the reason the node's log must give (wire's wording, one distinctive phrase)
ATTACKS = {
    "garbage bytes": "bad magic",
    "truncated frame": "middle of a frame",
    "4 GB length": "exceeds the limit",
    "bad MAC": "bad MAC",
    "wrong secret": "handshake",
    "pickle stream": "bad magic",
    "pickle as model code": "blob on an unauthenticated connection",
    "silent connection": "timed out",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_input_is_rejected_with_a_reason_and_the_node_serves_on(
        node: tuple[NodeProcess, bytes], attack: str, tmp_path: Path) -> None:
    process, secret = node
    target = tmp_path / "pwned"
    since = len(process.log_text())
    attacks = _attacks(process, secret, target)
    chosen = attacks.pop(attack)
    for unused in attacks.values():
        unused.close()  # type: ignore[attr-defined]  # coroutines not run in this case
    asyncio.run(chosen)  # type: ignore[arg-type]
    logged = _new_log(process, since, ATTACKS[attack])
    reason = [line for line in logged.splitlines() if ATTACKS[attack] in line]
    assert reason and re.search(r"WARNING|ERROR|INFO", reason[0]), f"no reason logged for {attack}: {logged!r}"
    assert process.process.poll() is None, "the node died"
    assert not target.exists(), "a payload was unpickled"
    meta, _ = asyncio.run(infer(process.address, model="resnet18", size=(32, 32), secret=secret,
                                check=True, timeout=WAIT))
    assert meta["check_ok"]
    assert not target.exists()
