"""The handshake as two sans-IO objects talking through an in-memory pipe."""

from __future__ import annotations

import logging

import pytest
import torch
from wire_helpers import decode_all, frame_bytes, run_handshake

from meshci.wire.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from meshci.wire.frames import FrameDecoder
from meshci.wire.handshake import Handshake, Role
from meshci.wire.messages import Message, MsgType, same_message

SECRET = b"cluster secret, 32 bytes long..."
OTHER = b"another secret, 32 bytes long..."


def pair(client_secret: bytes = SECRET, server_secret: bytes = SECRET) -> tuple[Handshake, Handshake]:
    return Handshake(Role.CLIENT, "alice", client_secret), Handshake(Role.SERVER, "bob", server_secret)


def hello_and_challenge(client: Handshake, server: Handshake) -> tuple[Message, Message]:
    """Run the first round trip by hand: the client's HELLO and the server's CHALLENGE."""
    (hello,) = client.initiate()
    server.initiate()
    (challenge,) = server.receive(hello)
    return hello, challenge


def fixed(byte: int):  # noqa: ANN202 - a random_bytes stand-in
    return lambda n: bytes([byte]) * n


def test_success_gives_names_and_working_frame_macs() -> None:
    client, server = pair()
    run_handshake(client, server)
    assert client.complete and server.complete
    assert client.result.peer_name == "bob" and server.result.peer_name == "alice"
    assert client.result.authenticated and server.result.authenticated
    # Frames authenticated with the derived keys verify on the other side, both directions.
    msg = Message(MsgType.TILE, 9, {"r": 1}, (torch.arange(6.0),))
    to_server = FrameDecoder(server.result.recv_mac)
    to_client = FrameDecoder(client.result.recv_mac)
    for _ in range(3):
        assert same_message(decode_all(frame_bytes(msg, client.result.send_mac), to_server)[0], msg)
        assert same_message(decode_all(frame_bytes(msg, server.result.send_mac), to_client)[0], msg)


def test_each_connection_gets_its_own_keys() -> None:
    c1, s1 = pair()
    c2, s2 = pair()
    run_handshake(c1, s1)
    run_handshake(c2, s2)
    frame = frame_bytes(Message(MsgType.PING), c1.result.send_mac)
    with pytest.raises(AuthenticationError):
        decode_all(frame, FrameDecoder(s2.result.recv_mac))


def test_server_with_wrong_secret_is_caught_by_the_client() -> None:
    client, server = pair(SECRET, OTHER)
    with pytest.raises(AuthenticationError, match="failed to prove"):
        run_handshake(client, server)
    assert not client.complete and not server.complete


def test_client_with_wrong_secret_is_caught_by_the_server() -> None:
    # The honest client would stop at the server's proof; give it a CHALLENGE valid for its
    # own (wrong) secret, made with the same server nonce, so it goes on to send a PROOF.
    client = Handshake(Role.CLIENT, "alice", OTHER)
    server = Handshake(Role.SERVER, "bob", SECRET, random_bytes=fixed(7))
    mirror = Handshake(Role.SERVER, "bob", OTHER, random_bytes=fixed(7))
    (hello,) = client.initiate()
    server.initiate()
    mirror.initiate()
    server.receive(hello)
    (challenge,) = mirror.receive(hello)
    (proof,) = client.receive(challenge)
    with pytest.raises(AuthenticationError, match="failed to prove"):
        server.receive(proof)
    assert not server.complete


def test_recorded_client_transcript_cannot_be_replayed() -> None:
    client, server = pair()
    hello, challenge = hello_and_challenge(client, server)
    (proof,) = client.receive(challenge)
    server.receive(proof)
    assert server.complete
    # An eavesdropper replays HELLO and PROOF to a new server: its nonce is fresh.
    fresh = Handshake(Role.SERVER, "bob", SECRET)
    fresh.initiate()
    fresh.receive(hello)
    with pytest.raises(AuthenticationError, match="failed to prove"):
        fresh.receive(proof)


def test_recorded_server_transcript_cannot_be_replayed() -> None:
    client, server = pair()
    _, challenge = hello_and_challenge(client, server)
    victim = Handshake(Role.CLIENT, "alice", SECRET)
    victim.initiate()
    with pytest.raises(AuthenticationError):
        victim.receive(challenge)


@pytest.mark.parametrize("field", ["name", "nonce", "mode"])
def test_tampered_handshake_message_fails(field: str) -> None:
    client, server = pair()
    (hello,) = client.initiate()
    server.initiate()
    meta = dict(hello.meta)
    meta[field] = {"name": "mallory", "nonce": "ab" * 32, "mode": "insecure"}[field]
    with pytest.raises(AuthenticationError):
        (challenge,) = server.receive(Message(MsgType.HELLO, 0, meta))
        client.receive(challenge)


