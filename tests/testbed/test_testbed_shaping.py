"""Shaped links, measured: the rate htb gives, the delay netem or the relay adds."""

from __future__ import annotations

import pytest

from meshci.testbed import commands
from meshci.testbed.errors import TestbedError
from meshci.testbed.netns import leftovers, topology
from meshci.testbed.probe import ProbeServer, measure_loss, measure_rtt, measure_throughput
from meshci.testbed.shaping import RELAY_NOTE, LinkShape, Shaper, htb_burst_bytes

pytestmark = pytest.mark.testbed

# htb counts Ethernet+IP+TCP headers (66 bytes per 1448-byte segment): the payload rate
# can be at most 1448/1514 = 95.6% of the shaped rate.
TOLERANCE = 0.15


@pytest.mark.slow
@pytest.mark.parametrize("rate_mbit", [20, 100])
def test_measured_rate_matches_the_htb_rate(needs_tc: None, rate_mbit: int) -> None:
    with topology(3) as net, Shaper(net) as shaper:
        a, b, c = net.hosts
        report = shaper.shape(a, b, LinkShape(rate_mbit=rate_mbit))
        assert report.rate == "htb" and report.delay is None and report.loss is None
        server = ProbeServer.start(net, b, port=5401)
        # about one second of data at the shaped rate
        measured = measure_throughput(net, a, server.address, nbytes=int(rate_mbit * 1e6 / 8))
        assert measured["mbps"] == pytest.approx(rate_mbit, rel=TOLERANCE)
        # the pair a<->c is not shaped: it runs far above the a<->b rate
        other = ProbeServer.start(net, c, port=5402)
        unshaped = measure_throughput(net, a, other.address, nbytes=int(rate_mbit * 1e6 / 8))
        assert unshaped["mbps"] > 2 * rate_mbit


def test_relay_delay_is_measured_on_the_round_trip(needs_tc: None) -> None:
    delay_ms = 15.0
    with topology(2) as net, Shaper(net, delay_mode="relay") as shaper:
        a, b = net.hosts
        report = shaper.shape(a, b, LinkShape(rate_mbit=50, delay_ms=delay_ms))
        assert report.rate == "htb" and report.delay == "relay" and report.loss is None
        assert RELAY_NOTE in report.notes
        server = ProbeServer.start(net, b, port=5403)
        direct = measure_rtt(net, a, server.address, count=10)
        via = shaper.endpoint(a, b, server.port)
        assert via != server.address
        delayed = measure_rtt(net, a, via, count=10)
        # one-way delay each way: the round trip grows by twice the delay
        assert delayed["median_ms"] - direct["median_ms"] == pytest.approx(2 * delay_ms, abs=5.0)
        assert delayed["min_ms"] >= 2 * delay_ms
        # the reverse direction uses its own relay on a
        assert shaper.endpoint(b, a, 5403) != shaper.endpoint(a, b, 5403)


def test_netem_delay_when_the_kernel_has_it(needs_tc: None) -> None:
    delay_ms = 15.0
    with topology(2) as net, Shaper(net, delay_mode="auto") as shaper:
        a, b = net.hosts
        report = shaper.shape(a, b, LinkShape(rate_mbit=50, delay_ms=delay_ms))
        if report.delay != "netem":
            pytest.skip("qdisc netem not in this kernel (the relay was used instead)")
        server = ProbeServer.start(net, b, port=5404)
        assert shaper.endpoint(a, b, server.port) == server.address
        measured = measure_rtt(net, a, server.address, count=10)
        assert measured["median_ms"] == pytest.approx(2 * delay_ms, abs=5.0)


def test_demanding_netem_without_it_fails_clearly(needs_tc: None) -> None:
    with topology(2) as net, Shaper(net, delay_mode="netem") as shaper:
        a, b = net.hosts
        try:
            report = shaper.shape(a, b, LinkShape(delay_ms=5))
        except TestbedError as exc:
            assert "netem" in str(exc)
        else:
            assert report.delay == "netem"


def test_shaper_close_removes_qdiscs_and_relays(needs_tc: None) -> None:
    with topology(2) as net:
        a, b = net.hosts
        with Shaper(net, delay_mode="relay") as shaper:
            shaper.shape(a, b, LinkShape(rate_mbit=10, delay_ms=5))
            shaper.endpoint(a, b, 5405)
            processes = shaper.relay_processes()
            assert len(processes) == 1 and processes[0].poll() is None
            assert "htb" in net.run(a, ["tc", "qdisc", "show", "dev", a.ifname]).stdout
        assert all(p.poll() is not None for p in processes)
        assert "htb" not in net.run(a, ["tc", "qdisc", "show", "dev", a.ifname]).stdout
        assert shaper.report(a, b).rate is None
    assert leftovers(net.prefix) == []


def test_shaping_a_link_twice_is_refused(needs_tc: None) -> None:
    with topology(2) as net, Shaper(net) as shaper:
        a, b = net.hosts
        shaper.shape(a, b, LinkShape(rate_mbit=10))
        with pytest.raises(TestbedError, match="already shaped"):
            shaper.shape(a, b, LinkShape(rate_mbit=20))


def test_link_shape_validation_and_burst() -> None:
    with pytest.raises(TestbedError):
        LinkShape(rate_mbit=0)
    with pytest.raises(TestbedError):
        LinkShape(delay_ms=-1)
    with pytest.raises(TestbedError):
        LinkShape(loss_pct=100)
    # the bucket holds at least two GSO super-packets, and 2 ms at high rates
    assert htb_burst_bytes(1) >= 2 * 65536
    assert htb_burst_bytes(10_000) == int(10_000e6 / 8 * 0.002)
    assert commands.find_tool("definitely-not-a-tool-here") is None


@pytest.mark.slow
def test_measured_loss_matches_the_configured_loss(needs_tc: None) -> None:
    with topology(2) as net, Shaper(net) as shaper:
        a, b = net.hosts
        server = ProbeServer.start(net, b, port=5406)
        assert measure_loss(net, a, server.address, count=500)["loss"] == 0.0
        # outward only: the echoes come back unharmed, so the loss read is the one-way loss
        report = shaper.shape(a, b, LinkShape(rate_mbit=50, loss_pct=10), both_ways=False)
        if report.loss is None:
            pytest.skip("; ".join(report.notes))
        assert report.loss in ("netem", "bpf")
        measured = measure_loss(net, a, server.address, count=2000)
        # binomial: 2000 samples at 10% have a standard deviation of 0.67 points
        assert measured["loss"] == pytest.approx(0.10, abs=0.035)
        # TCP still delivers every byte over the lossy link
        assert measure_throughput(net, a, server.address, nbytes=500_000)["bytes"] == 500_000
    assert leftovers(net.prefix) == []
