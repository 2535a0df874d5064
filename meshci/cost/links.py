"""Link estimates between peers: exponentially weighted bandwidth and round-trip time.

Pure (sans-IO): the node feeds it probe results (`observe_rtt` from ping/pong,
`observe_transfer` from a timed probe payload or any real tile transfer) and asks for a
`LinkSpec` when it builds the live `Cluster` for planning. Nothing here reads a clock or
a socket; callers pass durations they measured.

Bandwidth samples come from transfers: ``bits / (seconds - one-way latency)``, where the
one-way latency is half the current RTT estimate. Transfers too small to say anything
about bandwidth (below ``min_bytes``) are ignored for bandwidth. Each estimate is an
EWMA with weight ``alpha`` on the newest sample; the first sample sets it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshci.cost.cluster import LinkSpec


@dataclass
class _Estimate:
    mbps: float | None = None
    rtt_s: float | None = None
    samples: int = 0
    # arrivals: decayed sums of bytes and of the seconds they took (their ratio is the rate)
    arrived_bytes: float = 0.0
    arrived_s: float = 0.0


@dataclass
class LinkEstimator:
    """EWMA bandwidth and RTT per peer name."""

    alpha: float = 0.3
    min_bytes: int = 16 * 1024
    _peers: dict[str, _Estimate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")

    def _ewma(self, old: float | None, sample: float) -> float:
        return sample if old is None else (1.0 - self.alpha) * old + self.alpha * sample

    def observe_rtt(self, peer: str, rtt_s: float) -> None:
        """A round trip of a tiny message (probe/pong) took ``rtt_s`` seconds."""
        if not math.isfinite(rtt_s) or rtt_s < 0:
            return
        est = self._peers.setdefault(peer, _Estimate())
        est.rtt_s = self._ewma(est.rtt_s, rtt_s)
        est.samples += 1

    def observe_transfer(self, peer: str, n_bytes: int, seconds: float) -> None:
        """``n_bytes`` went to or came from ``peer`` in ``seconds`` (send start to ack, or
        first to last byte)."""
        if n_bytes < self.min_bytes or not math.isfinite(seconds) or seconds <= 0:
            return
        est = self._peers.setdefault(peer, _Estimate())
        one_way = (est.rtt_s or 0.0) / 2.0
        wire = max(seconds - one_way, seconds * 0.1)
        est.mbps = self._ewma(est.mbps, n_bytes * 8.0 / wire / 1e6)
        est.samples += 1

    def observe_arrival(self, peer: str, n_bytes: int, seconds: float) -> None:
        """``n_bytes`` from ``peer`` arrived here over ``seconds`` (from the first read of
        a frame to its last byte, so no latency is in it): a bandwidth sample as delivered.

        The estimate is the recent bytes over the recent seconds they took (both sums decay
        by ``1 - alpha`` per sample), not an average of per-frame rates: a frame that reached
        the receiver in a burst (an emulated link's relay or a switch releasing a queue, the
        receiver's own process paused) has a high rate but few seconds, so it moves the
        estimate by its seconds, not by its rate."""
        if n_bytes < self.min_bytes or not math.isfinite(seconds) or seconds <= 0:
            return
        est = self._peers.setdefault(peer, _Estimate())
        keep = 1.0 - self.alpha
        est.arrived_bytes = keep * est.arrived_bytes + n_bytes
        est.arrived_s = keep * est.arrived_s + seconds
        est.mbps = est.arrived_bytes * 8.0 / est.arrived_s / 1e6
        est.samples += 1

    def measured_mbps(self, peer: str) -> float | None:
        """The bandwidth measured to or from ``peer``, None before any sample."""
        est = self._peers.get(peer)
        return None if est is None else est.mbps

    def estimate(self, peer: str, default: LinkSpec) -> LinkSpec:
        """Best current `LinkSpec` to ``peer``; fields not yet measured come from ``default``."""
        est = self._peers.get(peer)
        if est is None:
            return default
        mbps = est.mbps if est.mbps is not None else default.mbps
        latency_ms = est.rtt_s * 500.0 if est.rtt_s is not None else default.latency_ms
        return LinkSpec(mbps=mbps, latency_ms=latency_ms)

    def known(self) -> dict[str, LinkSpec]:
        """Peers with at least one sample, with their estimate (unmeasured fields: 100 Mbit/s, 1 ms)."""
        fallback = LinkSpec(100.0, 1.0)
        return {peer: self.estimate(peer, fallback) for peer in self._peers}

    def forget(self, peer: str) -> None:
        self._peers.pop(peer, None)