def test_tampered_proof_fails() -> None:
    client, server = pair()
    hello, challenge = hello_and_challenge(client, server)
    (proof,) = client.receive(challenge)
    bad = bytearray(bytes.fromhex(proof.meta["proof"]))
    bad[0] ^= 1
    with pytest.raises(AuthenticationError):
        server.receive(Message(MsgType.PROOF, 0, {"proof": bad.hex()}))


def test_reordered_frames_after_handshake() -> None:
    client, server = pair()
    run_handshake(client, server)
    send = client.result.send_mac
    frames = [frame_bytes(Message(MsgType.PING, i, {"i": i}), send) for i in range(3)]
    decoder = FrameDecoder(server.result.recv_mac)
    with pytest.raises(AuthenticationError):
        decode_all(frames[1] + frames[0], decoder)


def test_replayed_and_tampered_frames_after_handshake() -> None:
    client, server = pair()
    run_handshake(client, server)
    send, recv = client.result.send_mac, server.result.recv_mac
    decoder = FrameDecoder(recv)
    first = frame_bytes(Message(MsgType.PING, 1), send)
    assert decode_all(first, decoder)[0].request_id == 1
    with pytest.raises(AuthenticationError):
        decode_all(first, decoder)  # replay
    client2, server2 = pair()
    run_handshake(client2, server2)
    tampered = bytearray(frame_bytes(Message(MsgType.PING, 1), client2.result.send_mac))
    tampered[12] ^= 0xFF  # inside request_id
    with pytest.raises(AuthenticationError):
        decode_all(bytes(tampered), FrameDecoder(server2.result.recv_mac))
    # A server frame reflected back at the server does not verify either.
    reflected = frame_bytes(Message(MsgType.PING), server2.result.send_mac)
    with pytest.raises(AuthenticationError):
        decode_all(reflected, FrameDecoder(server2.result.recv_mac))


def test_insecure_mode_exchanges_names_without_macs(caplog: pytest.LogCaptureFixture) -> None:
    client = Handshake(Role.CLIENT, "alice", None, insecure=True)
    server = Handshake(Role.SERVER, "bob", None, insecure=True)
    with caplog.at_level(logging.WARNING, logger="meshci.wire.handshake"):
        run_handshake(client, server)
    assert client.result.peer_name == "bob" and not client.result.authenticated
    assert client.result.send_mac is None and server.result.recv_mac is None
    assert "insecure connection" in caplog.text


@pytest.mark.parametrize("insecure_side", ["client", "server"])
def test_mode_mismatch_is_refused(insecure_side: str) -> None:
    def make(role: Role, insecure: bool, name: str) -> Handshake:
        return Handshake(role, name, None if insecure else SECRET, insecure=insecure)

    client = make(Role.CLIENT, insecure_side == "client", "alice")
    server = make(Role.SERVER, insecure_side == "server", "bob")
    with pytest.raises(AuthenticationError):
        run_handshake(client, server)
    assert not server.complete


def test_out_of_order_and_unexpected_messages() -> None:
    client, server = pair()
    client.initiate()
    server.initiate()
    with pytest.raises(RemoteProtocolError, match="expected HELLO"):
        server.receive(Message(MsgType.PROOF, 0, {"proof": "00"}))
    with pytest.raises(RemoteProtocolError, match="expected CHALLENGE"):
        client.receive(Message(MsgType.TILE, 0, {}))
    c2, s2 = pair()
    (hello,) = c2.initiate()
    s2.initiate()
    with pytest.raises(RemoteProtocolError, match="no payload"):
        s2.receive(Message(MsgType.HELLO, 0, hello.meta, (torch.zeros(1),)))


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"protocol": "other-9"}, "protocol"),
        ({"name": "bob"}, "own name"),
        ({"name": "bad name!"}, "invalid peer name"),
        ({"name": 5}, "invalid peer name"),
        ({"nonce": "zz"}, "hex"),
        ({"nonce": "ab"}, "32 bytes"),
    ],
)
def test_bad_hello_fields(patch: dict, match: str) -> None:
    client, server = pair()
    (hello,) = client.initiate()
    server.initiate()
    with pytest.raises(RemoteProtocolError, match=match):
        server.receive(Message(MsgType.HELLO, 0, {**hello.meta, **patch}))


def test_peer_error_message_is_reported() -> None:
    client, _ = pair()
    client.initiate()
    with pytest.raises(AuthenticationError, match="refused the handshake: go away"):
        client.receive(Message(MsgType.ERROR, 0, {"reason": "go away"}))


def test_local_misuse() -> None:
    with pytest.raises(LocalProtocolError, match="secret"):
        Handshake(Role.CLIENT, "alice", None)
    with pytest.raises(LocalProtocolError, match="secret"):
        Handshake(Role.CLIENT, "alice", b"short")
    with pytest.raises(LocalProtocolError, match="insecure mode takes no secret"):
        Handshake(Role.CLIENT, "alice", SECRET, insecure=True)
    with pytest.raises(LocalProtocolError, match="name"):
        Handshake(Role.CLIENT, "", SECRET)
    client, _ = pair()
    with pytest.raises(LocalProtocolError):
        client.result  # noqa: B018 - not complete yet
