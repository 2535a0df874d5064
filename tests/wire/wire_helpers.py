"""Helpers shared by the wire tests: hand-built frames (including malformed ones) and an
in-memory pipe between sans-IO objects."""

from __future__ import annotations

import struct

from meshci.wire.frames import MAGIC, PREFIX, VERSION, FrameDecoder, FrameMac, encode
from meshci.wire.handshake import Handshake
from meshci.wire.messages import Message, MsgType


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
