"""Strip balancing: after the auction, move the row boundaries of a block's strips so the
predicted finish times of its devices are close, leaving out devices that would slow it.

The devices keep their order along the rows (as the auction placed them). ``strip_time(d,
a, b)`` predicts when device ``d`` finishes rows ``[a, b)`` of the block's output (its
backlog, compute including halo rows, transfers). It must be monotone under containment: a
strip inside another never takes longer. Then:

1. The least achievable makespan ``T*`` is found by search on ``T``: for a given ``T`` the
   greedy that lets each device, in order, take the longest strip it finishes within ``T``
   (skipping a device that cannot finish even one row within ``T``) covers the rows iff any
   order-preserving split does (exchange argument: pushing a boundary down only shrinks the
   strips after it).
2. Among splits with makespan ``T*`` over the devices that took part, the earliest finish is
   raised as far as possible (search on a floor ``L``), so the devices' finish times end
   close together instead of the last device getting the leftovers.

Both searches are exact and short: ``T*`` and the best floor are strip times, so a trial
that succeeds moves its bound to its own latest (earliest) finish, and one that fails to
the next strip time at which the greedy would go differently; bisection while the range is
wide, then strip time by strip time.

Devices that cannot finish a single row within ``T*`` are left out: the degree of
parallelism follows from the prediction, not from the device count.

`LinearStripTime` is a `strip_time` of the form ``t(d, a, b) = base[d] + (b - a) * per_row[d]``
(a bidder's backlog, fixed cost and halo in ``base``); with it the two searches per device
are solved in closed form (then checked against the same function, so the result is the
one the generic searches give) instead of by bisection over rows: the requester levels
every block of every request, and this is most of the CPU that takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meshci.auction.errors import AuctionError

__all__ = ["LinearStripTime", "balance_strips"]

StripTime = Callable[[str, int, int], float]


@dataclass(frozen=True)
class LinearStripTime:
    """``t(d, a, b) = base[d] + (b - a) * per_row[d]``; a device missing from `base` (or with
    an infinite base) cannot take rows. `per_row` values must be > 0 and finite."""

    base: Mapping[str, float]
    per_row: Mapping[str, float]

    def __call__(self, device: str, a: int, b: int) -> float:
        base = self.base.get(device, math.inf)
        return base + (b - a) * self.per_row[device] if math.isfinite(base) else math.inf

    def max_rows(self, device: str, cap: float) -> int:
        """Largest n >= 0 with t(d, 0, n) <= cap (huge when per_row is tiny)."""
        base = self.base.get(device, math.inf)
        if not math.isfinite(base) or base + self.per_row[device] > cap:
            return 0
        n = int((cap - base) / self.per_row[device])
        while n > 1 and self(device, 0, n) > cap:  # rounding: never claim a row too many
            n -= 1
        while self(device, 0, n + 1) <= cap:
            n += 1
        return n


class _Timer:
    """Memoised, checked calls of the caller's `strip_time`."""

    def __init__(self, strip_time: StripTime) -> None:
        self._strip_time = strip_time
        self._memo: dict[tuple[str, int, int], float] = {}
        self.linear = strip_time if isinstance(strip_time, LinearStripTime) else None
        if self.linear is not None:
            for device, rate in self.linear.per_row.items():
                if not (rate > 0 and math.isfinite(rate)):
                    raise AuctionError(f"per_row[{device!r}] must be > 0 and finite, got {rate}")
            for device, base in self.linear.base.items():
                if math.isnan(base) or base < 0.0:
                    raise AuctionError(f"base[{device!r}] must be >= 0, got {base}")

    def __call__(self, device: str, a: int, b: int) -> float:
        key = (device, a, b)
        value = self._memo.get(key)
        if value is None:
            value = float(self._strip_time(device, a, b))
            if math.isnan(value) or value < 0.0:
                raise AuctionError(f"strip_time({device!r}, {a}, {b}) returned {value}")
            self._memo[key] = value
        return value


def _longest(time: _Timer, device: str, a: int, height: int, cap: float) -> int:
    """Largest b in (a, height] with time(device, a, b) <= cap, or a if none."""
    if time.linear is not None:
        return min(height, a + time.linear.max_rows(device, cap))
    if time(device, a, a + 1) > cap:
        return a
    lo, hi = a + 1, height  # time(lo) <= cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if time(device, a, mid) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _earliest_start(time: _Timer, device: str, b: int, cap: float) -> int:
    """Smallest a in [0, b) with time(device, a, b) <= cap, or b if none."""
    if time.linear is not None:
        return max(0, b - time.linear.max_rows(device, cap))
    if time(device, b - 1, b) > cap:
        return b
    lo, hi = 0, b - 1  # time(hi) <= cap
    while lo < hi:
        mid = (lo + hi) // 2
        if time(device, mid, b) <= cap:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _greedy(
    time: _Timer, height: int, order: Sequence[str], cap: float
) -> tuple[list[tuple[str, int, int]] | None, float]:
    """Each device in order takes the longest strip it finishes within ``cap``. Returns the
    strips (None when they do not cover the rows) and the least cap above ``cap`` at which
    some device's strip would grow (inf if none): every cap below it gives the same strips."""
    strips: list[tuple[str, int, int]] = []
    a = 0
    grows = math.inf
    for device in order:
        if a == height:
            break
        b = _longest(time, device, a, height, cap)
        if b < height:
            grows = min(grows, time(device, a, b + 1))
        if b > a:
            strips.append((device, a, b))
            a = b
    return (strips if a == height else None), grows


