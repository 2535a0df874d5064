"""The assignment core: quality against exact optima and proven bounds, invariants, inputs."""

from __future__ import annotations

import numpy as np
import pytest
from auction_reference import enumerate_optimum, grouped_bound, random_instance, tile_instance
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshci.auction import AuctionError, assign, lower_bound

# Instance sizes small enough to enumerate (bidders ** items <= ~50k assignments).
ENUMERABLE = [(2, 2), (2, 9), (2, 14), (3, 6), (3, 9), (4, 5), (4, 7), (5, 6), (6, 5), (8, 4), (12, 4), (16, 3), (16, 4)]


@pytest.mark.parametrize(("n_bidders", "n_items"), ENUMERABLE)
def test_makespan_within_5_percent_of_enumerated_optimum(n_bidders: int, n_items: int) -> None:
    rng = np.random.default_rng(1000 * n_bidders + n_items)
    for _ in range(12):
        cost, backlog = random_instance(rng, n_bidders, n_items)
        optimum = enumerate_optimum(cost, backlog)
        got = assign(cost, backlog).makespan_s
        assert got >= optimum * (1 - 1e-9)  # sanity: nothing beats the optimum
        assert got <= 1.05 * optimum, (cost, backlog, got, optimum)


@pytest.mark.parametrize(("n_bidders", "n_items"), [(3, 7), (4, 6), (5, 5), (6, 5)])
def test_small_symmetric_instances_are_solved_exactly(n_bidders: int, n_items: int) -> None:
    """Identical tiles and identical devices (where the search prunes symmetric branches):
    on small bid matrices the outcome is the optimum, up to the price step eps."""
    rng = np.random.default_rng(31 * n_bidders + n_items)
    for _ in range(15):
        cost, backlog = tile_instance(rng, n_bidders, n_items)
        twins = rng.integers(0, n_bidders, size=n_bidders // 2)
        cost[: twins.size] = cost[twins]  # some devices are copies of others
        backlog[: twins.size] = backlog[twins]
        optimum = enumerate_optimum(cost, backlog)
        assert assign(cost, backlog, eps=1e-3).makespan_s <= optimum * (1 + 1.001e-3)


@pytest.mark.parametrize(
    ("n_bidders", "n_tiles"), [(2, 64), (3, 17), (4, 16), (4, 64), (7, 30), (8, 32), (12, 40), (16, 16), (16, 33), (16, 64)]
)
def test_tiles_within_5_percent_of_proven_bound(n_bidders: int, n_tiles: int) -> None:
    """Larger instances: the tiles of a fused block. Bound: `grouped_bound` (tiles with the
    same cost on every device form a group; the least T for which per-device item counts
    fitting in T can cover every group is at most the optimal makespan; see its docstring)."""
    rng = np.random.default_rng(7 * n_bidders + n_tiles)
    for _ in range(4):
        cost, backlog = tile_instance(rng, n_bidders, n_tiles)
        bound = grouped_bound(cost, backlog)
        got = assign(cost, backlog).makespan_s
        assert got <= 1.05 * bound, (n_bidders, n_tiles, got, bound)


@pytest.mark.parametrize(("n_bidders", "n_items"), [(2, 8), (3, 7), (5, 5), (16, 3)])
def test_bounds_never_exceed_the_optimum(n_bidders: int, n_items: int) -> None:
    rng = np.random.default_rng(n_bidders * n_items)
    for _ in range(10):
        cost, backlog = random_instance(rng, n_bidders, n_items)
        optimum = enumerate_optimum(cost, backlog)
        assert lower_bound(cost, backlog) <= optimum * (1 + 1e-9)
        assert grouped_bound(cost, backlog) <= optimum * (1 + 1e-9)


def test_bound_is_tight_on_identical_items() -> None:
    # 3 devices taking 1, 2 and 4 s per item, 14 items: within 8 s they hold 8 + 4 + 2 = 14
    # items, within less than 8 s at most 7 + 3 + 1 = 11. Optimum 8.
    cost = np.array([[1.0] * 14, [2.0] * 14, [4.0] * 14])
    result = assign(cost, np.zeros(3))
    assert result.makespan_s == pytest.approx(8.0)
    assert lower_bound(cost, np.zeros(3)) == pytest.approx(8.0)


def test_busy_device_is_passed_over() -> None:
    # Device 0 is fastest but holds 10 s of other work: the items go to the others.
    cost = np.array([[0.1] * 4, [1.0] * 4, [1.0] * 4])
    result = assign(cost, np.array([10.0, 0.0, 0.0]))
    assert set(result.owner.tolist()) == {1, 2}
    assert result.makespan_s == pytest.approx(2.0)
    # With only a little backlog it is worth using.
    result = assign(cost, np.array([0.5, 0.0, 0.0]))
    assert result.makespan_s == pytest.approx(0.9)


def test_items_without_bids_stay_unassigned() -> None:
    cost = np.array([[1.0, np.inf, 2.0], [np.inf, np.inf, 1.0]])
    result = assign(cost, np.zeros(2))
    assert result.owner.tolist() == [0, -1, 1]
    assert result.makespan_s == pytest.approx(1.0)


def test_empty_instances() -> None:
    result = assign(np.zeros((3, 0)), np.array([1.0, 0.0, 2.0]))
    assert result.owner.size == 0
    assert result.makespan_s == 0.0
    assert result.finish_s.tolist() == [1.0, 0.0, 2.0]


@pytest.mark.parametrize(
    ("cost", "backlog", "eps"),
    [
        (np.ones(3), np.zeros(3), 1e-3),  # not 2-d
        (np.ones((2, 3)), np.zeros(3), 1e-3),  # backlog length
        (np.array([[1.0, np.nan]]), np.zeros(1), 1e-3),
        (np.array([[1.0, -1.0]]), np.zeros(1), 1e-3),
        (np.ones((1, 2)), np.array([np.inf]), 1e-3),
        (np.ones((1, 2)), np.array([-1.0]), 1e-3),
        (np.ones((1, 2)), np.zeros(1), 1.5),
    ],
)
def test_local_mistakes_raise_auction_error(cost: np.ndarray, backlog: np.ndarray, eps: float) -> None:
    with pytest.raises(AuctionError):
        assign(cost, backlog, eps=eps)


costs = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(0, 12)),
    elements=st.one_of(st.floats(0.0, 10.0), st.just(np.inf)),
)


@settings(max_examples=60, deadline=None)
@given(cost=costs, data=st.data())
def test_assignment_invariants(cost: np.ndarray, data: st.DataObject) -> None:
    backlog = data.draw(hnp.arrays(np.float64, cost.shape[0], elements=st.floats(0.0, 5.0)))
    result = assign(cost, backlog)
    finite = np.isfinite(cost)
    for i, b in enumerate(result.owner):
        if finite[:, i].any():
            assert b >= 0 and finite[b, i]  # every biddable item goes to a bidder who bid
        else:
            assert b == -1
    expected = backlog.copy()
    for i, b in enumerate(result.owner):
        if b >= 0:
            expected[b] += cost[b, i]
    np.testing.assert_allclose(result.finish_s, expected, rtol=1e-9, atol=1e-9)
    assert result.makespan_s >= lower_bound(cost, backlog) * (1 - 1e-9)
