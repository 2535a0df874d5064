"""LAN discovery beacons (pure): only this cluster's fresh beacons are accepted, and any
datagram that is not one is a BeaconError, never another exception."""

from __future__ import annotations

import json

import pytest

from meshci.node.discovery import BEACON_WINDOW_S, MAX_BEACON_BYTES, BeaconError, decode_beacon, encode_beacon

DIGEST = {"name": "n1", "host": "0.0.0.0", "port": 7000, "incarnation": 5}
SECRET = b"s" * 32
NOW = 1_700_000_000.0


def test_round_trip_with_and_without_secret() -> None:
    assert decode_beacon(encode_beacon(DIGEST, SECRET, NOW), SECRET, NOW + 1.0) == DIGEST
    assert decode_beacon(encode_beacon(DIGEST, None, NOW), None, NOW) == DIGEST


@pytest.mark.parametrize("data,secret", [
    (encode_beacon(DIGEST, b"t" * 32, NOW), SECRET),      # another cluster
    (encode_beacon(DIGEST, None, NOW), SECRET),           # an insecure node's beacon
    (encode_beacon(DIGEST, SECRET, NOW), None),           # we are insecure, it is not
    (encode_beacon(DIGEST, SECRET, NOW - BEACON_WINDOW_S - 1), SECRET),  # captured and replayed later
    (encode_beacon(DIGEST, SECRET, NOW + BEACON_WINDOW_S + 1), SECRET),  # from the future
    (json.dumps({"meshci": 2, "node": DIGEST, "sent": NOW, "mac": "é" * 64}).encode(), SECRET),  # non-ASCII MAC
    (json.dumps({"meshci": 2, "node": DIGEST, "sent": NOW, "mac": None}).encode(), SECRET),
    (json.dumps({"meshci": 2, "node": DIGEST, "sent": 10 ** 400}).encode(), None),
    (b"[" * 1000 + b"]" * 1000, SECRET),             # nested past the parser's recursion limit
    (b"\xff\x00garbage", SECRET),
    (b"[1, 2]", SECRET),
    (json.dumps({"meshci": 2, "node": DIGEST}).encode(), None),
    (b" " * (MAX_BEACON_BYTES + 1), None),
])
def test_foreign_or_malformed_beacons_are_rejected(data: bytes, secret: bytes | None) -> None:
    with pytest.raises(BeaconError):
        decode_beacon(data, secret, NOW)


def test_tampered_beacon_is_rejected() -> None:
    beacon = json.loads(encode_beacon(DIGEST, SECRET, NOW))
    beacon["node"]["port"] = 7001
    with pytest.raises(BeaconError):
        decode_beacon(json.dumps(beacon).encode(), SECRET, NOW)
    beacon = json.loads(encode_beacon(DIGEST, SECRET, NOW - 100.0))
    beacon["sent"] = NOW  # a stale beacon made to look fresh: the stamp is under the MAC
    with pytest.raises(BeaconError):
        decode_beacon(json.dumps(beacon).encode(), SECRET, NOW)
