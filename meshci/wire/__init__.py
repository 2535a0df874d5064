"""The wire: frames (sans-IO codec), the HMAC handshake (sans-IO), and the asyncio
`Connection` that moves their bytes. See docs/architecture.md, "Wire"."""

from meshci.wire.blobs import pickle_blob, unpickle_trusted
from meshci.wire.connection import Connection, FrameArrival, HandshakeLimiter
from meshci.wire.errors import (
    AuthenticationError,
    ConnectionClosed,
    HandshakeRefused,
    HandshakeTimeout,
    LocalProtocolError,
    RemoteProtocolError,
    SecretFileError,
    UntrustedPeerError,
    WireError,
)
from meshci.wire.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    Direction,
    FrameDecoder,
    FrameMac,
    encode,
    encode_chunks,
)
from meshci.wire.handshake import Handshake, HandshakeResult, Role, valid_name
from meshci.wire.messages import BLOB_KINDS, Message, MsgType, same_message
from meshci.wire.secret_file import generate_secret, load_secret, write_secret
from meshci.wire.tls import TlsConfigError, client_tls_context, server_tls_context

__all__ = [
    "AuthenticationError",
    "BLOB_KINDS",
    "Connection",
    "ConnectionClosed",
    "DEFAULT_MAX_FRAME_BYTES",
    "Direction",
    "FrameDecoder",
    "FrameMac",
    "Handshake",
    "FrameArrival",
    "HandshakeLimiter",
    "HandshakeRefused",
    "HandshakeResult",
    "HandshakeTimeout",
    "LocalProtocolError",
    "Message",
    "MsgType",
    "RemoteProtocolError",
    "Role",
    "SecretFileError",
    "TlsConfigError",
    "UntrustedPeerError",
    "WireError",
    "client_tls_context",
    "encode",
    "encode_chunks",
    "generate_secret",
    "load_secret",
    "pickle_blob",
    "same_message",
    "server_tls_context",
    "unpickle_trusted",
    "valid_name",
    "write_secret",
]
