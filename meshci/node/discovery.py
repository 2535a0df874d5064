"""Zero-configuration discovery on the LAN: UDP broadcast beacons (opt-in, `--discover`).

A beacon says "node NAME listens on HOST:PORT (incarnation N)" and when it was sent. It
carries an HMAC with the cluster secret over both, so a node ignores other clusters' beacons
and captured ones replayed after `BEACON_WINDOW_S`; it grants nothing — a node that hears
one only dials the address (the datagram's source address, spoofable, stands in for a
wildcard host), and the TCP handshake decides who answers there.
`encode_beacon`/`decode_beacon` are pure; `DiscoveryProtocol` only moves datagrams.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from meshci.node.fields import FieldError, number
from meshci.node.membership import Address

log = logging.getLogger(__name__)

DEFAULT_DISCOVERY = Address("255.255.255.255", 47474)
BEACON_INTERVAL_S = 2.0
BEACON_WINDOW_S = 30.0  # a beacon older (or newer) than this by our clock is refused
MAX_BEACON_BYTES = 1024
_LABEL = b"meshci-discovery-v1"


class BeaconError(ValueError):
    """A datagram that is not a valid beacon of this cluster."""


def _tag(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, _LABEL + body, hashlib.sha256).hexdigest()


def _body(digest: Any, sent: Any) -> bytes:
    return json.dumps({"node": digest, "sent": sent}, sort_keys=True, separators=(",", ":")).encode()


def encode_beacon(digest: dict[str, Any], secret: bytes | None, now: float) -> bytes:
    """A beacon announcing `digest`, stamped with the sender's wall clock `now` (under the
    MAC: a captured beacon is stale after `BEACON_WINDOW_S`)."""
    sent = round(now, 3)
    beacon = {"meshci": 2, "node": digest, "sent": sent,
              "mac": _tag(secret, _body(digest, sent)) if secret is not None else None}
    data = json.dumps(beacon, separators=(",", ":")).encode()
    if len(data) > MAX_BEACON_BYTES:
        raise BeaconError(f"beacon of {len(data)} bytes exceeds {MAX_BEACON_BYTES}")
    return data


def decode_beacon(data: bytes, secret: bytes | None, now: float) -> dict[str, Any]:
    """The node digest a beacon carries; BeaconError if it is not a fresh beacon of our
    cluster (`now`: this node's wall clock). Every decoding error becomes a BeaconError."""
    if len(data) > MAX_BEACON_BYTES:
        raise BeaconError(f"datagram of {len(data)} bytes is too long for a beacon")
    try:
        beacon = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # any datagram can land on this port (deeply nested JSON too): not ours, say why
        raise BeaconError(f"not JSON: {str(exc)[:80]}") from exc
    if not isinstance(beacon, dict) or beacon.get("meshci") != 2 or not isinstance(beacon.get("node"), dict):
        raise BeaconError("not a meshci beacon")
    digest, sent, mac = beacon["node"], beacon.get("sent"), beacon.get("mac")
    try:
        number(sent, "sent", lo=now - BEACON_WINDOW_S, hi=now + BEACON_WINDOW_S)  # the MAC covers it as sent
    except FieldError as exc:
        raise BeaconError(f"stale or future beacon: {exc}") from exc
    if secret is None:
        if mac is not None:
            raise BeaconError("beacon of an authenticated cluster (this node runs --insecure)")
        return digest
    if not isinstance(mac, str) or not mac.isascii() or not hmac.compare_digest(
            mac, _tag(secret, _body(digest, sent))):
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
            digest = decode_beacon(data, self.secret, time.time())
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
