"""Property-based fuzzing of the frame decoder: whatever bytes arrive, it yields messages or
raises RemoteProtocolError (never another exception) and never buffers without bound."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_helpers import frame_bytes

from meshci.wire.errors import RemoteProtocolError
from meshci.wire.frames import PREFIX, Direction, FrameDecoder, FrameMac
from meshci.wire.messages import BLOB_KINDS, Message, MsgType, same_message

KEY = b"fuzzing key, 32 bytes long......"
MAX_FRAME = 64 << 10
MAX_HEADER = 4 << 10
BOUND = PREFIX.size + MAX_HEADER
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool, torch.bfloat16]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).to(dtype)


@st.composite
def messages(draw: st.DrawFn, authenticated: bool) -> Message:
    kind = draw(st.sampled_from(list(MsgType)))
    blob = None
    if authenticated and kind in BLOB_KINDS:
        blob = draw(st.none() | st.binary(max_size=64))
    return Message(
        kind,
        draw(st.integers(0, 2**64 - 1)),
        draw(st.dictionaries(st.text(max_size=6), json_values, max_size=4)),
        tuple(draw(st.lists(tensors(), max_size=3))),
        blob,
    )


def new_decoder(mac: FrameMac | None = None) -> FrameDecoder:
    return FrameDecoder(mac, max_frame_bytes=MAX_FRAME, max_header_bytes=MAX_HEADER)


def feed_chunks(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Message]:
    """Feed `data` split at `cuts`; after every step the decoder holds a bounded amount."""
    out: list[Message] = []
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in zip(points, points[1:]):
        decoder.feed(data[a:b])
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
        assert decoder.buffered_bytes <= BOUND
    return out


@FUZZ
@given(data=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 4096), max_size=8))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = new_decoder()
    try:
        feed_chunks(decoder, data, cuts)
    except RemoteProtocolError:
        return  # the one permitted failure


@FUZZ
@given(
    kind=st.sampled_from(list(MsgType)) | st.integers(0, 2**16 - 1),
    flags=st.integers(0, 7),
    lengths=st.tuples(*[st.integers(0, 300)] * 4) | st.tuples(*[st.integers(0, 2**32 - 1)] * 4),
    body=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 700), max_size=4),
)
def test_random_bodies_behind_a_plausible_prefix(
    kind: int, flags: int, lengths: tuple[int, int, int, int], body: bytes, cuts: list[int]
) -> None:
    # Random prefixes almost never pass the magic/kind checks; building a plausible one
    # sends random bytes into descriptor, JSON, payload and MAC parsing.
    desc_len, meta_len, tensor_bytes, blob_len = lengths
    prefix = PREFIX.pack(b"MSHC", 1, flags, kind, 0, desc_len, meta_len, tensor_bytes, blob_len)
    mac = FrameMac(KEY, Direction.CLIENT_TO_SERVER) if flags & 1 else None
    try:
        feed_chunks(new_decoder(mac), prefix + body, cuts)
    except RemoteProtocolError:
        return


@FUZZ
@given(msg=messages(authenticated=False), cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_roundtrip_in_random_chunks(msg: Message, cuts: list[int]) -> None:
    out = feed_chunks(new_decoder(), frame_bytes(msg), cuts)
    assert len(out) == 1 and same_message(out[0], msg)


@FUZZ
@given(msg=messages(authenticated=False), cut=st.integers(0, 10_000))
def test_truncated_frame_waits_then_completes(msg: Message, cut: int) -> None:
    data = frame_bytes(msg)
    cut %= len(data)
    decoder = new_decoder()
    decoder.feed(data[:cut])
    assert decoder.next_message() is None
    assert decoder.in_frame == (cut > 0)
    assert decoder.buffered_bytes <= BOUND
    decoder.feed(data[cut:])
    out = decoder.next_message()
    assert out is not None and same_message(out, msg)


@FUZZ
@given(
    msg=messages(authenticated=True),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 10_000), max_size=3),
)
def test_bit_flips_of_authenticated_frames(msg: Message, flips: list[tuple[int, int]], cuts: list[int]) -> None:
    data = bytearray(frame_bytes(msg, FrameMac(KEY, Direction.CLIENT_TO_SERVER)))
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    decoder = new_decoder(FrameMac(KEY, Direction.CLIENT_TO_SERVER))
    try:
        out = feed_chunks(decoder, bytes(data), cuts)
    except RemoteProtocolError:
        return
    # Flips that cancel out leave the original; anything else must have been caught, or
    # (a flipped length) leaves the decoder waiting for bytes that never come.
    assert len(out) <= 1
    if out:
        assert same_message(out[0], msg)


@FUZZ
@given(
    msg=messages(authenticated=False),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=3),
)
def test_bit_flips_of_unauthenticated_frames_never_crash(msg: Message, flips: list[tuple[int, int]]) -> None:
    data = bytearray(frame_bytes(msg))
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    try:
        feed_chunks(new_decoder(), bytes(data), [])
    except RemoteProtocolError:
        return
