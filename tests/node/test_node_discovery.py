"""LAN discovery beacons (pure): only this cluster's beacons are accepted."""

from __future__ import annotations

import json

import pytest

from meshci.node.discovery import MAX_BEACON_BYTES, BeaconError, decode_beacon, encode_beacon

DIGEST = {"name": "n1", "host": "0.0.0.0", "port": 7000, "incarnation": 5}
SECRET = b"s" * 32


def test_round_trip_with_and_without_secret() -> None:
    assert decode_beacon(encode_beacon(DIGEST, SECRET), SECRET) == DIGEST
    assert decode_beacon(encode_beacon(DIGEST, None), None) == DIGEST


@pytest.mark.parametrize("data,secret", [
    (encode_beacon(DIGEST, b"t" * 32), SECRET),      # another cluster
    (encode_beacon(DIGEST, None), SECRET),           # an insecure node's beacon
    (encode_beacon(DIGEST, SECRET), None),           # we are insecure, it is not
    (b"\xff\x00garbage", SECRET),
    (b"[1, 2]", SECRET),
    (json.dumps({"meshci": 2, "node": DIGEST}).encode(), None),
    (b" " * (MAX_BEACON_BYTES + 1), None),
])
def test_foreign_or_malformed_beacons_are_rejected(data: bytes, secret: bytes | None) -> None:
    with pytest.raises(BeaconError):
        decode_beacon(data, secret)


def test_tampered_beacon_is_rejected() -> None:
    beacon = json.loads(encode_beacon(DIGEST, SECRET))
    beacon["node"]["port"] = 7001
    with pytest.raises(BeaconError):
        decode_beacon(json.dumps(beacon).encode(), SECRET)
