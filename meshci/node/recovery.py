"""What a requester decides when a device of a request is lost, and a request's deadline
(sans-IO: no sockets, no clock; time is passed in).

* `Recovery` — one request's attempts. A device that dies or is cut off while the request
  runs (its connection lost, membership saying it is DEAD, a peer that cannot reach it)
  ends the current attempt; `on_lost` says whether to run the request again on the
  survivors (`Retry`, the lost devices excluded) or to give up with one clear reason
  (`GiveUp`: the deadline passed, too many attempts, nobody left).
* `BackOff` — devices that keep failing are avoided for a while: from the second failure
  in a row, the while doubling with each further failure up to a cap (as Petals bans
  unreliable servers); failures are forgotten after a quiet spell or a request they
  completed.
* `deadline_s` — the deadline an INFER or a PLAN carries, checked as hostile input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshci.node.fields import FieldError

DEFAULT_DEADLINE_S = 300.0  # a cold first request builds the model (up to 240 s on a slow device)
MAX_DEADLINE_S = 900.0  # what a client may ask for; worker state outlives no request longer
MIN_DEADLINE_S = 0.05
MAX_ATTEMPTS = 4  # a request is run at most this many times (its first run included)
BACKOFF_BASE_S = 2.0  # a device that failed twice is avoided this long ...
BACKOFF_MAX_S = 120.0  # ... doubling with each further failure, up to this
BACKOFF_FORGET_S = 600.0  # failures older than this (with none since) are forgotten


class DeadlineError(FieldError):
    """A deadline field that is not a number of seconds in range."""


def deadline_s(value: object, name: str = "deadline_s") -> float:
    """A deadline in seconds from a peer or a client: a finite number in
    [MIN_DEADLINE_S, MAX_DEADLINE_S] (booleans, strings, NaN and infinities refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DeadlineError(f"{name} must be a number of seconds")
    if isinstance(value, int) and not MIN_DEADLINE_S <= value <= MAX_DEADLINE_S:
        value = math.nan  # a 400-digit integer must never reach float()
    seconds = float(value)
    if not (math.isfinite(seconds) and MIN_DEADLINE_S <= seconds <= MAX_DEADLINE_S):
        raise DeadlineError(f"{name} must be between {MIN_DEADLINE_S:g} and {MAX_DEADLINE_S:g} seconds")
    return seconds


class DeviceLost(Exception):
    """A device of the running attempt was lost (it died or was cut off)."""

    def __init__(self, device: str, why: str) -> None:
        super().__init__(f"lost {device}: {why}")
        self.device = device
        self.why = why


@dataclass(frozen=True)
class Retry:
    """Run the request again without `exclude` (attempt number `attempt`, from 1)."""

    exclude: frozenset[str]
    attempt: int


@dataclass(frozen=True)
class GiveUp:
    reason: str


@dataclass
class Recovery:
    """One request's attempts against its deadline (monotonic seconds)."""

    deadline: float
    deadline_s: float  # as the client asked: for the messages
    max_attempts: int = MAX_ATTEMPTS
    attempt: int = 1
    lost: list[str] = field(default_factory=list)  # devices lost, in order

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def timed_out(self, during: str) -> str:
        """The one line a client gets when the deadline passes."""
        lost = f" (lost {', '.join(self.lost)})" if self.lost else ""
        return f"deadline of {self.deadline_s:g} s passed {during}{lost}"

    def on_lost(self, device: str, why: str, now: float, survivors: frozenset[str]) -> Retry | GiveUp:
        """`device` was lost during the current attempt (`why`); `survivors`: the devices
        that could run the request now (the requester itself among them when it computes)."""
        if device not in self.lost:
            self.lost.append(device)
        left = survivors - set(self.lost)
        if self.expired(now):
            return GiveUp(self.timed_out(f"after losing {device} ({why})"))
        if self.attempt >= self.max_attempts:
            return GiveUp(f"lost {', '.join(self.lost)} during the request; gave up after "
                          f"{self.attempt} attempts (last: {device}: {why})")
        if not left:
            return GiveUp(f"lost {', '.join(self.lost)} during the request and no device is left to run it")
        self.attempt += 1
        return Retry(frozenset(self.lost), self.attempt)


@dataclass
class _Record:
    failures: int
    last: float
    until: float


class BackOff:
    """Devices that failed recently, avoided for an exponentially growing while."""

    def __init__(self, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_MAX_S,
                 forget_s: float = BACKOFF_FORGET_S, max_devices: int = 1024) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.forget_s = forget_s
        self.max_devices = max_devices
        self._records: dict[str, _Record] = {}

    def failed(self, name: str, now: float) -> float:
        """`name` failed a request at `now`: how long it is avoided from now."""
        record = self._records.get(name)
        if record is None or now - record.last > self.forget_s:
            failures = 1
        else:
            failures = record.failures + 1
        # once is not "keeps failing" (a link that dropped and healed): the request that lost
        # it runs on without it anyway; from the second failure on it is avoided
        wait = 0.0 if failures == 1 else min(self.cap_s, self.base_s * 2.0 ** (failures - 2))
        self._records[name] = _Record(failures, now, now + wait)
        while len(self._records) > self.max_devices:
            del self._records[min(self._records, key=lambda n: self._records[n].last)]
        return wait

    def succeeded(self, name: str) -> None:
        """`name` did its part of a completed request: its failures are forgotten."""
        self._records.pop(name, None)

    def avoided(self, now: float) -> frozenset[str]:
        """Devices not to plan with at `now`."""
        for name in [n for n, r in self._records.items() if now - r.last > self.forget_s]:
            del self._records[name]
        return frozenset(n for n, r in self._records.items() if now < r.until)

    def failures(self, name: str) -> int:
        record = self._records.get(name)
        return record.failures if record is not None else 0


__all__ = ["BACKOFF_BASE_S", "BACKOFF_MAX_S", "BackOff", "DEFAULT_DEADLINE_S", "DeadlineError", "DeviceLost", "GiveUp",
           "MAX_ATTEMPTS", "MAX_DEADLINE_S", "Recovery", "Retry", "deadline_s"]
