"""cloudpickle blobs: made only for what needs Python objects (a user's model code), and
unpickled only when the sending peer has proven the cluster secret."""

from __future__ import annotations

from typing import Any, Protocol

import cloudpickle

from meshci.wire.errors import UntrustedPeerError


class _Peer(Protocol):
    authenticated: bool
    peer_name: str


def pickle_blob(obj: Any) -> bytes:
    """cloudpickle `obj` for `Message.blob` (kinds in BLOB_KINDS only)."""
    return cloudpickle.dumps(obj)


def unpickle_trusted(conn: _Peer, blob: bytes) -> Any:
    """Unpickle a blob received on `conn`; refuses unless `conn` is authenticated."""
    if not getattr(conn, "authenticated", False):
        raise UntrustedPeerError(
            f"refusing to unpickle data from unauthenticated peer {getattr(conn, 'peer_name', '?')!r}"
        )
    return cloudpickle.loads(blob)
