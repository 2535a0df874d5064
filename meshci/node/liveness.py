"""Links that heal and liveness that load cannot fool (sans-IO: time is passed in).

Two small state machines the node's IO shell (`meshci.node.keeper`) drives on every
heartbeat tick:

* `Redialer` — when to dial a peer whose connection is gone: at once the first time, then
  with exponential back-off (full jitter, capped at `REDIAL_CAP_S`), one dial in flight per
  peer; a successful dial resets it. A partitioned mesh therefore rejoins within about
  `REDIAL_CAP_S` plus a handshake after the partition ends, and a peer that is really gone
  costs one refused connect every couple of seconds until its tombstone expires.
* `ArrivalWindow` — a phi-accrual style failure detector for one peer: the mean and
  deviation (EWMA) of the gaps between moments its bytes were heard. A peer is suspect or
  dead only once it has been silent far beyond what its link has shown (`mean + K·σ`, plus
  a few round trips), never sooner than the fixed base timeouts. A busy device whose
  heartbeats come every 2 s instead of every 0.5 s, or a link whose round trip is a second,
  moves the threshold out instead of getting a live peer declared dead.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

REDIAL_BASE_S = 0.25  # the first retry after a failed dial waits up to this
REDIAL_CAP_S = 2.0  # ... and no retry waits longer than this (a few heartbeat intervals)

# failure detection: the threshold is mean + DEVIATIONS * sigma of the observed gaps (a
# normal model of the gaps: phi = -log10(P(gap > t)) ~ 9 at 6 sigma), plus RTTS round trips
DEVIATIONS = 6.0
RTTS = 4.0
MIN_SIGMA_SHARE = 0.25  # sigma is at least this share of the mean (few, regular samples)
EWMA_ALPHA = 0.125  # weight of a new gap (TCP's SRTT weight)
MIN_GAP_S = 0.05  # arrivals closer than this are one burst, not a gap
MAX_DEAD_AFTER_S = 30.0  # however slow the link looked, a peer silent this long is dead


@dataclass
class _Dialing:
    failures: int = 0
    next_at: float = 0.0
    in_flight: bool = False


class Redialer:
    """Back-off state of the peers this node has to (re)dial."""

    def __init__(self, *, base_s: float = REDIAL_BASE_S, cap_s: float = REDIAL_CAP_S,
                 rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng or random.Random()
        self._state: dict[str, _Dialing] = {}

    def due(self, name: str, now: float) -> bool:
        """Whether to dial `name` now (its connection is missing): no dial to it in flight,
        and its back-off has passed. True means the caller dials and reports the outcome."""
        state = self._state.setdefault(name, _Dialing())
        if state.in_flight or now < state.next_at:
            return False
        state.in_flight = True
        return True

    def succeeded(self, name: str) -> None:
        """The dial worked: the next loss of this peer is redialled at once."""
        self._state.pop(name, None)

    def failed(self, name: str, now: float) -> float:
        """The dial failed: wait `min(cap, base * 2**failures)`, jittered down to half of
        it (peers that lost each other at the same moment do not dial in lock step).
        Returns the wait."""
        state = self._state.setdefault(name, _Dialing())
        state.in_flight = False
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(state.failures, 30))
        state.failures += 1
        wait = ceiling * self._rng.uniform(0.5, 1.0)
        state.next_at = now + wait
        return wait

    def forget(self, name: str) -> None:
        """Stop tracking `name` (it left the mesh, or its tombstone expired)."""
        self._state.pop(name, None)

    def failures(self, name: str) -> int:
        state = self._state.get(name)
        return state.failures if state is not None else 0

    def tracked(self) -> list[str]:
        return sorted(self._state)


class ArrivalWindow:
    """When one peer was last heard and how regular its arrivals have been."""

    def __init__(self, now: float, expected_gap_s: float) -> None:
        self.last = now
        self.mean = expected_gap_s  # starts at the heartbeat interval
        self.var = (expected_gap_s * MIN_SIGMA_SHARE) ** 2
        self.rtt = 0.0
        self.samples = 0

    def heard(self, t: float) -> None:
        """Bytes of the peer arrived at `t` (older or bunched arrivals teach nothing)."""
        gap = t - self.last
        if gap < MIN_GAP_S:
            self.last = max(self.last, t)
            return
        self.last = t
        delta = gap - self.mean
        self.mean += EWMA_ALPHA * delta
        self.var = (1 - EWMA_ALPHA) * (self.var + EWMA_ALPHA * delta * delta)
        self.samples += 1

    def observe_rtt(self, rtt: float) -> None:
        if math.isfinite(rtt) and rtt >= 0:
            self.rtt = rtt if not self.rtt else self.rtt + EWMA_ALPHA * (rtt - self.rtt)

    def threshold(self, base_s: float) -> float:
        """Silence after which the peer passes `base_s`'s stage (suspect or dead): the base,
        or what its own arrivals make unremarkable, whichever is longer (capped)."""
        sigma = max(math.sqrt(max(self.var, 0.0)), self.mean * MIN_SIGMA_SHARE)
        learned = self.mean + DEVIATIONS * sigma + RTTS * self.rtt
        return min(max(base_s, learned), max(base_s, MAX_DEAD_AFTER_S))

    def phi(self, now: float) -> float:
        """Suspicion as phi-accrual states it: -log10 of the chance that a live peer stays
        silent this long (normal model of the gaps); for reports."""
        sigma = max(math.sqrt(max(self.var, 0.0)), self.mean * MIN_SIGMA_SHARE)
        z = (now - self.last - self.mean) / (sigma * math.sqrt(2.0))
        tail = 0.5 * math.erfc(z)
        return -math.log10(max(tail, 1e-300))
