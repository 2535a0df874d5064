"""Sans-IO handshake: both peers prove the cluster secret and agree on per-connection keys.

    client -> server  HELLO      {protocol, mode, name: Nc, nonce: rc}
    server -> client  CHALLENGE  {protocol, mode, name: Ns, nonce: rs, proof: HMAC(K, "server" | T)}
    client -> server  PROOF      {proof: HMAC(K, "client" | T)}

T is the transcript (protocol label, mode, Nc, rc, Ns, rs), each field length-prefixed. Each
side's proof covers the nonce the *other* side just drew at random, so a recorded transcript
cannot be replayed, and the role label keeps one side's proof from being reflected as the
other's. Both then derive session = HMAC(K, "session" | T) and one frame-MAC key per
direction; every later frame carries a MAC over (direction, sequence, frame).

Insecure mode (explicit, for closed test networks only) runs the same three messages to
exchange names but proves nothing and yields no MAC keys; both peers must agree on the mode.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from meshci.wire.errors import AuthenticationError, LocalProtocolError, RemoteProtocolError
from meshci.wire.frames import Direction, FrameMac
from meshci.wire.messages import Message, MsgType

log = logging.getLogger(__name__)

PROTOCOL_LABEL = "meshci-wire-1"
NONCE_BYTES = 32
MIN_SECRET_BYTES = 16
# Handshake frames are tiny; a peer that has proven nothing may not make us allocate more.
HANDSHAKE_MAX_FRAME_BYTES = 16 << 10
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")  # whole name (fullmatch): no "x\n"


class Role(str, Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class HandshakeResult:
    """What a completed handshake established."""

    peer_name: str
    authenticated: bool
    send_mac: FrameMac | None
    recv_mac: FrameMac | None


def valid_name(name: str) -> bool:
    """Node names: 1-64 characters of letters, digits and `._:@-`, starting alphanumeric."""
    return isinstance(name, str) and len(name) <= 64 and _NAME.fullmatch(name) is not None


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


class Handshake:
    """One side of the handshake. `initiate()` gives the first messages to send (the client's
    HELLO), `receive(msg)` consumes a peer message and returns the replies; once `complete`,
    `result` holds the peer's name and the frame MACs. Raises RemoteProtocolError (or
    AuthenticationError) on anything unexpected; the caller then closes the connection."""

    def __init__(
        self,
        role: Role | str,
        name: str,
        secret: bytes | None,
        *,
        insecure: bool = False,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.role = Role(role)
        if not valid_name(name):
            raise LocalProtocolError(f"invalid node name {name!r}")
        if insecure:
            if secret is not None:
                raise LocalProtocolError("insecure mode takes no secret")
        elif secret is None or len(secret) < MIN_SECRET_BYTES:
            raise LocalProtocolError(
                f"a cluster secret of at least {MIN_SECRET_BYTES} bytes is required "
                "(or explicit insecure mode)"
            )
        self.name = name
        self.insecure = insecure
        self._secret = secret
        self._mode = "insecure" if insecure else "hmac-sha256"
        self._nonce = random_bytes(NONCE_BYTES)
        self._peer_name: str | None = None
        self._peer_nonce: bytes | None = None
        self._expect: MsgType | None = MsgType.CHALLENGE if self.role is Role.CLIENT else MsgType.HELLO
        self._started = False
        self._result: HandshakeResult | None = None

    @property
    def complete(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> HandshakeResult:
        if self._result is None:
            raise LocalProtocolError("handshake not complete")
        return self._result

    def initiate(self) -> list[Message]:
        if self._started:
            raise LocalProtocolError("handshake already started")
        self._started = True
        if self.role is Role.SERVER:
            return []
        meta = {"protocol": PROTOCOL_LABEL, "mode": self._mode, "name": self.name, "nonce": self._nonce.hex()}
        return [Message(MsgType.HELLO, 0, meta)]

    def receive(self, msg: Message) -> list[Message]:
        if not self._started:
            raise LocalProtocolError("call initiate() first")
        if msg.kind is MsgType.ERROR:
            reason = str(msg.meta.get("reason", "no reason given"))[:200]
            raise AuthenticationError(f"peer refused the handshake: {reason}")
        if self._expect is None or msg.kind is not self._expect:
            expected = self._expect.name if self._expect else "nothing"
            raise RemoteProtocolError(f"expected {expected} during handshake, got {msg.kind.name}")
        if msg.tensors or msg.blob is not None:
            raise RemoteProtocolError(f"{msg.kind.name} must carry no payload")
        if msg.kind is MsgType.HELLO:
            return self._on_hello(msg.meta)
        if msg.kind is MsgType.CHALLENGE:
            return self._on_challenge(msg.meta)
        return self._on_proof(msg.meta)

    # -- steps ---------------------------------------------------------------------------
    def _on_hello(self, meta: dict[str, Any]) -> list[Message]:
        self._check_peer_intro(meta)
        reply: dict[str, Any] = {
            "protocol": PROTOCOL_LABEL,
            "mode": self._mode,
            "name": self.name,
            "nonce": self._nonce.hex(),
        }
        if not self.insecure:
            reply["proof"] = self._proof(b"server").hex()
        self._expect = MsgType.PROOF
        return [Message(MsgType.CHALLENGE, 0, reply)]

    def _on_challenge(self, meta: dict[str, Any]) -> list[Message]:
        self._check_peer_intro(meta)
        if not self.insecure:
            self._check_proof(meta, b"server")
        self._expect = None
        out: dict[str, Any] = {} if self.insecure else {"proof": self._proof(b"client").hex()}
        self._finish()
        return [Message(MsgType.PROOF, 0, out)]

    def _on_proof(self, meta: dict[str, Any]) -> list[Message]:
        if not self.insecure:
            self._check_proof(meta, b"client")
        elif meta:
            raise RemoteProtocolError("unexpected fields in an insecure PROOF")
        self._expect = None
        self._finish()
        return []

    # -- checks and keys -----------------------------------------------------------------
    def _check_peer_intro(self, meta: dict[str, Any]) -> None:
        if meta.get("protocol") != PROTOCOL_LABEL:
            raise RemoteProtocolError(f"peer speaks protocol {meta.get('protocol')!r}, not {PROTOCOL_LABEL}")
        mode = meta.get("mode")
        if mode != self._mode:
            if self.insecure:
                raise AuthenticationError("peer requires the cluster secret but this side runs insecure")
            raise AuthenticationError(f"peer runs in mode {mode!r}; this side requires the cluster secret")
        name = meta.get("name")
        if not isinstance(name, str) or not valid_name(name):
            raise RemoteProtocolError(f"invalid peer name {name!r}")
        if name == self.name:
            raise RemoteProtocolError(f"peer uses this node's own name {name!r}")
        nonce = meta.get("nonce")
        try:
            raw = bytes.fromhex(nonce) if isinstance(nonce, str) else b""
        except ValueError as exc:  # malformed hex from the peer
            raise RemoteProtocolError("nonce is not hex") from exc
        if len(raw) != NONCE_BYTES:
            raise RemoteProtocolError(f"nonce must be {NONCE_BYTES} bytes")
        self._peer_name = name
        self._peer_nonce = raw

    def _transcript(self) -> bytes:
        assert self._peer_name is not None and self._peer_nonce is not None
        if self.role is Role.CLIENT:
            client, client_nonce, server, server_nonce = self.name, self._nonce, self._peer_name, self._peer_nonce
        else:
            client, client_nonce, server, server_nonce = self._peer_name, self._peer_nonce, self.name, self._nonce
        return b"".join(
            _field(x)
            for x in (
                PROTOCOL_LABEL.encode(),
                self._mode.encode(),
                client.encode(),
                client_nonce,
                server.encode(),
                server_nonce,
            )
        )

    def _proof(self, label: bytes) -> bytes:
        assert self._secret is not None
        return _mac(self._secret, label + b" proof", self._transcript())

    def _check_proof(self, meta: dict[str, Any], label: bytes) -> None:
        proof = meta.get("proof")
        try:
            raw = bytes.fromhex(proof) if isinstance(proof, str) else b""
        except ValueError as exc:  # malformed hex from the peer
            raise AuthenticationError("proof is not hex") from exc
        if not hmac.compare_digest(raw, self._proof(label)):
            raise AuthenticationError(
                f"{self._peer_name!r} failed to prove the cluster secret (wrong secret or replay)"
            )

    def _finish(self) -> None:
        assert self._peer_name is not None
        if self.insecure:
            log.warning(
                "insecure connection with %r: peer not authenticated, frames carry no MAC",
                self._peer_name,
            )
            self._result = HandshakeResult(self._peer_name, False, None, None)
            return
        assert self._secret is not None
        session = _mac(self._secret, b"session key", self._transcript())
        c2s = FrameMac(_mac(session, b"client to server", b""), Direction.CLIENT_TO_SERVER)
        s2c = FrameMac(_mac(session, b"server to client", b""), Direction.SERVER_TO_CLIENT)
        if self.role is Role.CLIENT:
            self._result = HandshakeResult(self._peer_name, True, send_mac=c2s, recv_mac=s2c)
        else:
            self._result = HandshakeResult(self._peer_name, True, send_mac=s2c, recv_mac=c2s)
        # Forget the long-term secret as soon as it is no longer needed.
        self._secret = None
