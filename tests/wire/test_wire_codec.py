"""Frame codec without sockets: round trips, zero-copy paths, limits, malformed frames."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from wire_helpers import decode_all, descriptor, frame_bytes, raw_frame, resident_bytes

from meshci.wire.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from meshci.wire.frames import (
    DTYPE_CODES,
    FLAG_BLOB,
    FLAG_MAC,
    MAC_BYTES,
    PREFIX,
    Direction,
    FrameDecoder,
    FrameMac,
    encode,
    encode_chunks,
)
from meshci.wire.messages import BLOB_KINDS, Message, MsgType, same_message

KEY = bytes(range(32))


def mac_pair(direction: Direction = Direction.CLIENT_TO_SERVER) -> tuple[FrameMac, FrameMac]:
    return FrameMac(KEY, direction), FrameMac(KEY, direction)


def roundtrip(msg: Message, authenticated: bool = False, chunk: int | None = None) -> Message:
    send, recv = mac_pair() if authenticated else (None, None)
    data = frame_bytes(msg, send)
    decoder = FrameDecoder(recv)
    step = chunk or len(data)
    out = []
    for i in range(0, len(data), step):
        out += decode_all(data[i : i + step], decoder)
    assert len(out) == 1
    assert not decoder.in_frame
    return out[0]


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
     torch.int16, torch.int8, torch.uint8, torch.bool],
)
@pytest.mark.parametrize("authenticated", [False, True])
def test_roundtrip_each_dtype(dtype: torch.dtype, authenticated: bool) -> None:
    t = (torch.randn(2, 3, 5) * 50).to(dtype)
    msg = Message(MsgType.TILE, 42, {"rows": [0, 2]}, (t,))
    out = roundtrip(msg, authenticated, chunk=7)
    assert same_message(out, msg)
    assert out.tensors[0].dtype == dtype


def test_non_contiguous_tensors_arrive_contiguous_and_equal() -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    views = (base.transpose(0, 2), base[:, ::2, 1:], base.permute(1, 0, 2)[1:])
    assert not any(v.is_contiguous() for v in views)
    out = roundtrip(Message(MsgType.TILE, 1, {}, views))
    for got, want in zip(out.tensors, views):
        assert got.is_contiguous()
        assert torch.equal(got, want)


def test_empty_and_scalar_tensors() -> None:
    tensors = (torch.empty(0), torch.empty(3, 0, 2, dtype=torch.int64), torch.tensor(3.5),
               torch.tensor(7, dtype=torch.uint8))
    out = roundtrip(Message(MsgType.STATE, 0, {}, tensors))
    assert [tuple(t.shape) for t in out.tensors] == [(0,), (3, 0, 2), (), ()]
    assert same_message(out, Message(MsgType.STATE, 0, {}, tensors))


def test_several_tensors_meta_and_blob() -> None:
    msg = Message(
        MsgType.MODEL_CODE,
        2**64 - 1,
        {"model": "vgg16", "nested": {"a": [1, 2.5, None, True, "é"]}},
        (torch.randn(4, 4), torch.arange(10), torch.zeros(2, dtype=torch.float16)),
        b"\x80\x05blob bytes",
    )
    assert same_message(roundtrip(msg, authenticated=True, chunk=13), msg)


def test_empty_blob_is_distinct_from_no_blob() -> None:
    out = roundtrip(Message(MsgType.MODEL_CODE, 1, {}, (), b""), authenticated=True)
    assert out.blob == b""
    assert roundtrip(Message(MsgType.MODEL_CODE, 1, {}), authenticated=True).blob is None


def test_several_frames_in_one_feed() -> None:
    msgs = [Message(MsgType.PING, i, {"i": i}, (torch.full((i,), float(i)),)) for i in range(5)]
    data = b"".join(frame_bytes(m) for m in msgs)
    out = decode_all(data, FrameDecoder())
    assert len(out) == 5 and all(same_message(a, b) for a, b in zip(out, msgs))


def test_encode_does_not_copy_contiguous_tensors() -> None:
    t = torch.zeros(1000)
    buffers = encode(Message(MsgType.TILE, 0, {}, (t,)))
    t[0] = 1.5  # visible through the buffer: it is the tensor's own memory
    assert bytes(buffers[1][:4]) == struct.pack("<f", 1.5)
    assert len(buffers) == 2


def test_decoder_reads_payload_straight_into_the_tensor() -> None:
    t = torch.arange(1000, dtype=torch.float32)
    data = frame_bytes(Message(MsgType.TILE, 5, {}, (t,)))
    header_len = len(data) - t.numel() * 4
    decoder = FrameDecoder()
    decoder.feed(data[:header_len])
    assert decoder.next_message() is None
    assert decoder.bytes_wanted == t.numel() * 4
    view = decoder.get_buffer()
    assert view is not None and view.nbytes == t.numel() * 4
    view[:] = data[header_len:]  # as sock.recv_into(view) would
    decoder.buffer_updated(view.nbytes)
    msg = decoder.next_message()
    assert msg is not None and torch.equal(msg.tensors[0], t)
    # The received tensor is the buffer we wrote into, not a copy of it.
    view2 = memoryview(msg.tensors[0].numpy()).cast("B")
    assert view2.tobytes() == view.tobytes()
    msg.tensors[0][0] = -1.0
    assert struct.unpack_from("<f", view)[0] == -1.0


def test_feed_bypasses_pending_buffer_for_payload() -> None:
    t = torch.randn(50_000)
    data = frame_bytes(Message(MsgType.TILE, 0, {}, (t,)))
    decoder = FrameDecoder()
    decoder.feed(data[:200])
    assert decoder.next_message() is None
    for i in range(200, len(data), 4096):
        decoder.feed(data[i : i + 4096])
        assert decoder.buffered_bytes == 0
    msg = decoder.next_message()
    assert msg is not None and torch.equal(msg.tensors[0], t)


def test_bytes_wanted_and_in_frame() -> None:
    data = frame_bytes(Message(MsgType.PING, 1, {"x": 1}))
    decoder = FrameDecoder()
    assert not decoder.in_frame and decoder.bytes_wanted == PREFIX.size
    decoder.feed(data[:10])
    assert decoder.in_frame and decoder.bytes_wanted == PREFIX.size - 10
    decoder.feed(data[10:])
    assert decoder.next_message() is not None
    assert not decoder.in_frame


# -- limits ----------------------------------------------------------------------------------
def test_huge_length_rejected_from_the_prefix_alone() -> None:
    decoder = FrameDecoder()
    frame = raw_frame(MsgType.TILE, descs=descriptor(5, 4 << 30), tensor_bytes=4 << 30)
    decoder.feed(frame[: PREFIX.size])  # nothing but the fixed prefix
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        decoder.next_message()


def test_max_frame_bytes_is_configurable() -> None:
    data = frame_bytes(Message(MsgType.TILE, 0, {}, (torch.zeros(1000),)))
    assert decode_all(data, FrameDecoder(max_frame_bytes=len(data)))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_all(data, FrameDecoder(max_frame_bytes=len(data) - 1))


def test_oversized_header_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="header"):
        decode_all(raw_frame(meta_len=2 << 20), FrameDecoder())


def test_encode_refuses_frames_over_the_limit() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode(Message(MsgType.TILE, 0, {}, (torch.zeros(1000),)), max_frame_bytes=1000)


# -- malformed frames --------------------------------------------------------------------------
F32 = DTYPE_CODES["float32"]


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (raw_frame(magic=b"GET "), "magic"),
        (raw_frame(version=9), "version"),
        (raw_frame(kind=999), "unknown message kind"),
        (raw_frame(flags=0x80), "flags"),
        (raw_frame(descs=descriptor(99, 2), payload=bytes(8)), "unknown dtype"),
        (raw_frame(descs=descriptor(F32, 3), payload=bytes(8)), "need"),
        (raw_frame(descs=descriptor(F32, 1), payload=bytes(8)), "need 4 bytes but the frame carries 8"),
        (raw_frame(descs=descriptor(F32, *([1] * 9)), payload=bytes(4)), "dimensions"),
        (raw_frame(descs=descriptor(F32, 2)[:-3], payload=bytes(8)), "truncated"),
        (raw_frame(meta=b"[1, 2]"), "not an object"),
        (raw_frame(meta=b"{bad json"), "not valid JSON"),
        (raw_frame(meta=b'{"x": NaN}'), "constant"),
        (raw_frame(meta=b"\xff\xfe"), "not valid JSON"),
        (raw_frame(meta=b"[" * 100_000), "not valid JSON|not an object"),
        (raw_frame(meta=b""), "without meta"),
        (raw_frame(MsgType.MODEL_CODE, flags=FLAG_BLOB, blob_len=3, payload=b"abc"), "unauthenticated"),
        (raw_frame(blob_len=3, payload=b"abc"), "blob length"),
        (raw_frame(flags=FLAG_MAC, payload=bytes(MAC_BYTES), tensor_bytes=0), "MAC before"),
    ],
)
def test_malformed_frames_raise_remote_protocol_error(frame: bytes, match: str) -> None:
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match=match):
        decode_all(frame, decoder)
    # The decoder stays broken: the stream cannot be trusted any more.
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(frame_bytes(Message(MsgType.PING)))


def test_only_model_code_may_carry_a_blob() -> None:
    assert BLOB_KINDS == {MsgType.MODEL_CODE}


@pytest.mark.parametrize("kind", [MsgType.TILE, MsgType.PLAN, MsgType.INFER])
def test_blob_on_a_kind_that_may_not_carry_one(kind: MsgType) -> None:
    send, recv = mac_pair()
    good = frame_bytes(Message(MsgType.MODEL_CODE, 0, {}, (), b"x"), send)
    bad = bytearray(good)
    struct.pack_into("!H", bad, 6, kind)  # kind field
    with pytest.raises(RemoteProtocolError, match="may not carry a blob"):
        decode_all(bytes(bad), FrameDecoder(recv))
    with pytest.raises(LocalProtocolError, match="may not carry a blob"):
        encode(Message(kind, 0, {}, (), b"x"), mac_pair()[0])


def test_unauthenticated_frame_on_authenticated_decoder() -> None:
    _, recv = mac_pair()
    with pytest.raises(AuthenticationError, match="unauthenticated frame"):
        decode_all(frame_bytes(Message(MsgType.PING)), FrameDecoder(recv))


def test_bad_mac_wrong_key_and_flipped_tag() -> None:
    send = FrameMac(b"another key of 32 bytes........!", Direction.CLIENT_TO_SERVER)
    with pytest.raises(AuthenticationError, match="bad MAC"):
        decode_all(frame_bytes(Message(MsgType.PING), send), FrameDecoder(mac_pair()[1]))
    send, recv = mac_pair()
    data = bytearray(frame_bytes(Message(MsgType.PING, 0, {}, (torch.ones(3),)), send))
    data[-1] ^= 1
    with pytest.raises(AuthenticationError, match="bad MAC"):
        decode_all(bytes(data), FrameDecoder(recv))


def test_payload_tampering_detected() -> None:
    send, recv = mac_pair()
    data = bytearray(frame_bytes(Message(MsgType.TILE, 0, {}, (torch.ones(100),)), send))
    data[PREFIX.size + 20] ^= 0x40  # inside the tensor bytes
    with pytest.raises(AuthenticationError):
        decode_all(bytes(data), FrameDecoder(recv))


def test_mac_sequence_rejects_reorder_replay_and_reflection() -> None:
    send, recv = mac_pair()
    first, second = (frame_bytes(Message(MsgType.PING, i), send) for i in range(2))
    with pytest.raises(AuthenticationError):
        decode_all(second + first, FrameDecoder(FrameMac(KEY, Direction.CLIENT_TO_SERVER)))
    decoder = FrameDecoder(recv)
    assert decode_all(first, decoder)[0].request_id == 0
    with pytest.raises(AuthenticationError):
        decode_all(first, decoder)  # replayed
    reflected = FrameDecoder(FrameMac(KEY, Direction.SERVER_TO_CLIENT))
    with pytest.raises(AuthenticationError):
        decode_all(first, reflected)


# -- local errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Message(MsgType.PING, 0, {"x": object()}), "JSON"),
        (Message(MsgType.PING, 0, {"x": float("nan")}), "JSON"),
        (Message(MsgType.PING, -1), "request_id"),
        (Message(MsgType.PING, 0, {}, (torch.zeros(2, dtype=torch.complex64),)), "dtype"),
        (Message(MsgType.PING, 0, {}, ("not a tensor",)), "torch.Tensor"),  # type: ignore[arg-type]
        (Message(MsgType.TILE, 0, {}, (), b"x"), "may not carry a blob"),
        (Message(MsgType.MODEL_CODE, 0, {}, (), b"x"), "authenticated"),
    ],
)
def test_encode_local_errors(msg: Message, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode(msg)


def test_meta_json_is_compact_and_first_class() -> None:
    data = frame_bytes(Message(MsgType.PING, 0, {"b": 1, "a": [1, 2]}))
    meta = data[PREFIX.size :]
    assert json.loads(meta) == {"b": 1, "a": [1, 2]}


def test_requires_grad_tensor_is_sent_detached() -> None:
    t = torch.randn(3, requires_grad=True)
    out = roundtrip(Message(MsgType.TILE, 0, {}, (t * 2,)))
    assert not out.tensors[0].requires_grad
    assert torch.equal(out.tensors[0], (t * 2).detach())


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, 1 << 20])
@pytest.mark.parametrize("authenticated", [False, True])
def test_encode_chunks_matches_encode(chunk_bytes: int, authenticated: bool) -> None:
    msg = Message(
        MsgType.MODEL_CODE, 3, {"k": "v"}, (torch.randn(3000), torch.arange(7)), b"blob" if authenticated else None
    )
    a, b = mac_pair() if authenticated else (None, None)
    whole = b"".join(bytes(x) for x in encode(msg, a))
    pieces = list(encode_chunks(msg, b, chunk_bytes=chunk_bytes))
    assert b"".join(bytes(x) for x in pieces) == whole
    assert all(memoryview(p).nbytes <= max(chunk_bytes, len(pieces[0])) for p in pieces)


def test_encode_chunks_checks_the_message_before_returning() -> None:
    with pytest.raises(LocalProtocolError):
        encode_chunks(Message(MsgType.TILE, 0, {}, (), b"x"))


# -- memory a peer can make us hold ------------------------------------------------------------
def test_a_header_allocates_nothing_until_its_payload_arrives() -> None:
    announced = 64 << 20
    decoder = FrameDecoder()
    frame = raw_frame(MsgType.TILE, descs=descriptor(5, announced) + descriptor(5, 8), tensor_bytes=announced + 8)
    decoder.feed(frame)  # prefix and header only
    assert decoder.next_message() is None
    assert decoder.allocated_bytes == 0
    view = decoder.get_buffer()  # the payload starts: its first tensor gets a buffer
    assert view is not None and view.nbytes == announced
    assert decoder.allocated_bytes == announced  # the second tensor still has none


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_announced_frames_cost_memory_only_as_bytes_arrive() -> None:
    # Three connections' decoders each announce a 200 MiB tensor and receive 1 MiB of it:
    # resident memory grows by about what was received, not by what was announced.
    announced, received = 200 << 20, 1 << 20
    decoders = []
    before = resident_bytes()
    for _ in range(3):
        decoder = FrameDecoder()
        decoder.feed(raw_frame(MsgType.TILE, descs=descriptor(5, announced), tensor_bytes=announced))
        assert decoder.next_message() is None
        view = decoder.get_buffer()
        assert view is not None
        view[:received] = b"\x01" * received  # as recv_into would
        decoder.buffer_updated(received)
        decoders.append(decoder)
    assert resident_bytes() - before < 48 << 20  # 600 MiB announced, 3 MiB received
    assert all(d.bytes_wanted == announced - received for d in decoders)
