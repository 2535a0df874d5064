"""A device's speed against its measured curves, learned from the tiles it computes."""

from __future__ import annotations

import pytest

from meshci.cost.profiling import SpeedCorrection

CURVE = ((0.001, 0.0002), (0.002, 0.0004))


def test_a_device_slower_than_its_curves_advertises_slower_curves_in_steps() -> None:
    speed = SpeedCorrection(alpha=0.5, step=1.15)
    assert speed.factor("m") == 1.0 and speed.curve("m", CURVE) is CURVE
    assert speed.observe("m", 0.100, 0.220)  # measured while busy: curves 2.2x too fast
    assert speed.factor("m") == pytest.approx(1.15 ** 6)  # 2.2 in steps of 1.15: 2.31
    scaled = speed.curve("m", CURVE)
    assert scaled[1] == pytest.approx((0.002 * 1.15 ** 6, 0.0004 * 1.15 ** 6))
    # a sample that moves the EWMA less than a step changes nothing advertised
    assert not speed.observe("m", 0.100, 0.230)
    assert speed.factor("other") == 1.0


def test_the_correction_follows_the_device_back_and_ignores_noise() -> None:
    speed = SpeedCorrection(alpha=0.5)
    speed.observe("m", 0.100, 0.300)
    for _ in range(12):
        speed.observe("m", 0.100, 0.100)  # the contention ended
    assert speed.factor("m") == 1.0
    assert not speed.observe("m", 0.0005, 0.050)  # a tile too short to say anything
    assert not speed.observe("m", 0.100, float("nan")) and not speed.observe("m", 0.100, 0.0)
    speed.observe("m", 0.100, 1e6)  # a stalled tile counts at most 10x
    assert speed.ratios["m"] <= 10.0


def test_noise_at_a_steps_edge_does_not_flap_the_advertised_curves() -> None:
    speed = SpeedCorrection(alpha=0.3, step=1.15)
    speed.observe("m", 0.100, 0.1075)  # halfway between two steps (1.0 and 1.15)
    changes = sum(speed.observe("m", 0.100, t) for t in [0.104, 0.111, 0.103, 0.112, 0.105, 0.110] * 5)
    assert changes == 0  # each change re-plans the mesh: noise must not cause one
