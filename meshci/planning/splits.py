"""Row splits shared by the strategies: speed-proportional and water-filled strips.

Both work on per-row costs of a block, so they hold for devices given by GFLOP/s and for
devices with measured per-segment curves alike.
"""

from __future__ import annotations

import numpy as np

from meshci.cost.geometry import BlockTable
from meshci.cost.model import CostModel
from meshci.planning.dpfl import StripLayout


def round_rows(height: int, shares: np.ndarray) -> np.ndarray:
    """Integer rows summing to ``height`` from non-negative real ``shares`` (largest
    remainder); devices may get 0 rows."""
    total = float(shares.sum())
    if total <= 0:
        rows = np.zeros(shares.size, dtype=np.int64)
        rows[0] = height
        return rows
    exact = shares * (height / total)
    rows = np.floor(exact).astype(np.int64)
    short = height - int(rows.sum())
    if short > 0:
        order = np.lexsort((np.arange(shares.size), -(exact - rows)))
        rows[order[:short]] += 1
    return rows


def layout_from_rows(devices: np.ndarray, rows: np.ndarray, rounds: int = 0) -> StripLayout:
    """Strips in the order of ``devices`` (devices with 0 rows left out)."""
    keep = rows > 0
    devices, rows = devices[keep], rows[keep]
    r1 = np.cumsum(rows)
    return StripLayout(devices.astype(np.int64), r1 - rows, r1, rounds)


def per_row_seconds(model: CostModel, block: BlockTable) -> np.ndarray:
    """Seconds per output row of each device on the block (whole map / height, no halo)."""
    if model.curves_free:  # strip_compute's flops / speed, without the matrix
        return block.flops(0, block.height) / model.speed / block.height
    full = model.strip_compute(block, np.array([0]), np.array([block.height]))[:, 0]
    return full / block.height


def halo_seconds(model: CostModel, block: BlockTable, rates: np.ndarray) -> np.ndarray:
    """A strip also computes its halo rows: a fixed cost per device (a middle row's strip
    time beyond the per-row rate)."""
    mid = block.height // 2
    if model.curves_free:  # strip_compute's flops / speed, without the matrix
        one_row = block.flops(mid, mid + 1) / model.speed
    else:
        one_row = model.strip_compute(block, np.array([mid]), np.array([mid + 1]))[:, 0]
    return np.maximum(one_row - rates, 0.0)


def proportional_layout(model: CostModel, start: int, end: int, devices: np.ndarray) -> StripLayout:
    """Rows in proportion to each device's speed on this block (MoDNN's and AOFL's rule)."""
    block = model.tables.block(start, end)
    speed = 1.0 / per_row_seconds(model, block)[devices]
    return layout_from_rows(devices, round_rows(block.height, speed))


def water_filled_layout(
    model: CostModel,
    start: int,
    end: int,
    devices: np.ndarray,
    *,
    from_requester: bool,
    rates: np.ndarray | None = None,
    halo_s: np.ndarray | None = None,
) -> StripLayout:
    """Rows such that the devices would finish together, each starting after its backlog
    and, when the input comes from the requester, after receiving it (water filling: a
    device whose ready time is past the common finish gets nothing). ``rates`` and
    ``halo_s``: every device's per-row seconds and halo seconds on this block, if already
    known (see `halo_seconds`)."""
    block = model.tables.block(start, end)
    rates = per_row_seconds(model, block) if rates is None else rates
    halo_s = halo_seconds(model, block, rates) if halo_s is None else halo_s
    rate = rates[devices]
    ready = model.backlog[devices] + halo_s[devices]
    req = model.requester
    if from_requester:
        in_rows_per_row = model.tables.heights[start] / block.height
        spb = model.sec_per_byte[req, devices] * model.tables.row_bytes[start] * in_rows_per_row
        rate = rate + spb
        ready = ready + np.where(devices != req, model.latency[req, devices], 0.0)
    order = np.argsort(ready, kind="stable")
    r_sorted, a_sorted = rate[order], ready[order]
    inv = 1.0 / r_sorted
    cum_inv = np.cumsum(inv)
    cum_ready = np.cumsum(a_sorted * inv)
    # with the first k devices: T_k = (H + sum(ready/rate)) / sum(1/rate); valid if T_k > ready_k
    finish = (block.height + cum_ready) / cum_inv
    valid = finish > a_sorted
    k = int(np.flatnonzero(valid)[-1]) + 1 if valid.any() else 1
    shares = np.zeros(devices.size)
    shares[order[:k]] = np.maximum(finish[k - 1] - a_sorted[:k], 0.0) * inv[:k]
    if shares.sum() <= 0:
        shares[order[0]] = 1.0
    return layout_from_rows(devices, round_rows(block.height, shares))


def water_fill_sets(height: int, members: np.ndarray, rate: np.ndarray, ready: np.ndarray) -> np.ndarray:
    """`water_filled_layout`'s rows for many device sets at once. Set i is ``members[i]``
    (bool, one column per device) with per-row seconds ``rate[i]`` and ready times
    ``ready[i]`` (as `water_filled_layout` derives them: backlog + halo, plus the input
    transfer for a first block); returns the rows per device (one row per set, 0 for
    devices left out). Bit for bit the same arithmetic as one `water_filled_layout` call
    per set: a set sorted by ready time is all devices sorted by ready time (stable, so
    ties by index) with the others removed, and the running sums pass the removed
    devices as exact zeros."""
    n_sets, n = members.shape
    sets = np.arange(n_sets)[:, None]
    order = np.argsort(ready, axis=1, kind="stable")
    inv = 1.0 / rate[sets, order]
    a_sorted = ready[sets, order]
    inside = members[sets, order]
    cum_inv = np.cumsum(np.where(inside, inv, 0.0), axis=1)
    cum_ready = np.cumsum(np.where(inside, a_sorted * inv, 0.0), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # before a set's first device
        finish = (height + cum_ready) / cum_inv
    valid = (finish > a_sorted) & inside
    # the last valid device of each set (its first device if none is valid)
    last = np.where(valid.any(axis=1), n - 1 - np.argmax(valid[:, ::-1], axis=1), np.argmax(inside, axis=1))
    taken = inside & (np.arange(n)[None, :] <= last[:, None])
    level = finish[sets[:, 0], last][:, None]
    share_sorted = np.where(taken, np.maximum(level - a_sorted, 0.0) * inv, 0.0)
    shares = np.empty((n_sets, n))
    shares[sets, order] = share_sorted
    idle = np.flatnonzero(~(shares > 0).any(axis=1))
    shares[idle, order[idle, np.argmax(inside[idle], axis=1)]] = 1.0
    # round_rows per set, on the set's own devices (the totals are summed as it sums them:
    # a set's shares in device order, one row per set of the same size, summed along rows)
    sizes = members.sum(axis=1)
    totals = np.empty(n_sets)
    for size in np.unique(sizes).tolist():
        same = np.flatnonzero(sizes == size)
        totals[same] = shares[same][members[same]].reshape(same.size, size).sum(axis=1)
    exact = shares * (height / totals)[:, None]
    rows = np.floor(exact).astype(np.int64)
    short = height - rows.sum(axis=1)
    key = np.where(members, -(exact - rows), np.inf)
    rank = np.empty((n_sets, n), dtype=np.int64)
    rank[sets, np.argsort(key, axis=1, kind="stable")] = np.arange(n)
    return rows + (rank < short[:, None])
