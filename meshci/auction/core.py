"""The assignment core of AWAS: items to bidders, minimising the block makespan (numpy).

Input is the bid matrix the auctioneer collected: ``cost[b, i]`` is the seconds bidder ``b``
needs for item ``i`` (compute including halo rows, plus its transfers; ``inf`` where ``b``
did not bid), and ``backlog[b]`` the seconds of work ``b`` already holds. Bidder ``b``'s bid
for ``i`` — its predicted finish time if it wins ``i`` on top of what it holds — is
``finish[b] + cost[b, i]``.

The auctioneer resolves the bids in three phases.

1. Opening round. Items are offered largest first (by their cheapest bid); each goes to the
   bidder whose bid, its predicted finish time with the item, is lowest: LPT list
   scheduling on unrelated machines. It runs from two offer orders (largest cheapest bid,
   largest mean bid) and the better outcome is kept.
2. Price rises. An item's *price* is the predicted finish time of the bidder holding it;
   the items of the bidder that finishes last (the block's makespan) are contested. A
   rival outbids that holder when taking one of its items — alone, in exchange for one of
   its own, or, when no such bid exists, two for one — leaves both of them finishing
   earlier than the current makespan by more than ``eps`` (relative). Each accepted bid
   is one iteration. As in Bertsekas's ``eps``-auction the ``eps`` step is what ends it:
   every step lowers the sorted vector of finish times lexicographically by at least
   ``eps`` x makespan. Unlike his assignment auction, valuations here depend on everything
   a bidder holds (they are finish times, not fixed values), so this phase is an
   ``eps``-improvement exchange between the critical bidder and one rival at a time, and
   what it ends in is a local optimum of those exchanges, not a certified optimum.
3. Bounded search, on small bid matrices (at most ``search_items`` items) and in place of
   phase 2 when it completes: a depth-first branch and bound over the bids, starting from
   the opening round's outcome, pruned by per-item and counting bounds and by symmetry
   (identical tiles, identical devices), capped at ``search_nodes`` nodes. When it
   completes, no assignment is better by more than ``eps``; when it runs out of nodes,
   phase 2 runs and the better outcome is kept. Few indivisible items are where exchanges
   get stuck (a better assignment may need a cycle of moves through several bidders) and
   where a search is cheap.

The makespan only counts bidders that hold at least one item: a busy bidder that wins
nothing does not delay the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from meshci.auction.errors import AuctionError

__all__ = ["Assignment", "assign", "lower_bound"]


@dataclass(frozen=True, eq=False)
class Assignment:
    """Outcome of `assign`.

    owner: bidder index per item (-1: nobody bid on it). finish_s: predicted finish time per
    bidder (its backlog plus the items it won). iterations: price-rise steps taken after the
    opening round.
    """

    owner: np.ndarray
    finish_s: np.ndarray
    iterations: int

    @property
    def makespan_s(self) -> float:
        """Latest predicted finish among bidders that won at least one item (0.0 if none)."""
        held = self.owner[self.owner >= 0]
        if held.size == 0:
            return 0.0
        return float(self.finish_s[np.unique(held)].max())

    def items_of(self, bidder: int) -> np.ndarray:
        """Indices of the items won by `bidder`."""
        return np.flatnonzero(self.owner == bidder)


def _validate(cost: np.ndarray, backlog: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cost = np.asarray(cost, dtype=np.float64)
    backlog = np.asarray(backlog, dtype=np.float64)
    if cost.ndim != 2:
        raise AuctionError(f"cost must be a 2-d array [bidders, items], got shape {cost.shape}")
    if backlog.shape != (cost.shape[0],):
        raise AuctionError(
            f"backlog must have one entry per bidder ({cost.shape[0]}), got shape {backlog.shape}"
        )
    if np.isnan(cost).any() or (cost < 0).any():
        raise AuctionError("cost must be >= 0 (inf where a bidder did not bid), no NaN")
    if not np.isfinite(backlog).all() or (backlog < 0).any():
        raise AuctionError("backlog must be finite and >= 0")
    return cost, backlog


def assign(
    cost: np.ndarray,
    backlog: np.ndarray,
    *,
    eps: float = 1e-3,
    max_iterations: int | None = None,
    search_nodes: int = 1000,
    search_items: int = 12,
) -> Assignment:
    """Assign each item to one bidder, minimising the makespan (see the module docstring).

    Items nobody bid on (a column of ``inf``) get owner -1. ``eps`` is the relative price
    step; ``max_iterations`` caps the price-rise phase (default ``20 * items + 100``).
    """
    cost, backlog = _validate(cost, backlog)
    if not 0.0 <= eps < 1.0:
        raise AuctionError(f"eps must be in [0, 1), got {eps}")
    n_bidders, n_items = cost.shape
    owner = np.full(n_items, -1, dtype=np.int64)
    finish = backlog.copy()
    if n_items == 0 or n_bidders == 0:
        return Assignment(owner, finish, 0)

    finite = np.isfinite(cost)
    cheapest = np.where(finite, cost, np.inf).min(axis=0)
    biddable = np.flatnonzero(np.isfinite(cheapest))
    limit = 20 * n_items + 100 if max_iterations is None else max_iterations
    lpt = biddable[np.argsort(-cheapest[biddable], kind="stable")]
    searched: Assignment | None = None
    if search_nodes > 0 and biddable.size <= search_items:
        searched, complete = _search(cost, backlog, lpt, eps, search_nodes)
        if complete:
            return searched
    # Opening orders: largest cheapest bid first (LPT), then, unless that outcome already
    # meets the quick lower bound, largest average bid first; the better outcome is kept.
    best = _auction(cost, backlog, lpt, eps, limit)
    if best.makespan_s > _quick_bound(cost, backlog) * (1.0 + eps):
        mean = np.where(finite, cost, 0.0).sum(axis=0) / np.maximum(finite.sum(axis=0), 1)
        result = _auction(cost, backlog, biddable[np.argsort(-mean[biddable], kind="stable")], eps, limit)
        if result.makespan_s < best.makespan_s:
            best = result
    if searched is not None and searched.makespan_s < best.makespan_s:
        best = searched
    return best


def _auction(
    cost: np.ndarray, backlog: np.ndarray, order: np.ndarray, eps: float, limit: int
) -> Assignment:
    """Opening round in `order`, then price rises (see the module docstring)."""
    n_bidders, n_items = cost.shape
    owner = np.full(n_items, -1, dtype=np.int64)
    finish = backlog.copy()
    for i in order:
        bids = finish + cost[:, i]
        b = int(np.argmin(bids))
        owner[i] = b
        finish[b] = bids[b]
    counts = np.bincount(owner[owner >= 0], minlength=n_bidders)
    iterations = 0
    while iterations < limit:
        masked = np.where(counts > 0, finish, -np.inf)
        m = int(np.argmax(masked))
        makespan = float(masked[m])
        if makespan <= 0.0:
            break
        beat = makespan * (1.0 - eps)
        # Cheap exchanges first (one item out, at most one in); pairs only when those fail.
        step = _best_exchange(cost, finish, owner, counts, m, beat, pairs=False)
        if step is None:
            step = _best_exchange(cost, finish, owner, counts, m, beat, pairs=True)
        if step is None:
            break
        give, take, b = step
        for i in give:
            owner[i] = b
        for j in take:
            owner[j] = m
        finish[m] += cost[m, take].sum() - cost[m, give].sum()
        finish[b] += cost[b, give].sum() - cost[b, take].sum()
        counts[m] += len(take) - len(give)
        counts[b] += len(give) - len(take)
        iterations += 1
    return Assignment(owner, finish, iterations)


def _item_sets(items: np.ndarray, owners: np.ndarray, pairs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Item sets as index pairs (second -1 for a single): the singles of `items`, or, with
    `pairs`, the pairs of items that share an owner."""
    if not pairs:
        return items, np.full(items.size, -1, dtype=np.int64)
    a, b = np.triu_indices(items.size, k=1)
    same = owners[a] == owners[b]
    return items[a[same]], items[b[same]]


