"""Decoding frames, sans-IO: `FrameDecoder` parses bytes fed to it (or read straight into
the buffers it hands out) into `Message`s, checking every length before it allocates and
every MAC before it parses a header. The frame format and the encoder are in `frames.py`."""

from __future__ import annotations

import hmac
import json
import math
import mmap
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import numpy as np

from meshci.wire.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from meshci.wire.frames import (
    _CODE_DTYPES,
    _DESC_HEAD,
    _ITEMSIZE,
    _KNOWN_FLAGS,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    FLAG_BLOB,
    FLAG_MAC,
    LAZY_COMMIT_BYTES,
    MAC_BYTES,
    MAGIC,
    MAX_DIM,
    MAX_NDIM,
    MAX_TENSORS,
    PREFIX,
    VERSION,
    FrameMac,
    _torch,
)
from meshci.wire.messages import BLOB_KINDS, Message, MsgType


class _State(IntEnum):
    PREFIX = 0
    HEADER = 1
    PAYLOAD = 2


class FrameDecoder:
    """Incremental decoder: `feed(bytes)` then `next_message()` until it returns None.

    For large payloads the caller may instead read straight into the decoder's buffers:
    `get_buffer()` returns a writable view of the part of the current tensor still to be
    received (None when the decoder first needs buffered bytes parsed), and
    `buffer_updated(n)` commits n bytes written there (the protocol of
    `asyncio.BufferedProtocol`). `feed` also copies payload bytes straight into those buffers.

    Bytes held outside the preallocated payload buffers never exceed the fixed prefix plus
    `max_header_bytes` once `next_message()` has returned None. Any malformed input raises
    RemoteProtocolError, after which the decoder is broken and raises the same error again.
    """

    def __init__(
        self,
        mac: FrameMac | None = None,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        self.mac = mac
        self.max_frame_bytes = max_frame_bytes
        self.max_header_bytes = max_header_bytes
        self._pending = bytearray()
        self._error: RemoteProtocolError | None = None
        self._reset()

    # -- configuration -------------------------------------------------------------------
    def set_mac(self, mac: FrameMac | None) -> None:
        """Authenticate frames from the next one on (after the handshake)."""
        if self._state is not _State.PREFIX:
            raise LocalProtocolError("cannot change the MAC in the middle of a frame")
        self.mac = mac

    # -- state -----------------------------------------------------------------------------
    @property
    def in_frame(self) -> bool:
        """True when part of a frame has been received (end of stream now is a truncation)."""
        return bool(self._pending) or self._state is not _State.PREFIX

    @property
    def buffered_bytes(self) -> int:
        """Bytes held that are not yet in a payload buffer."""
        return len(self._pending)

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes the current part of the frame needs (0: call next_message)."""
        if self._state is _State.PREFIX:
            need = PREFIX.size
        elif self._state is _State.HEADER:
            need = self._desc_len + self._meta_len
        else:
            need = sum(self._sizes[self._index :]) - self._filled
        return max(0, need - len(self._pending))

    @property
    def allocated_bytes(self) -> int:
        """Bytes of payload buffers allocated for the frame in progress (address space;
        large buffers become resident only as bytes arrive)."""
        return sum(size for size, view in zip(self._sizes, self._targets) if view is not None)

    @property
    def last_frame_bytes(self) -> int:
        """Size on the wire of the frame behind the last message `next_message()` returned."""
        return self._last_frame_bytes

    def read_hint(self, limit: int) -> int:
        """How many bytes to read next into a scratch buffer of `limit` bytes when
        `get_buffer()` is None (call `next_message()` first): the rest of the prefix, or the
        rest of the header, plus the rest of the frame when all of it fits in `limit`. Never
        reaches past the current frame, so every payload byte of a larger frame goes through
        `get_buffer()`, and no byte of the next frame is read before this one is parsed."""
        if self._state is _State.PREFIX:
            need = PREFIX.size
        elif self._state is _State.HEADER:
            need = self._desc_len + self._meta_len
            rest = self._tensor_bytes + self._blob_len + (MAC_BYTES if self.mac is not None else 0)
            if need + rest <= limit:
                need += rest
        else:
            need = self.bytes_wanted + len(self._pending)
        return max(1, min(limit, need - len(self._pending)))

    # -- input -----------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes received from the peer."""
        if self._error is not None:
            raise self._error
        with memoryview(data) as view:
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            if self._state is _State.PAYLOAD and not self._pending:
                used = self._fill(view)
                view = view[used:]
            if view.nbytes:
                self._pending += view

    def get_buffer(self) -> memoryview | None:
        """A writable view of the rest of the current payload buffer, or None."""
        if self._error is not None:
            raise self._error
        if self._state is not _State.PAYLOAD or self._pending or self._index >= len(self._sizes):
            return None
        return self._target(self._index)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        """Commit `nbytes` written into the view returned by `get_buffer()`."""
        if self._index >= len(self._sizes):
            raise LocalProtocolError("buffer_updated() without a payload buffer")
        size = self._sizes[self._index]
        if nbytes < 0 or self._filled + nbytes > size:
            raise LocalProtocolError(f"buffer_updated({nbytes}) overruns the buffer")
        self._absorb(nbytes)
        if self._filled == size:
            self._finish_target()

    # -- output ----------------------------------------------------------------------------
    def next_message(self) -> Message | None:
        """The next complete message, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._advance()
        except RemoteProtocolError as exc:  # remember it: the stream is now unusable
            self._error = exc
            self._pending.clear()
            self._targets = []
            self._sizes = []
            raise

    def _advance(self) -> Message | None:
        if self._state is _State.PREFIX:
            if len(self._pending) < PREFIX.size:
                return None
            self._prefix = bytes(self._pending[: PREFIX.size])
            del self._pending[: PREFIX.size]
            self._parse_prefix(self._prefix)
            self._state = _State.HEADER
        if self._state is _State.HEADER:
            need = self._desc_len + self._meta_len
            if len(self._pending) < need:
                return None
            descs = bytes(self._pending[: self._desc_len])
            self._meta = bytes(self._pending[self._desc_len : need])
            del self._pending[:need]
            self._start_payload(descs)
        if self._pending:
            with memoryview(self._pending) as view:
                used = self._fill(view)
            del self._pending[:used]
        if self._index < len(self._sizes):
            return None
        return self._finish_frame()

    # -- parsing ---------------------------------------------------------------------------
    def _parse_prefix(self, prefix: bytes) -> None:
        magic, version, flags, kind, request_id, desc_len, meta_len, tensor_bytes, blob_len = (
            PREFIX.unpack(prefix)
        )
        if magic != MAGIC:
            raise RemoteProtocolError(f"bad magic {magic!r} (not a meshci peer)")
        if version != VERSION:
            raise RemoteProtocolError(f"unsupported protocol version {version}")
        try:
            self._kind = MsgType(kind)
        except ValueError as exc:  # a peer's mistake, not ours
            raise RemoteProtocolError(f"unknown message kind {kind}") from exc
        if flags & ~_KNOWN_FLAGS:
            raise RemoteProtocolError(f"unknown frame flags {flags:#x}")
        has_mac = bool(flags & FLAG_MAC)
        if has_mac != (self.mac is not None):
            raise AuthenticationError(
                "unauthenticated frame on an authenticated connection"
                if self.mac is not None
                else "frame with a MAC before authentication"
            )
        self._has_blob = bool(flags & FLAG_BLOB)
        if self._has_blob:
            if self._kind not in BLOB_KINDS:
                raise RemoteProtocolError(f"{self._kind.name} may not carry a blob")
            if self.mac is None:
                raise RemoteProtocolError("blob on an unauthenticated connection")
        elif blob_len:
            raise RemoteProtocolError("blob length without the blob flag")
        if desc_len + meta_len > self.max_header_bytes:
            raise RemoteProtocolError(
                f"frame header of {desc_len + meta_len} bytes exceeds {self.max_header_bytes}"
            )
        total = PREFIX.size + desc_len + meta_len + tensor_bytes + blob_len
        total += MAC_BYTES if has_mac else 0
        if total > self.max_frame_bytes:
            raise RemoteProtocolError(
                f"frame of {total} bytes exceeds the limit of {self.max_frame_bytes}"
            )
        self._request_id = request_id
        self._frame_bytes = total
        self._desc_len = desc_len
        self._meta_len = meta_len
        self._tensor_bytes = tensor_bytes
        self._blob_len = blob_len

    def _start_payload(self, descs: bytes) -> None:
        specs = _parse_descriptors(descs, self._tensor_bytes)
        # Lengths were bounded by max_frame_bytes in the prefix. Buffers are allocated only
        # when the payload reaches them (`_target`), so a header alone allocates nothing.
        self._tensors = []
        self._sizes = []
        self._makers = []
        for dtype, shape, nbytes in specs:
            slot = len(self._tensors)
            self._tensors.append((np.empty(0, dtype=np.uint8), dtype, shape))
            if nbytes:
                self._sizes.append(nbytes)
                self._makers.append(lambda n=nbytes, i=slot: self._tensor_target(i, n))
        self._blob = bytearray() if self._has_blob else None
        if self._blob_len:
            self._sizes.append(self._blob_len)
            self._makers.append(self._blob_target)
        self._tag = bytearray(MAC_BYTES) if self.mac is not None else None
        if self._tag is not None:
            self._sizes.append(MAC_BYTES)
            self._makers.append(lambda: memoryview(self._tag))
        self._targets = [None] * len(self._sizes)
        self._hmac = None
        if self.mac is not None:
            self._sequence = self.mac.sequence
            self._hmac = self.mac.begin()
            self._hmac.update(self._prefix + descs + self._meta)
        self._index = 0
        self._filled = 0
        self._state = _State.PAYLOAD

    def _target(self, index: int) -> memoryview:
        view = self._targets[index]
        if view is None:
            view = self._targets[index] = self._makers[index]()
        return view

    def _tensor_target(self, slot: int, nbytes: int) -> memoryview:
        _, dtype, shape = self._tensors[slot]
        raw, view = _allocate(nbytes)
        self._tensors[slot] = (raw, dtype, shape)
        return view

    def _blob_target(self) -> memoryview:
        self._blob = bytearray(self._blob_len)
        return memoryview(self._blob)

    def _fill(self, data: memoryview) -> int:
        used = 0
        while used < len(data) and self._index < len(self._sizes):
            target = self._target(self._index)
            n = min(len(target) - self._filled, len(data) - used)
            target[self._filled : self._filled + n] = data[used : used + n]
            self._absorb(n)
            used += n
            if self._filled == len(target):
                self._finish_target()
        return used

    def _absorb(self, n: int) -> None:
        """Count `n` new bytes in the current target and hash them as they arrive (so the
        MAC is ready when the last byte is), except for the trailing MAC tag itself."""
        start = self._filled
        self._filled += n
        if self._hmac is not None and self._index < len(self._sizes) - 1:
            self._hmac.update(self._target(self._index)[start : self._filled])

    def _finish_target(self) -> None:
        self._index += 1
        self._filled = 0

    def _finish_frame(self) -> Message:
        if self._hmac is not None:
            assert self._tag is not None
            if not hmac.compare_digest(self._hmac.digest(), bytes(self._tag)):
                raise AuthenticationError(f"bad MAC on {self._kind.name} frame (sequence {self._sequence})")
        meta = _parse_meta(self._meta)
        tensors = _as_tensors(self._tensors)
        blob = bytes(self._blob) if self._blob is not None else None
        msg = Message(self._kind, self._request_id, meta, tensors, blob)
        self._last_frame_bytes = self._frame_bytes
        self._reset()
        return msg

    def _reset(self) -> None:
        self._state = _State.PREFIX
        self._targets: list[memoryview | None] = []
        self._sizes: list[int] = []
        self._makers: list[Callable[[], memoryview]] = []
        self._frame_bytes = 0
        self._tensor_bytes = self._blob_len = 0
        self._tensors: list[tuple[Any, str, tuple[int, ...]]] = []
        self._index = 0
        self._filled = 0
        self._hmac: Any = None
        self._sequence = 0
        self._tag: bytearray | None = None
        self._blob: bytearray | None = None
        self._desc_len = self._meta_len = 0
        self._meta = b""
        self._prefix = b""


def _allocate(nbytes: int) -> tuple[Any, memoryview]:
    """A writable uint8 buffer of `nbytes` (a numpy array) and a view of it. Large buffers
    are private anonymous maps, so untouched pages cost no memory."""
    if nbytes < LAZY_COMMIT_BYTES:
        raw = np.empty(nbytes, dtype=np.uint8)
        return raw, memoryview(raw)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(region)
    # the array keeps `region` alive for as long as it (or any tensor sharing it) lives
    return np.frombuffer(view, dtype=np.uint8), view


def _as_tensors(slots: list[tuple[Any, str, tuple[int, ...]]]) -> tuple[Any, ...]:
    """The received buffers as tensors of their dtypes and shapes, sharing the buffers:
    torch tensors when torch is loaded here, else numpy arrays (bfloat16 needs torch)."""
    torch = _torch()
    out = []
    for raw, dtype, shape in slots:
        if torch is not None:
            kind = getattr(torch, dtype)
            out.append(torch.from_numpy(raw).view(kind).reshape(shape) if raw.size
                       else torch.empty(shape, dtype=kind))
        elif dtype == "bfloat16":
            raise RemoteProtocolError("a bfloat16 tensor arrived in a process without torch")
        else:
            out.append(raw.view(np.dtype(dtype)).reshape(shape) if raw.size
                       else np.empty(shape, dtype=np.dtype(dtype)))
    return tuple(out)


def _parse_descriptors(
    descs: bytes, tensor_bytes: int
) -> list[tuple[str, tuple[int, ...], int]]:
    specs: list[tuple[str, tuple[int, ...], int]] = []
    offset = total = 0
    while offset < len(descs):
        if len(specs) >= MAX_TENSORS:
            raise RemoteProtocolError(f"more than {MAX_TENSORS} tensors in one frame")
        if offset + _DESC_HEAD.size > len(descs):
            raise RemoteProtocolError("truncated tensor descriptor")
        code, ndim = _DESC_HEAD.unpack_from(descs, offset)
        offset += _DESC_HEAD.size
        dtype = _CODE_DTYPES.get(code)
        if dtype is None:
            raise RemoteProtocolError(f"unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise RemoteProtocolError(f"tensor with {ndim} dimensions (max {MAX_NDIM})")
        if offset + 8 * ndim > len(descs):
            raise RemoteProtocolError("truncated tensor shape")
        shape = struct.unpack_from(f"!{ndim}Q", descs, offset)
        offset += 8 * ndim
        if any(d > MAX_DIM for d in shape):
            raise RemoteProtocolError(f"tensor dimension too large in {shape}")
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        total += nbytes
        if total > tensor_bytes:
            raise RemoteProtocolError("tensor shapes need more bytes than the frame carries")
        specs.append((dtype, shape, nbytes))
    if total != tensor_bytes:
        raise RemoteProtocolError(
            f"tensor shapes need {total} bytes but the frame carries {tensor_bytes}"
        )
    return specs


def _reject_constant(name: str) -> Any:
    raise RemoteProtocolError(f"non-standard JSON constant {name} in meta")


def _parse_meta(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise RemoteProtocolError("frame without meta")
    try:
        meta = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON or absurd nesting from the peer
        raise RemoteProtocolError(f"meta is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise RemoteProtocolError(f"meta is a JSON {type(meta).__name__}, not an object")
    return meta
