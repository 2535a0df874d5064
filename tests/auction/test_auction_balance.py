"""Strip balancing: optimal makespan against brute force, levelled finish times, exclusion."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshci.auction import AuctionError, balance_strips


def halo_model(
    height: int, speed: dict[str, float], halo: int, latency: dict[str, float] | None = None,
    backlog: dict[str, float] | None = None,
):
    """Predicted finish of rows [a, b): backlog + latency + halo-extended rows / speed."""
    latency = latency or {}
    backlog = backlog or {}

    def strip_time(device: str, a: int, b: int) -> float:
        rows = min(height, b + halo) - max(0, a - halo)
        return backlog.get(device, 0.0) + latency.get(device, 0.0) + rows / speed[device]

    return strip_time


def brute_force(height: int, order: Sequence[str], strip_time) -> float:
    """Least makespan over every order-preserving split (a device may get no rows)."""
    best = math.inf
    for cuts in itertools.combinations_with_replacement(range(height + 1), len(order) - 1):
        bounds = (0, *cuts, height)
        worst = max(
            (strip_time(d, a, b) for d, a, b in zip(order, bounds, bounds[1:]) if b > a), default=0.0
        )
        best = min(best, worst)
    return best


def check_cover(strips: list[tuple[str, int, int]], height: int, order: Sequence[str]) -> None:
    assert strips[0][1] == 0 and strips[-1][2] == height
    for (_, _, b), (_, a, _) in zip(strips, strips[1:]):
        assert a == b
    assert all(b > a for _, a, b in strips)
    names = [d for d, _, _ in strips]
    positions = [list(order).index(d) for d in names]
    assert positions == sorted(positions) and len(set(names)) == len(names)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 11),
    speeds=st.lists(st.floats(1.0, 8.0), min_size=1, max_size=4),
    halo=st.integers(0, 2),
    latencies=st.lists(st.floats(0.0, 3.0), min_size=4, max_size=4),
)
def test_makespan_is_optimal(height: int, speeds: list[float], halo: int, latencies: list[float]) -> None:
    order = [f"d{k}" for k in range(len(speeds))]
    model = halo_model(
        height, dict(zip(order, speeds)), halo, latency=dict(zip(order, latencies))
    )
    strips = balance_strips(height, order, model)
    check_cover(strips, height, order)
    got = max(model(d, a, b) for d, a, b in strips)
    assert got <= brute_force(height, order, model) * (1 + 1e-3)


@settings(max_examples=40, deadline=None)
@given(
    speeds=st.lists(st.floats(1.0, 8.0), min_size=2, max_size=8),
    halo=st.integers(0, 4),
    busy=st.floats(0.0, 0.5),
)
def test_finish_times_within_10_percent_when_all_take_part(speeds: list[float], halo: int, busy: float) -> None:
    # Continuous enough: the slowest device's share is >= 20 rows, so one row is <= 5% of it.
    height = min(4096, math.ceil(20 * sum(speeds) / min(speeds)))
    order = [f"d{k}" for k in range(len(speeds))]
    speed = {d: s * height for d, s in zip(order, speeds)}  # the whole map takes 1/s seconds
    # The first device is busy for up to half the ideal block time 1/sum(speeds): it is
    # still worth using, so every device takes part.
    model = halo_model(height, speed, halo, backlog={order[0]: busy / sum(speeds)})
    strips = balance_strips(height, order, model)
    check_cover(strips, height, order)
    assert len(strips) == len(order)
    finish = [model(d, a, b) for d, a, b in strips]
    assert max(finish) <= 1.10 * min(finish), (strips, finish)


def test_busy_or_slow_device_is_left_out() -> None:
    height = 224
    speed = {"a": 4.0, "b": 4.0, "slow": 0.05, "c": 4.0}
    model = halo_model(height, speed, 2, latency={"c": 100.0})
    strips = balance_strips(height, list(speed), model)
    assert [d for d, _, _ in strips] == ["a", "b"]
    finish = [model(d, a, b) for d, a, b in strips]
    assert max(finish) <= 1.10 * min(finish)


def test_single_device_gets_everything() -> None:
    strips = balance_strips(7, ["only"], lambda d, a, b: float(b - a))
    assert strips == [("only", 0, 7)]


@pytest.mark.parametrize(
    ("height", "order"), [(0, ["a"]), (5, []), (5, ["a", "a"])]
)
def test_bad_arguments(height: int, order: list[str]) -> None:
    with pytest.raises(AuctionError):
        balance_strips(height, order, lambda d, a, b: 1.0)


def test_bad_strip_time() -> None:
    with pytest.raises(AuctionError):
        balance_strips(5, ["a", "b"], lambda d, a, b: math.nan)
    with pytest.raises(AuctionError):
        balance_strips(5, ["a", "b"], lambda d, a, b: -1.0)


def test_levelling_raises_the_earliest_finish() -> None:
    # Three equal devices, 10 rows: the least makespan is 4 rows; a plain greedy split
    # 4 + 4 + 2 leaves the last device idle half the time, the levelled one is 3 + 3 + 4.
    strips = balance_strips(10, ["a", "b", "c"], lambda d, a, b: float(b - a))
    assert sorted(b - a for _, a, b in strips) == [3, 3, 4]
