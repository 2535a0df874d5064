"""EWMA link estimates fed by probes and transfers."""

from __future__ import annotations

import math

import pytest

from meshci.cost import LinkEstimator, LinkSpec

DEFAULT = LinkSpec(100.0, 2.0)


def test_unknown_peer_gets_default():
    assert LinkEstimator().estimate("p", DEFAULT) == DEFAULT


def test_converges_to_measured_values():
    est = LinkEstimator(alpha=0.5)
    for _ in range(30):
        est.observe_rtt("p", 0.010)
        # 1 MB in 0.085 s + half the RTT: 100 Mbit/s on the wire
        est.observe_transfer("p", 1_000_000, 0.08 + 0.005)
    spec = est.estimate("p", DEFAULT)
    assert spec.latency_ms == pytest.approx(5.0)
    assert spec.mbps == pytest.approx(100.0, rel=1e-3)


def test_ewma_weights_new_samples():
    est = LinkEstimator(alpha=0.25)
    est.observe_transfer("p", 1_000_000, 0.8)  # 10 Mbit/s
    est.observe_transfer("p", 1_000_000, 0.08)  # 100 Mbit/s
    assert est.estimate("p", DEFAULT).mbps == pytest.approx(0.75 * 10 + 0.25 * 100)


def test_ignores_useless_samples():
    est = LinkEstimator(min_bytes=1000)
    est.observe_transfer("p", 10, 0.001)  # too small to say anything about bandwidth
    est.observe_transfer("p", 10_000, 0.0)
    est.observe_transfer("p", 10_000, math.nan)
    est.observe_rtt("p", -1.0)
    assert est.estimate("p", DEFAULT) == DEFAULT
    assert est.known() == {}
    est.observe_rtt("p", 0.004)
    assert est.known()["p"].latency_ms == pytest.approx(2.0)
    est.forget("p")
    assert est.known() == {}


def test_bad_alpha():
    with pytest.raises(ValueError):
        LinkEstimator(alpha=0.0)


def test_arrival_samples_are_pure_bandwidth() -> None:
    est = LinkEstimator()
    est.observe_rtt("p", 0.010)
    est.observe_arrival("p", 1_250_000, 0.1)  # 10 Mbit in 0.1 s: no latency to take off
    assert est.measured_mbps("p") == pytest.approx(100.0)
    assert est.measured_mbps("q") is None
    est.observe_arrival("p", 100, 0.0)  # too small / no time: ignored
    assert est.estimate("p", LinkSpec(1.0, 1.0)).mbps == pytest.approx(100.0)


def test_a_burst_moves_the_delivered_rate_by_its_seconds_not_its_rate() -> None:
    est = LinkEstimator(alpha=0.3)
    for _ in range(10):
        est.observe_arrival("p", 1_250_000, 0.1)  # a steady 100 Mbit/s link
    est.observe_arrival("p", 262_144, 0.002)  # one frame released in a burst: ~1000 Mbit/s
    assert 100.0 < est.measured_mbps("p") < 115.0  # an EWMA of rates would read ~380
    est.observe_arrival("p", 125_000, 0.1)  # the link slowed to 10 Mbit/s: followed, not ignored
    assert est.measured_mbps("p") < 85.0