def _set_cost(cost: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """cost[:, set] summed over each set's items: shape [bidders, sets]."""
    total = cost[:, first].copy()
    two = second >= 0
    total[:, two] += cost[:, second[two]]
    return total


# Above this many items the critical bidder offers pairs only among its most costly ones.
_PAIR_ITEMS = 24


def _best_exchange(
    cost: np.ndarray,
    finish: np.ndarray,
    owner: np.ndarray,
    counts: np.ndarray,
    m: int,
    beat: float,
    *,
    pairs: bool,
) -> tuple[list[int], list[int], int] | None:
    """The exchange between the critical bidder `m` and one other bidder `b` that lowers
    max(finish[m], finish[b]) the most, if it ends below `beat`.

    Without `pairs`: `m` hands over one item and takes none or one of `b`'s. With `pairs`:
    `m` hands over two items and takes none or one, or hands over one and takes two.
    """
    mine = np.flatnonzero(owner == m)
    others = np.flatnonzero((owner >= 0) & (owner != m))
    rest = np.delete(np.arange(cost.shape[0]), m)
    if not pairs:
        give = _item_sets(mine, owner[mine], False)
        take = _item_sets(others, owner[others], False)
        return _best_of(cost, finish, owner, counts, m, beat, give, take, rest)
    if mine.size > _PAIR_ITEMS:
        mine = mine[np.argsort(-cost[m, mine], kind="stable")[:_PAIR_ITEMS]]
    found = _best_of(
        cost, finish, owner, counts, m, beat,
        _item_sets(mine, owner[mine], True), _item_sets(others, owner[others], False), rest,
    )
    if found is not None:
        return found
    return _best_of(
        cost, finish, owner, counts, m, beat,
        _item_sets(mine, owner[mine], False), _item_sets(others, owner[others], True), rest[:0],
    )


def _best_of(
    cost: np.ndarray,
    finish: np.ndarray,
    owner: np.ndarray,
    counts: np.ndarray,
    m: int,
    beat: float,
    give: tuple[np.ndarray, np.ndarray],
    take: tuple[np.ndarray, np.ndarray],
    empty: np.ndarray,
) -> tuple[list[int], list[int], int] | None:
    """Best of: `m` gives a set from `give` to the owner of a set from `take` and takes that
    set, or gives it to a bidder in `empty` and takes nothing."""
    g1, g2 = give
    t1, t2 = take
    if g1.size == 0:
        return None
    give_cost = _set_cost(cost, g1, g2)  # [bidders, give sets]
    give_size = 1 + (g2 >= 0)
    take_owner = np.concatenate([owner[t1], empty])
    take_size = np.concatenate([1 + (t2 >= 0), np.zeros(empty.size, dtype=np.int64)])
    take_m = np.concatenate([_set_cost(cost[m : m + 1], t1, t2)[0], np.zeros(empty.size)])
    take_own = np.concatenate([_set_cost(cost, t1, t2)[owner[t1], np.arange(t1.size)], np.zeros(empty.size)])
    if take_owner.size == 0:
        return None
    new_m = finish[m] - give_cost[m][:, None] + take_m[None, :]
    left = counts[m] - give_size[:, None] + take_size[None, :]
    new_m = np.where(left > 0, new_m, -np.inf)
    given_to_owner = give_cost[take_owner[None, :], np.arange(g1.size)[:, None]]  # [give, take]
    new_b = (finish[take_owner] - take_own)[None, :] + given_to_owner
    value = np.maximum(new_m, new_b)
    k = int(np.argmin(value))
    if not value.flat[k] < beat:
        return None
    g, t = divmod(k, take_owner.size)
    moved = [int(g1[g])] + ([int(g2[g])] if g2[g] >= 0 else [])
    taken: list[int] = []
    if t < t1.size:
        taken = [int(t1[t])] + ([int(t2[t])] if t2[t] >= 0 else [])
    return moved, taken, int(take_owner[t])


def lower_bound(cost: np.ndarray, backlog: np.ndarray) -> float:
    """A proven lower bound on the optimal makespan of ``assign(cost, backlog)``.

    The larger of: (a) every item must finish somewhere, ``max_i min_b backlog[b] +
    cost[b, i]``; (b) a counting bound: within a makespan ``T`` a bidder can hold at most
    ``k_b(T)`` items, the most of its cheapest bids that fit into ``T - backlog[b]``, so the
    optimum is the least ``T`` with ``sum_b k_b(T) >= n_items``. Items nobody bid on are
    ignored.
    """
    cost, backlog = _validate(cost, backlog)
    keep = np.isfinite(cost).any(axis=0)
    return max(_quick_bound(cost, backlog), _weighted_bound(cost[:, keep]) if keep.any() else 0.0)


def _quick_bound(cost: np.ndarray, backlog: np.ndarray) -> float:
    """Bounds (a) and (b) of `lower_bound`."""
    keep = np.isfinite(cost).any(axis=0)
    cost = cost[:, keep]
    n_items = cost.shape[1]
    if n_items == 0:
        return 0.0
    single = float((backlog[:, None] + cost).min(axis=0).max())
    # ends[b, k]: finish of bidder b holding its k+1 cheapest items.
    ends = backlog[:, None] + np.cumsum(np.sort(cost, axis=1), axis=1)
    candidates = np.unique(ends[np.isfinite(ends)])
    # items held within each candidate, summed over bidders: the count of all ends within it
    held = np.searchsorted(np.sort(ends, axis=None), candidates, side="right")
    counting = float(candidates[np.argmax(held >= n_items)])
    return max(single, counting)


def _weighted_bound(cost: np.ndarray, steps: int = 60) -> float:
    """Lagrangian bound: for weights w on the simplex, makespan >= sum_i min_b w_b cost[b, i]
    (a w-weighted average of the bidders' finish times is at most their maximum). The
    weights are improved by mirror ascent, starting proportional to each bidder's speed."""
    finite = np.isfinite(cost)
    typical = np.array([np.median(row[ok]) if ok.any() else np.inf for row, ok in zip(cost, finite)])
    usable = np.isfinite(typical) & (typical > 0)
    if not usable.any():
        return 0.0
    typical = np.where(usable, typical, np.inf)
    w = typical[usable].min() / typical  # proportional to speed, in (0, 1], no overflow
    w /= w.sum()
    columns = np.arange(cost.shape[1])
    plain = np.where(finite, cost, 0.0)
    best = 0.0
    for _ in range(steps):
        weighted = np.where(finite, w[:, None] * plain, np.inf)
        pick = np.argmin(weighted, axis=0)
        best = max(best, float(weighted[pick, columns].sum()))
        load = np.bincount(pick, weights=plain[pick, columns], minlength=cost.shape[0])
        spread = load.max() - load.min()
        if not spread > 1e-12 * load.max():
            break
        w = w * np.exp(2.0 * (load - load.mean()) / spread)
        w /= w.sum()
    return best


def _search(
    cost: np.ndarray, backlog: np.ndarray, order: np.ndarray, eps: float, budget: int
) -> tuple[Assignment, bool]:
    """Depth-first branch and bound over the bids, items in `order`.

    Starts from the opening round's outcome; every leaf found later is better by more than
    `eps` (counted as an iteration). Explores at most `budget` nodes. Returns (best found,
    whether the search completed: then no assignment is better by more than `eps`).
    """
    n_bidders, n_items = cost.shape
    items = [int(i) for i in order]
    c = cost.tolist()
    col = [[c[b][i] for b in range(n_bidders)] for i in items]
    # Static bound: the remaining items must each finish somewhere.
    floor = [min(backlog[b] + c[b][i] for b in range(n_bidders)) for i in items]
    suffix = [0.0] * (len(items) + 1)
    for k in range(len(items) - 1, -1, -1):
        suffix[k] = max(floor[k], suffix[k + 1])
    # Symmetries. Items with identical bids (adjacent in `order`) are interchangeable: within
    # such a run the bidders are taken in non-decreasing index. Bidders with identical bids
    # and backlog are interchangeable while equally loaded: at the first item of a run only
    # the lowest-indexed of them is tried. (Swapping twins from the run's start on, then
    # sorting the run, maps any assignment onto one that obeys both rules.)
    repeat = [k > 0 and col[k] == col[k - 1] for k in range(len(items))]
    rows = [tuple(c[b]) + (float(backlog[b]),) for b in range(n_bidders)]
    twin = [next(a for a in range(n_bidders) if rows[a] == rows[b]) for b in range(n_bidders)]
    # cheapest[k][b]: bidder b's cheapest bid among items k.. (for the counting bound).
    cheapest = [[math.inf] * n_bidders for _ in range(len(items) + 1)]
    for k in range(len(items) - 1, -1, -1):
        cheapest[k] = [min(x, y) for x, y in zip(col[k], cheapest[k + 1])]
    fin = [float(x) for x in backlog]
    # Incumbent: the opening round (each item, in order, to the lowest finish time).
    greedy: list[int] = []
    current = 0.0
    for costs in col:
        b = min(range(n_bidders), key=lambda x: fin[x] + costs[x])
        fin[b] += costs[b]
        current = max(current, fin[b])
        greedy.append(b)
    fin = [float(x) for x in backlog]
    pick = [0] * len(items)
    target = [current * (1.0 - eps)]
    best_pick: list[int] = greedy
    leaves = 1
    nodes = 0

    def dive(k: int, current: float) -> None:
        nonlocal nodes, best_pick, leaves
        if k == len(items):
            target[0] = current * (1.0 - eps)
            best_pick = list(pick)
            leaves += 1
            return
        if suffix[k] >= target[0]:
            return
        if k < 3 and target[0] < math.inf:
            # Counting bound (near the root only: it costs a pass over the bidders): within
            # the target, bidder b fits at most (target - fin[b]) / (its cheapest remaining
            # bid) more items; together they must fit the rest.
            need = len(items) - k
            room = 0
            for f, least in zip(fin, cheapest[k]):
                if f < target[0] and least < math.inf:
                    fit = (target[0] - f) / least if least > 0.0 else math.inf
                    if fit >= need:
                        room = need
                        break
                    room += int(fit)
            if room < need:
                return
        costs = col[k]
        tried: set[tuple[int, float]] = set()
        lowest = pick[k - 1] if repeat[k] else -1
        for b in sorted(range(n_bidders), key=lambda x: fin[x] + costs[x]):
            new = fin[b] + costs[b]
            if new >= target[0]:
                break
            if repeat[k]:
                if b < lowest:
                    continue
            else:
                key = (twin[b], fin[b])
                if key in tried:
                    continue
                tried.add(key)
            nodes += 1
            if nodes > budget:
                return
            before = fin[b]
            fin[b] = new
            pick[k] = b
            dive(k + 1, max(current, new))
            fin[b] = before
            if nodes > budget:
                return

    dive(0, 0.0)
    owner = np.full(n_items, -1, dtype=np.int64)
    owner[items] = best_pick
    finish = backlog.copy()
    np.add.at(finish, owner[items], cost[owner[items], items])
    return Assignment(owner, finish, leaves - 1), nodes <= budget
