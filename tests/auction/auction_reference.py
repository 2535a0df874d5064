"""Reference solutions and instance generators for the auction tests (independent of the
code under test: brute force and a relaxation solved by dynamic programming)."""

from __future__ import annotations

import itertools

import numpy as np


def enumerate_optimum(cost: np.ndarray, backlog: np.ndarray) -> float:
    """Exact least makespan by enumerating every assignment (bidders ** items of them).

    The makespan counts only bidders that hold at least one item, as in `assign`.
    """
    n_bidders, n_items = cost.shape
    combos = np.array(list(itertools.product(range(n_bidders), repeat=n_items)), dtype=np.int64)
    rows = np.arange(len(combos))
    finish = np.tile(backlog, (len(combos), 1))
    used = np.zeros((len(combos), n_bidders), dtype=bool)
    for i in range(n_items):
        owner = combos[:, i]
        finish[rows, owner] += cost[owner, i]
        used[rows, owner] = True
    return float(np.where(used, finish, -np.inf).max(axis=1).min())


def _shift_saturating(reach: np.ndarray, axis: int, k: int) -> np.ndarray:
    """reach shifted by +k along axis, indices past the end piled onto the last one."""
    if k == 0:
        return reach
    n = reach.shape[axis] - 1
    out = np.zeros_like(reach)
    src = [slice(None)] * reach.ndim
    dst = [slice(None)] * reach.ndim
    if k < n:
        src[axis], dst[axis] = slice(0, n - k), slice(k, n)
        out[tuple(dst)] = reach[tuple(src)]
    src[axis], dst[axis] = slice(max(0, n - k), n + 1), slice(n, n + 1)
    out[tuple(dst)] |= reach[tuple(src)].any(axis=axis, keepdims=True)
    return out


def grouped_bound(cost: np.ndarray, backlog: np.ndarray, steps: int = 40) -> float:
    """A proven lower bound on the least makespan, tight when items come in few kinds.

    Items with identical cost columns form a group. Relaxation: a bidder may hold any
    count vector x (x_g items of group g) with backlog + sum_g x_g * cost_g <= T (or nothing),
    and the groups must be covered: sum over bidders of x >= group sizes. Every real
    assignment with makespan T is such a choice, so the least T for which the relaxation is
    feasible (decided exactly by dynamic programming over the covered counts, bisection on T)
    is at most the optimum. Returns the infeasible end of the bisection, hence a strict lower
    bound. Meant for a handful of groups (tile-like instances).
    """
    columns, counts = np.unique(cost.T.round(12), axis=0, return_counts=True)
    per = columns.T  # [bidders, groups]
    n_groups = per.shape[1]

    def feasible(limit: float) -> bool:
        reach = np.zeros(tuple(counts + 1), dtype=bool)
        reach[(0,) * n_groups] = True
        for b in range(per.shape[0]):
            room = limit - backlog[b]
            new = reach.copy()  # b holds nothing
            if room > 0:
                # Rounding up by a hair keeps the relaxation a relaxation.
                heads = [range(int(min(n, room / c * (1 + 1e-9))) + 1) for n, c in zip(counts[:-1], per[b, :-1])]
                for head in itertools.product(*heads):
                    used = float(np.dot(head, per[b, :-1])) if head else 0.0
                    if used > room * (1 + 1e-9):
                        continue
                    last = int(min(counts[-1], (room - used) / per[b, -1] * (1 + 1e-9)))
                    x = list(head) + [last]
                    if sum(x) == 0:
                        continue
                    shifted = reach
                    for g, k in enumerate(x):
                        shifted = _shift_saturating(shifted, g, k)
                    new |= shifted
            reach = new
        return bool(reach[tuple(counts)])

    lo, hi = 0.0, float((backlog + cost.sum(axis=1)).min())
    for _ in range(steps):
        mid = (lo + hi) / 2
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return lo


def random_instance(
    rng: np.random.Generator, n_bidders: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unrelated items: random compute and traffic per item, speeds spread up to 8x, links up
    to 10x; half the instances have one device busy with other work (backlog)."""
    speed = rng.uniform(1.0, 8.0, n_bidders)
    bandwidth = rng.uniform(1.0, 10.0, n_bidders)
    work = rng.uniform(0.5, 1.5, n_items)
    traffic = rng.uniform(0.1, 1.0, n_items)
    cost = work[None, :] / speed[:, None] + traffic[None, :] / bandwidth[:, None]
    backlog = np.zeros(n_bidders)
    if rng.random() < 0.5:
        backlog[rng.integers(n_bidders)] = rng.uniform(0.0, 1.0)
    return cost, backlog


def tile_instance(
    rng: np.random.Generator, n_bidders: int, n_tiles: int, halo: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """The tiles of one fused block: equal row strips whose compute and input traffic grow
    with their halo-extended rows (border strips have less halo); speeds spread up to 8x,
    links up to 10x, a per-device latency, and sometimes one busy device."""
    rows = int(rng.integers(2, 9))
    height = rows * n_tiles
    a = np.arange(n_tiles) * rows
    in_rows = np.minimum(height, a + rows + halo) - np.maximum(0, a - halo)
    speed = rng.uniform(1.0, 8.0, n_bidders)
    bandwidth = rng.uniform(1.0, 10.0, n_bidders)
    latency = rng.uniform(0.0, 0.02, n_bidders)
    work = 2.0 * in_rows / height
    traffic = 0.5 * in_rows / height
    cost = work[None, :] / speed[:, None] + traffic[None, :] / bandwidth[:, None] + latency[:, None]
    backlog = np.zeros(n_bidders)
    if rng.random() < 0.5:
        backlog[rng.integers(n_bidders)] = rng.uniform(0.0, 0.3)
    return cost, backlog
