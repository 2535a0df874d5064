"""Errors of the wire layer.

As in h11, a mistake of our own (`LocalProtocolError`) is kept apart from a mistake of the
peer (`RemoteProtocolError`): the first is a bug in the caller, the second means the
connection must be dropped because the byte stream is in an unknown state.
"""

from __future__ import annotations

from meshci.errors import MeshciError


class WireError(Exception):
    """Base class of every error raised by `meshci.wire`."""


class LocalProtocolError(WireError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(WireError):
    """The peer sent something malformed; the connection must be aborted."""


class AuthenticationError(RemoteProtocolError):
    """The peer failed to prove the cluster secret, or a frame's MAC did not verify."""


class ConnectionClosed(WireError):
    """The peer closed the connection (cleanly, between frames) or it was reset."""


class HandshakeTimeout(WireError):
    """The peer did not complete the handshake in time."""


class HandshakeRefused(WireError):
    """A connection refused before its handshake because too many were already running."""


class UntrustedPeerError(WireError):
    """Refused to unpickle data from a peer that has not proven the cluster secret."""


class SecretFileError(MeshciError):
    """A cluster secret file that is missing, unreadable or too short."""
