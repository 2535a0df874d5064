"""Helpers shared by the wire tests: hand-built frames (including malformed ones) and an
in-memory pipe between sans-IO objects."""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from meshci.wire.frames import MAC_BYTES, MAGIC, PREFIX, VERSION, FrameDecoder, FrameMac, encode
from meshci.wire.handshake import Handshake
from meshci.wire.messages import Message, MsgType, same_message


def raw_frame(
    kind: int = MsgType.PING,
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    flags: int = 0,
    request_id: int = 0,
    descs: bytes = b"",
    meta: bytes = b"{}",
    tensor_bytes: int | None = None,
    blob_len: int = 0,
    payload: bytes = b"",
    desc_len: int | None = None,
    meta_len: int | None = None,
) -> bytes:
    """A frame built byte by byte, so any field can be made wrong on purpose."""
    if tensor_bytes is None:
        tensor_bytes = len(payload) - blob_len
    prefix = PREFIX.pack(
        magic,
        version,
        flags,
        kind,
        request_id,
        len(descs) if desc_len is None else desc_len,
        len(meta) if meta_len is None else meta_len,
        tensor_bytes,
        blob_len,
    )
    return prefix + descs + meta + payload


def descriptor(code: int, *shape: int) -> bytes:
    return struct.pack("!BB", code, len(shape)) + struct.pack(f"!{len(shape)}Q", *shape)


def frame_bytes(msg: Message, mac: FrameMac | None = None) -> bytes:
    return b"".join(bytes(b) for b in encode(msg, mac))


def decode_all(data: bytes, decoder: FrameDecoder) -> list[Message]:
    decoder.feed(data)
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def run_handshake(client: Handshake, server: Handshake) -> None:
    """Drive both sides to completion through real encoded bytes (no sockets)."""
    to_server, to_client = FrameDecoder(), FrameDecoder()
    outgoing = [(server, m) for m in client.initiate()] + [(client, m) for m in server.initiate()]
    while outgoing:
        target, msg = outgoing.pop(0)
        decoder = to_server if target is server else to_client
        (received,) = decode_all(frame_bytes(msg), decoder)
        replies = target.receive(received)
        other = client if target is server else server
        outgoing += [(other, m) for m in replies]


def record_payload_buffers(conn: Any) -> list[int]:
    """Addresses of the payload buffers `conn`'s decoder hands to the transport from now on
    (what `get_buffer()` returns whenever the socket or TLS layer writes straight into a
    tensor)."""
    decoder = conn._proto.decoder
    original = decoder.get_buffer
    addresses: list[int] = []

    def recording() -> memoryview | None:
        view = original()
        if view is not None:
            addresses.append(ctypes.addressof(ctypes.c_char.from_buffer(view)))
        return view

    decoder.get_buffer = recording
    return addresses


def resident_bytes() -> int:
    """This process's resident set size (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mixed_payload() -> tuple[torch.Tensor, ...]:
    """One large tensor, a small one and an empty one, for a single frame."""
    return (torch.randn(1 << 20), torch.arange(10, dtype=torch.int64), torch.zeros(0))


async def check_received_in_place(sender: Any, receiver: Any) -> None:
    """Send a frame with a 4 MiB tensor from one `Connection` to the other: the received
    tensors must be the very buffers the transport wrote into, and only the frame's prefix
    and header may have passed through the scratch buffer (no payload byte was copied)."""
    addresses = record_payload_buffers(receiver)
    copied_before = receiver._proto.copied_bytes
    received_before = receiver.bytes_received
    msg = Message(MsgType.TILE, 9, {"rows": [0, 4]}, mixed_payload())
    await sender.send(msg)
    got = await asyncio.wait_for(receiver.recv(), 10.0)
    assert same_message(got, msg)
    for tensor in got.tensors[:2]:
        assert tensor.data_ptr() in addresses  # received in place: never copied after receipt
    frame = receiver.bytes_received - received_before
    tensor_bytes = sum(t.numel() * t.element_size() for t in msg.tensors)
    tag = MAC_BYTES if receiver.authenticated else 0
    assert receiver._proto.copied_bytes - copied_before == frame - tensor_bytes - tag
    assert frame - tensor_bytes - tag < 200  # that is: the prefix and the header


async def close_pair(client: Any, server_conn: Any, server: asyncio.Server) -> None:
    """Close both ends of a connection and the listener that accepted it."""
    await client.close()
    await server_conn.close()
    server.close()
    await server.wait_closed()


def run_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    """Run `scenario()` to completion on a fresh uvloop event loop (skip without uvloop)."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop not installed")
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