def _starts(time: _Timer, height: int, devices: Sequence[str], cap: float) -> list[int]:
    """start[k]: the lowest row from which devices[k:] can cover the rest within cap."""
    n = len(devices)
    start = [height] * (n + 1)
    b = height
    for k in range(n - 1, -1, -1):
        if b > 0:
            b = _earliest_start(time, devices[k], b, cap)
        start[k] = b
    return start


def _levelled(
    time: _Timer, height: int, devices: Sequence[str], cap: float, floor: float, start: list[int]
) -> tuple[list[tuple[str, int, int]] | None, float]:
    """A split over all of `devices` with every finish time in [floor, cap] (``start``:
    `_starts` of the same cap), or None; and, when None, the greatest strip time below
    ``floor`` at which the search would go differently (-inf if none): every floor above it
    fails too."""
    n = len(devices)
    below = -math.inf
    strips: list[tuple[str, int, int]] = []
    a = 0
    for k, device in enumerate(devices):
        if k == n - 1:
            t = time(device, a, height)
            if not floor <= t <= cap:
                return None, max(below, t) if t < floor else below
            strips.append((device, a, height))
            return strips, below
        last = height - (n - 1 - k)  # leave one row to each later device
        if a + 1 > last:
            return None, below
        # The shortest strip reaching the floor, but long enough for the rest to fit.
        lo, hi = a + 1, last
        longest = time(device, a, hi)
        if longest < floor:
            return None, max(below, longest)
        if time.linear is not None:  # one row short of the floor, plus one
            lo = max(a + 1, min(hi, a + time.linear.max_rows(device, math.nextafter(floor, -math.inf)) + 1))
            while lo > a + 1 and time(device, a, lo - 1) >= floor:
                lo -= 1
            while time(device, a, lo) < floor:
                lo += 1
            hi = lo
        while lo < hi:
            mid = (lo + hi) // 2
            if time(device, a, mid) >= floor:
                hi = mid
            else:
                lo = mid + 1
        if lo > a + 1:  # a floor down to this strip's time keeps lo
            below = max(below, time(device, a, lo - 1))
        b = max(lo, start[k + 1])
        if b > last or time(device, a, b) > cap:
            return None, below
        strips.append((device, a, b))
        a = b
    return None, below


def balance_strips(
    height: int,
    order: Sequence[str],
    strip_time: StripTime,
    *,
    rel_tol: float = 1e-4,
) -> list[tuple[str, int, int]]:
    """Split rows ``[0, height)`` into contiguous strips ``(device, a, b)`` in `order`,
    minimising the latest predicted finish, then levelling the finish times (module
    docstring). Devices that would slow the block down get no strip.

    Both searches are exact: a makespan or floor is one of the strip times, and each trial
    narrows the range to strip times (a feasible trial to its own latest or earliest
    finish, a failed one to the next strip time at which it would go differently), by
    bisection while the range is wider than ``rel_tol``, then one strip time at a time."""
    if height < 1:
        raise AuctionError(f"height must be >= 1, got {height}")
    if not order:
        raise AuctionError("order must name at least one device")
    if len(set(order)) != len(order):
        raise AuctionError(f"order names a device twice: {list(order)}")
    time = _Timer(strip_time)
    first = min(time(d, 0, height) for d in order)
    best = _greedy(time, height, order, first)[0]
    assert best is not None  # one device alone covers the rows within its own time
    # Every cap below lo fails; hi is the makespan of best.
    lo, hi = 0.0, max(time(d, a, b) for d, a, b in best)
    while lo < hi:
        mid = (lo + hi) / 2
        if not (hi - lo > rel_tol * hi and lo < mid < hi):
            mid = lo
        trial, grows = _greedy(time, height, order, mid)
        if trial is None:
            lo = grows
        else:
            best, hi = trial, max(time(d, a, b) for d, a, b in trial)
    cap = hi
    devices = [d for d, _, _ in best]
    start = _starts(time, height, devices, cap)
    # Every floor above hi_floor fails; levelled has its earliest finish at lo_floor.
    levelled, lo_floor, hi_floor = best, min(time(d, a, b) for d, a, b in best), cap
    while lo_floor < hi_floor:
        mid = (lo_floor + hi_floor) / 2
        if not (hi_floor - lo_floor > rel_tol * cap and lo_floor < mid < hi_floor):
            mid = hi_floor
        trial, below = _levelled(time, height, devices, cap, mid, start)
        if trial is None:
            hi_floor = below
        else:
            levelled, lo_floor = trial, min(time(d, a, b) for d, a, b in trial)
    return levelled
