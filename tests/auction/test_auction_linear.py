"""LinearStripTime: the closed-form searches give the generic searches' splits."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshci.auction import AuctionError, balance_strips
from meshci.auction.balance import LinearStripTime


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 200),
    bases=st.lists(st.floats(0.0, 0.05), min_size=1, max_size=6),
    rates=st.lists(st.floats(1e-5, 1e-2), min_size=6, max_size=6),
)
def test_same_split_as_the_generic_searches(height: int, bases: list[float], rates: list[float]) -> None:
    order = [f"d{k}" for k in range(len(bases))]
    linear = LinearStripTime(dict(zip(order, bases)), dict(zip(order, rates)))

    def generic(device: str, a: int, b: int) -> float:  # the same function, not recognised
        return linear(device, a, b)

    assert balance_strips(height, order, linear) == balance_strips(height, order, generic)


def test_max_rows_is_exact_at_the_cap() -> None:
    linear = LinearStripTime({"a": 0.1}, {"a": 0.1})
    assert linear.max_rows("a", 0.1 + 3 * 0.1) == 3
    assert linear.max_rows("a", 0.15) == 0
    assert linear.max_rows("missing", 10.0) == 0


def test_a_device_without_a_base_gets_no_rows() -> None:
    linear = LinearStripTime({"a": 0.0}, {"a": 1.0, "b": 0.001})
    assert balance_strips(10, ["a", "b"], linear) == [("a", 0, 10)]
    assert math.isinf(linear("b", 0, 1))


@pytest.mark.parametrize("base, rate", [(-1.0, 1.0), (0.0, 0.0), (0.0, math.inf)])
def test_bad_linear_times(base: float, rate: float) -> None:
    with pytest.raises(AuctionError):
        balance_strips(5, ["a"], LinearStripTime({"a": base}, {"a": rate}))
