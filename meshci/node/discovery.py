"""Zero-configuration discovery on the LAN: UDP broadcast beacons (opt-in, `--discover`).

A beacon says "node NAME listens on HOST:PORT (incarnation N)". It carries an HMAC with
the cluster secret so a node ignores other clusters' beacons; it grants nothing — a node
that hears one only dials the address, and the TCP handshake authenticates as usual.
`encode_beacon`/`decode_beacon` are pure; `DiscoveryProtocol` only moves datagrams.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from meshci.node.membership import Address

log = logging.getLogger(__name__)

DEFAULT_DISCOVERY = Address("255.255.255.255", 47474)
BEACON_INTERVAL_S = 2.0
MAX_BEACON_BYTES = 1024
_LABEL = b"meshci-discovery-v1"


class BeaconError(ValueError):
    """A datagram that is not a valid beacon of this cluster."""


def _tag(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, _LABEL + body, hashlib.sha256).hexdigest()


def encode_beacon(digest: dict[str, Any], secret: bytes | None) -> bytes:
    body = json.dumps(digest, sort_keys=True, separators=(",", ":")).encode()
    beacon = {"meshci": 1, "node": digest, "mac": _tag(secret, body) if secret is not None else None}
    data = json.dumps(beacon, separators=(",", ":")).encode()
    if len(data) > MAX_BEACON_BYTES:
        raise BeaconError(f"beacon of {len(data)} bytes exceeds {MAX_BEACON_BYTES}")
    return data


def decode_beacon(data: bytes, secret: bytes | None) -> dict[str, Any]:
    """The node digest a beacon carries; BeaconError if it is not one of our cluster's."""
    if len(data) > MAX_BEACON_BYTES:
        raise BeaconError(f"datagram of {len(data)} bytes is too long for a beacon")
    try:
        beacon = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        # any datagram can land on this port: not ours, say why
        raise BeaconError(f"not JSON: {exc}") from exc
    if not isinstance(beacon, dict) or beacon.get("meshci") != 1 or not isinstance(beacon.get("node"), dict):
        raise BeaconError("not a meshci beacon")
    digest = beacon["node"]
    body = json.dumps(digest, sort_keys=True, separators=(",", ":")).encode()
    mac = beacon.get("mac")
    if secret is None:
        if mac is not None:
            raise BeaconError("beacon of an authenticated cluster (this node runs --insecure)")
    elif not isinstance(mac, str) or not hmac.compare_digest(mac, _tag(secret, body)):
        raise BeaconError("beacon of another cluster (MAC does not verify)")
    return digest


class DiscoveryProtocol(asyncio.DatagramProtocol):
    """Receives beacons and hands valid ones (with the sender's IP) to `on_beacon`."""

    def __init__(self, secret: bytes | None, on_beacon: Callable[[dict[str, Any], str], None]) -> None:
        self.secret = secret
        self.on_beacon = on_beacon
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            digest = decode_beacon(data, self.secret)
        except BeaconError as exc:
            # foreign or malformed datagram on our port: ignore it, keep listening
            log.debug("ignoring datagram from %s: %s", addr[0], exc)
            return
        self.on_beacon(digest, addr[0])


def discovery_socket(port: int) -> socket.socket:
    """A UDP socket on `port` that several local nodes can share, allowed to broadcast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.bind(("", port))
    sock.setblocking(False)
    return sock
