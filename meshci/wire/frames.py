"""Sans-IO frame codec: `encode` turns a `Message` into buffers, `FrameDecoder` (in
`decoder.py`) turns bytes back into `Message`s. No sockets, no awaits, no clock.

One frame on the wire (all integers big-endian):

    prefix   40 bytes  magic "MSHC", version, flags, kind, request_id, descriptor length,
                       meta length, tensor payload bytes, blob bytes
    descs    per tensor: dtype code (u8), ndim (u8), ndim x dim (u64)
    meta     UTF-8 JSON object (small control data)
    tensors  raw contiguous buffers, one after the other (native little-endian element order)
    blob     cloudpickle bytes (only kinds in BLOB_KINDS, only when the frame carries a MAC)
    mac      32 bytes HMAC-SHA256 over (direction, sequence number, prefix, descs, meta,
             tensors, blob) when the connection is authenticated

Every length is known from the fixed prefix, so the size limits are enforced before anything
is allocated, and each tensor is read into its own buffer which becomes the received tensor
without a copy.

Memory a peer can make a connection hold: a tensor's buffer is allocated only when the
payload reaches that tensor (not when the header announces it), and buffers of
`LAZY_COMMIT_BYTES` (32 MiB) or more are private anonymous memory maps whose pages the OS
commits only as received bytes are written into them. Smaller buffers come from the
allocator, which reuses memory the process already holds or (glibc) extends its heap
without touching the new pages. So a frame in progress adds to resident memory at most the
bytes actually received plus less than `LAZY_COMMIT_BYTES`, whatever size its header
announces (up to `max_frame_bytes`), and typically just the bytes received.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import sys
from enum import IntEnum
from collections.abc import Iterator
from typing import Any

import numpy as np

from meshci.wire.errors import LocalProtocolError
from meshci.wire.messages import BLOB_KINDS, Message, MsgType

MAGIC = b"MSHC"
VERSION = 1
FLAG_MAC = 0x01
FLAG_BLOB = 0x02
_KNOWN_FLAGS = FLAG_MAC | FLAG_BLOB

# magic, version, flags, kind, request_id, desc_len, meta_len, tensor_bytes, blob_len
PREFIX = struct.Struct("!4sBBHQIIQQ")
MAC_BYTES = 32
DEFAULT_MAX_FRAME_BYTES = 256 << 20
DEFAULT_MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 1024
MAX_NDIM = 8
MAX_DIM = 1 << 40
_DESC_HEAD = struct.Struct("!BB")
# Tensor buffers this large are anonymous maps: pages are committed as bytes arrive. (glibc
# maps allocations this large itself; smaller ones reuse freed heap memory, which saves the
# page faults a fresh map costs on every frame.)
LAZY_COMMIT_BYTES = 32 << 20

# Stable codes: part of the wire format, never renumber. By name, so that the codec needs no
# torch: a process that has imported torch gets torch tensors, one that has not (the
# command-line client, which then starts in a fraction of a second) gets numpy arrays.
DTYPE_CODES: dict[str, int] = {
    "float32": 1,
    "float16": 2,
    "bfloat16": 3,
    "float64": 4,
    "uint8": 5,
    "int8": 6,
    "int16": 7,
    "int32": 8,
    "int64": 9,
    "bool": 10,
}
_CODE_DTYPES: dict[int, str] = {code: name for name, code in DTYPE_CODES.items()}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "uint8": 1, "int8": 1,
             "int16": 2, "int32": 4, "int64": 8, "bool": 1}


def _torch() -> Any:
    """torch when this process has imported it, else None (then tensors are numpy arrays)."""
    return sys.modules.get("torch")


class Direction(IntEnum):
    """Which way a frame travels; part of the MAC input so a frame cannot be reflected."""

    CLIENT_TO_SERVER = 0
    SERVER_TO_CLIENT = 1


class FrameMac:
    """HMAC-SHA256 state of one direction of one connection.

    Each frame's MAC covers (direction, sequence number, frame bytes); the sequence number
    advances once per frame, so a dropped, replayed or reordered frame fails to verify.
    """

    def __init__(self, key: bytes, direction: Direction) -> None:
        if len(key) < 16:
            raise LocalProtocolError("frame MAC key must be at least 16 bytes")
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self.direction = Direction(direction)
        self.sequence = 0

    def begin(self) -> "hmac.HMAC":
        """Start the MAC of the next frame (advances the sequence number)."""
        h = self._keyed.copy()
        h.update(bytes([self.direction]) + self.sequence.to_bytes(8, "big"))
        self.sequence += 1
        return h


def encode(
    msg: Message,
    mac: FrameMac | None = None,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> list[bytes | memoryview]:
    """Encode `msg` as a list of buffers: the header, each tensor's raw bytes (a memoryview
    of the contiguous CPU tensor, no copy unless the tensor was not contiguous), the blob, and
    the MAC when `mac` is given. Raises LocalProtocolError for a message we may not send."""
    header, payload = _prepare(msg, mac, max_frame_bytes)
    out: list[bytes | memoryview] = [header, *payload]
    if mac is not None:
        h = mac.begin()
        for buf in out:
            h.update(buf)
        out.append(h.digest())
    return out


def encode_chunks(
    msg: Message,
    mac: FrameMac | None = None,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    chunk_bytes: int = 1 << 20,
) -> Iterator[bytes | memoryview]:
    """Like `encode`, but yields the payload in memoryview slices of at most `chunk_bytes`
    and computes the MAC as it goes, so a writer can hash one chunk while the previous one is
    on the wire. The message is checked (LocalProtocolError) before this returns; the MAC
    sequence number advances when the first buffer is taken."""
    header, payload = _prepare(msg, mac, max_frame_bytes)
    return _chunks(header, payload, mac, chunk_bytes)


def _chunks(
    header: bytes, payload: list[memoryview | bytes], mac: FrameMac | None, chunk_bytes: int
) -> Iterator[bytes | memoryview]:
    h = mac.begin() if mac is not None else None
    if h is not None:
        h.update(header)
    yield header
    for buf in payload:
        view = memoryview(buf)
        for start in range(0, view.nbytes, chunk_bytes):
            piece = view[start : start + chunk_bytes]
            if h is not None:
                h.update(piece)
            yield piece
    if h is not None:
        yield h.digest()


def _prepare(
    msg: Message, mac: FrameMac | None, max_frame_bytes: int
) -> tuple[bytes, list[memoryview | bytes]]:
    """Check `msg` and build its header; returns (header, payload buffers without the MAC)."""
    try:
        kind = MsgType(msg.kind)
    except ValueError as exc:  # an int that is not a message type: caller's bug
        raise LocalProtocolError(f"unknown message kind {msg.kind!r}") from exc
    if not isinstance(msg.request_id, int) or not 0 <= msg.request_id < 1 << 64:
        raise LocalProtocolError(f"request_id must be an unsigned 64-bit int, got {msg.request_id!r}")
    if not isinstance(msg.meta, dict):
        raise LocalProtocolError(f"meta must be a dict, got {type(msg.meta).__name__}")
    try:
        meta = json.dumps(msg.meta, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:  # not JSON-able: caller's bug, report it as such
        raise LocalProtocolError(f"meta is not JSON-serialisable: {exc}") from exc

    descs = bytearray()
    payload: list[memoryview | bytes] = []
    tensor_bytes = 0
    if len(msg.tensors) > MAX_TENSORS:
        raise LocalProtocolError(f"{len(msg.tensors)} tensors in one frame (max {MAX_TENSORS})")
    for t in msg.tensors:
        view, desc = _tensor_buffer(t)
        descs += desc
        tensor_bytes += view.nbytes
        if view.nbytes:
            payload.append(view)

    flags = 0
    blob_len = 0
    if msg.blob is not None:
        if kind not in BLOB_KINDS:
            raise LocalProtocolError(f"{kind.name} may not carry a blob")
        if mac is None:
            raise LocalProtocolError("blobs travel only on authenticated connections")
        blob = bytes(msg.blob)
        blob_len = len(blob)
        flags |= FLAG_BLOB
        if blob:
            payload.append(blob)
    if mac is not None:
        flags |= FLAG_MAC

    if len(descs) + len(meta) > DEFAULT_MAX_HEADER_BYTES:
        raise LocalProtocolError(f"frame header of {len(descs) + len(meta)} bytes is too large")
    total = PREFIX.size + len(descs) + len(meta) + tensor_bytes + blob_len
    total += MAC_BYTES if mac is not None else 0
    if total > max_frame_bytes:
        raise LocalProtocolError(f"frame of {total} bytes exceeds the limit of {max_frame_bytes}")

    prefix = PREFIX.pack(
        MAGIC, VERSION, flags, kind, msg.request_id, len(descs), len(meta), tensor_bytes, blob_len
    )
    return prefix + bytes(descs) + meta, payload


def _tensor_buffer(t: Any) -> tuple[memoryview, bytes]:
    """The raw bytes of a dense CPU tensor (or numpy array) and its descriptor."""
    torch = _torch()
    if isinstance(t, np.ndarray):
        name = t.dtype.name
        shape = t.shape
        flat = np.ascontiguousarray(t)  # copies only if needed
        view = memoryview(flat.reshape(-1).view(np.uint8))
    elif torch is not None and isinstance(t, torch.Tensor):
        if t.device.type != "cpu" or t.layout != torch.strided:
            raise LocalProtocolError(f"only dense CPU tensors can be sent (got {t.device}, {t.layout})")
        name = str(t.dtype).removeprefix("torch.")
        shape = tuple(t.shape)
        flat = t.detach().resolve_conj().resolve_neg().contiguous()  # copies only if needed
        view = memoryview(flat.reshape(-1).view(torch.uint8).numpy())
    else:
        raise LocalProtocolError(f"tensors must be torch.Tensor or numpy arrays, got {type(t).__name__}")
    code = DTYPE_CODES.get(name)
    if code is None:
        raise LocalProtocolError(f"dtype {name} cannot be sent")
    if len(shape) > MAX_NDIM or any(d > MAX_DIM for d in shape):
        raise LocalProtocolError(f"tensor shape {tuple(shape)} cannot be sent")
    desc = _DESC_HEAD.pack(code, len(shape)) + struct.pack(f"!{len(shape)}Q", *shape)
    return view, desc


# the decoder lives in its own module; importers of the codec find it here too
from meshci.wire.decoder import FrameDecoder  # noqa: E402 - needs the constants above

__all__ = ["Direction", "FrameDecoder", "FrameMac", "encode", "encode_chunks"]
