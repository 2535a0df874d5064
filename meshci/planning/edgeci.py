"""``edgeci``: DPFL cuts plus AWAS assignment, tiles exchanged peer to peer.

Source: Chen, Luo, Fang, Xiong, "EdgeCI: Distributed Workload Assignment and Model
Partitioning for CNN Inference on Edge Clusters", ACM TOIT 2024. DPFL chooses the fused
blocks with a bottom-up DP; AWAS assigns each block's tiles by auction; at block
boundaries devices send each other only the rows the next block's tiles need.

How it is built here:

1. DPFL (`meshci.planning.dpfl`) over all cut positions. Candidate layouts of a block
   [s, e): the block on the requester alone (no transfer at all, so DPFL never loses to
   ``local``), and for each parallelism degree k below the device count (every k up to
   8 devices, powers of two above) and k = the device count, the k devices that would
   finish H/k rows soonest (backlog, compute, and the input from / output to the
   requester at the ends), with rows water-filled so that they finish together given
   backlog, speed, halo and (first block) the input transfer. The DP values every
   candidate with the exact cost model. The candidates of all blocks ending at one
   boundary are built in one numpy pass (`_candidates_at`), and the DP times all
   candidates of a block together (`meshci.planning.dpfl`), so one exact pass over all
   of them is quicker than a coarse pass for an upper bound followed by a pruned one
   (`dpfl`'s ``upper_bound``; both give the same plan).
2. AWAS on the chosen blocks (`auction_layouts`): per block, the auction core the mesh's
   auctioneer runs (`meshci.auction.assign`) over strips of the block, with a simulated
   bidder per cluster device bidding its compute (halo included) and transfer time on top
   of its remaining backlog; then `balance_strips` turns the winners into contiguous,
   levelled strips. (The in-process message-level auction, `run_local_auction`, costs a
   JSON round trip per bidder and item: too slow inside a 64-device planner.)
3. A final exact DP over the chosen cuts keeps, per block, the better of the auction's
   strips and the DP's levelled split (so the auction can only improve the plan), and
   fills in the predicted finish times.

Simplifications: strips are full-width rows (no 2-D grid); memory limits are not
checked; the auction is simulated from the cluster description.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from meshci.auction import assign, balance_strips
from meshci.cost.geometry import BlockTable
from meshci.cost.model import CostModel
from meshci.planning.dpfl import DPResult, StripLayout, dpfl, new_memo, requester_layout
from meshci.planning.splits import halo_seconds, per_row_seconds, water_fill_sets

FINE_DEGREES = (1, 2, 3, 4, 5, 6, 8)  # clusters of up to 8 devices: these degrees
DEGREES = (1, 2, 4, 8, 16, 32, 64)  # larger clusters: powers of two
ITEMS_PER_DEVICE = 2
BID_ROUNDS = 1  # simulated bidders answer every call and never decline an award


def degree_candidates(
    model: CostModel, start: int, end: int, degrees: Sequence[int] | None = None
) -> list[StripLayout]:
    """The requester alone plus water-filled splits over the k best devices per degree
    (``degrees``: default every k up to 8 devices, powers of two above, and all)."""
    return _candidates_at(model, end, [start], degrees)[0]


def _candidates_at(
    model: CostModel, end: int, starts: Sequence[int], degrees: Sequence[int] | None = None
) -> list[list[StripLayout]]:
    """`degree_candidates` of the blocks [s, end) for every s in ``starts``. The blocks share
    their height, so every start and degree is scored and water-filled in one numpy pass
    (`water_fill_sets`), with the same arithmetic as one block and degree at a time."""
    tables = model.tables
    height = tables.heights[end]
    n = model.n_devices
    req = model.requester
    if n == 1:
        return [[requester_layout(model, height)] for _ in starts]
    blocks = [tables.block(s, end) for s in starts]
    if model.curves_free:  # per_row_seconds and halo_seconds for every start at once
        full = np.array([b.flops(0, height) for b in blocks])[:, None]
        mid = height // 2
        one_row = np.array([b.flops(mid, mid + 1) for b in blocks])[:, None] / model.speed
        rate = full / model.speed / height
        halo = np.maximum(one_row - rate, 0.0)
    else:
        rate = np.array([per_row_seconds(model, b) for b in blocks])
        halo = np.array([halo_seconds(model, b, r) for b, r in zip(blocks, rate)])
    if degrees is None:
        degrees = sorted({k for k in (FINE_DEGREES if n <= 8 else DEGREES) if k < n} | {n})
    ks: list[int] = []
    for k in degrees:
        ks.append(min(k, height))
        if ks[-1] == height:
            break  # more devices than rows: every later degree is this one
    n_deg = len(ks)
    others = np.arange(n) != req
    k_eff = np.array(ks, dtype=np.float64)[:, None]
    # who finishes a 1/k share first: its input from the requester (first block), its
    # backlog, its compute, its output to the requester (last block)
    score = model.backlog + rate[:, None, :] * (height / k_eff)
    ready = model.backlog + halo
    rate_w = rate
    first = starts.index(0) if 0 in starts else None
    if first is not None:
        bytes_in = tables.row_bytes[0] * tables.heights[0]
        t_in = np.where(others, model.latency[req] + bytes_in / k_eff * model.sec_per_byte[req], 0.0)
        score[first] = np.maximum(model.backlog, t_in) + rate[first] * (height / k_eff)
        in_rows_per_row = tables.heights[0] / height
        rate_w = rate.copy()
        rate_w[first] = rate[first] + model.sec_per_byte[req] * tables.row_bytes[0] * in_rows_per_row
        ready[first] = ready[first] + np.where(others, model.latency[req], 0.0)
    if end == tables.n_segments:  # the output (or the head's part) to the head device
        hd = model.head_device
        bytes_out = model.final_bytes * k_eff if model.head_split else tables.row_bytes[end] * height
        score = score + np.where(np.arange(n) != hd,
                                 model.latency[:, hd] + bytes_out / k_eff * model.sec_per_byte[:, hd], 0.0)
    score = score.reshape(-1, n)
    rank = np.empty(score.shape, dtype=np.int64)
    rank[np.arange(score.shape[0])[:, None], np.argsort(score, axis=1, kind="stable")] = np.arange(n)
    members = rank < np.tile(k_eff[:, 0].astype(np.int64), len(starts))[:, None]
    rows = water_fill_sets(height, members, np.repeat(rate_w, n_deg, axis=0), np.repeat(ready, n_deg, axis=0))
    requester_key = _rows_key(n, req, height)
    picks: list[int] = []  # rows to turn into layouts
    kept: list[tuple[int, int]] = []  # per start: its picks [a, b)
    for j in range(len(starts)):
        seen = {requester_key}  # equal rows make equal layouts (one signature)
        a = len(picks)
        for i in range(j * n_deg, (j + 1) * n_deg):
            key = rows[i].tobytes()
            if key not in seen:
                seen.add(key)
                picks.append(i)
        kept.append((a, len(picks)))
    layouts = _layouts(rows, picks)
    return [[requester_layout(model, height), *layouts[a:b]] for a, b in kept]


def block_candidates(model: CostModel) -> Callable[[int, int], list[StripLayout]]:
    """``candidates(s, e)`` for `dpfl`: `degree_candidates` of block [s, e), built for all
    blocks ending at e at once on first use and kept."""
    cands: dict[tuple[int, int], list[StripLayout]] = {}

    def candidates(s: int, e: int) -> list[StripLayout]:
        hit = cands.get((s, e))
        if hit is None:  # all blocks ending at e at once
            for start, found in enumerate(_candidates_at(model, e, range(e))):
                cands[(start, e)] = found
            hit = cands[(s, e)]
        return hit

    return candidates


def _rows_key(n: int, device: int, height: int) -> bytes:
    rows = np.zeros(n, dtype=np.int64)
    rows[device] = height
    return rows.tobytes()


def _layouts(rows: np.ndarray, which: list[int]) -> list[StripLayout]:
    """`layout_from_rows` for the sets ``which`` of ``rows`` (per set, rows per device in
    device order), all at once."""
    picked = rows[which]
    r1_all = np.cumsum(picked, axis=1)
    sets, devices = np.nonzero(picked > 0)
    r1 = r1_all[sets, devices]
    r0 = r1 - picked[sets, devices]
    cuts = np.searchsorted(sets, np.arange(len(which) + 1)).tolist()
    return [StripLayout(devices[a:b], r0[a:b], r1[a:b], 0) for a, b in zip(cuts, cuts[1:])]


def _strip_seconds(model: CostModel, start: int, end: int, device: int, a: int, b: int) -> float:
    block = model.tables.block(start, end)
    return float(model.strip_compute(block, np.array([a]), np.array([b]))[device, 0])


def _bids(
    model: CostModel, start: int, end: int, n_items: int, gather: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item strips of a block and each simulated bidder's cost for each: compute incl.
    halo, plus receiving its input (the whole input region from the requester for the
    first block, the halo rows from a neighbour after), plus sending the output to the
    requester after the last block (``gather``: requester routing, so every block's whole
    input comes from the requester and its output goes back)."""
    tables = model.tables
    block = tables.block(start, end)
    h = block.height
    k = min(h, n_items)
    bounds = np.linspace(0, h, k + 1).round().astype(np.int64)
    r0, r1 = bounds[:-1], bounds[1:]
    cost = model.strip_compute(block, r0, r1)
    cost = cost + _transfer_estimate(model, start, end, r0, r1, gather)
    return r0, r1, cost


def _halo_rows(block: BlockTable) -> int:
    """Rows a strip of a p2p block is taken to receive from its neighbours: the input rows
    of one output row (both halos and a core row). A constant, so that the estimate stays
    monotone under strip containment, as `balance_strips` requires."""
    return int(block.in_hi[1] - block.in_lo[0])


def _transfer_estimate(
    model: CostModel, start: int, end: int, r0: np.ndarray, r1: np.ndarray, gather: bool = False
) -> np.ndarray:
    """Seconds per (device, strip) to receive the strip's input (and send its output after
    the last block, or after every block when ``gather``), from and to the requester as
    the auction's bidders see it."""
    tables = model.tables
    block = tables.block(start, end)
    rows = block.in_hi[r1] - block.in_lo[r0]
    if start > 0 and not gather:  # p2p: a strip's own rows are (mostly) on its device already
        rows = np.minimum(rows, _halo_rows(block))
    n_bytes = (rows * tables.row_bytes[start]).astype(np.float64)
    if end == tables.n_segments:  # the output (or the head's part) to the head device
        n_bytes = n_bytes + (model.final_bytes if model.head_split else (r1 - r0) * tables.row_bytes[end])
    elif gather:  # the output back to the requester
        n_bytes = n_bytes + (r1 - r0) * tables.row_bytes[end]
    req = model.requester
    t = model.latency[req][:, None] + n_bytes[None, :] * model.sec_per_byte[req][:, None]
    t[req, :] = 0.0
    return np.where(n_bytes[None, :] > 0, t, 0.0)


def _strip_timer(
    model: CostModel, start: int, end: int, left: np.ndarray, gather: bool = False
) -> Callable[[str, int, int], float]:
    """``strip_time(device, a, b)`` for `balance_strips`: remaining backlog + compute +
    transfer estimate of rows [a, b) (`_transfer_estimate`), in plain floats (it is called
    hundreds of times)."""
    tables = model.tables
    block = tables.block(start, end)
    names = {name: i for i, name in enumerate(model.cluster.names)}
    if any(c is not None for c in model.curves):

        def timed(name: str, a: int, b: int) -> float:
            d = names[name]
            ra, rb = np.array([a]), np.array([b])
            comp = model.strip_compute(block, ra, rb)[d, 0]
            return float(left[d] + comp + _transfer_estimate(model, start, end, ra, rb, gather)[d, 0])

        return timed
    fl_up, fl_down, const = block.fl_up.tolist(), block.fl_down.tolist(), block.fl_const
    in_lo, in_hi = block.in_lo.tolist(), block.in_hi.tolist()
    speed, left_l = model.speed.tolist(), (left + model.tile_overhead).tolist()  # a strip pays its overhead
    req = model.requester
    lat, spb = model.latency[req].tolist(), model.sec_per_byte[req].tolist()
    halo = _halo_rows(block)
    in_bytes, out_bytes = tables.row_bytes[start], tables.row_bytes[end]
    last = end == tables.n_segments
    final_bytes = model.final_bytes if model.head_split else 0.0  # the head's part, split

    def strip_time(name: str, a: int, b: int) -> float:
        d = names[name]
        t = left_l[d] + (fl_up[b] + fl_down[a] + const) / speed[d]
        rows = in_hi[b] - in_lo[a]
        if start > 0 and not gather:
            rows = min(rows, halo)
        n_bytes = rows * in_bytes
        if last:
            n_bytes += final_bytes or (b - a) * out_bytes
        elif gather:
            n_bytes += (b - a) * out_bytes
        if d != req and n_bytes > 0:
            t += lat[d] + n_bytes * spb[d]
        return t

    return strip_time


def auction_layouts(
    model: CostModel, chosen: list[tuple[int, int, float]], gather: bool = False
) -> tuple[list[StripLayout | None], int]:
    """Strips per chosen block (start, end, start time) from AWAS, and the auction's rounds.

    Per block: the price-rise auction (`meshci.auction.assign`, the core the mesh's
    auctioneer runs in its award round) over strips of the block with simulated bidders'
    costs, each bidder's backlog counted as what is left of it when the block starts (as
    the auctioneer does); the winners, in the order of the rows they won, then get
    contiguous levelled strips from `balance_strips`. Simulated bidders always answer and
    never decline, so on the network this is one bid round and one award round.
    ``gather``: the plan routes every boundary through the requester (bidders price it).
    """
    if model.n_devices == 1:
        return [None] * len(chosen), 0
    names = model.cluster.names
    layouts: list[StripLayout | None] = []
    for s, e, t_start in chosen:
        r0, r1, cost = _bids(model, s, e, ITEMS_PER_DEVICE * model.n_devices, gather)
        left = np.maximum(model.backlog - t_start, 0.0)
        result = assign(cost, left)
        # winners by the mean first row of what they won (integer sums: exact, as mean())
        held = result.owner >= 0
        won = np.bincount(result.owner[held], minlength=model.n_devices)
        rows = np.bincount(result.owner[held], weights=r0[held].astype(np.float64), minlength=model.n_devices)
        bidders = np.flatnonzero(won).tolist()
        mean_row = (rows[won > 0] / won[won > 0]).tolist()
        order = [d for _, d in sorted(zip(mean_row, bidders))]
        block = model.tables.block(s, e)
        strip_time = _strip_timer(model, s, e, left, gather)
        strips = balance_strips(block.height, [names[d] for d in order], strip_time)
        layouts.append(
            StripLayout(
                np.array([names.index(d) for d, _, _ in strips], dtype=np.int64),
                np.array([a for _, a, _ in strips], dtype=np.int64),
                np.array([c for _, _, c in strips], dtype=np.int64),
                BID_ROUNDS * 2,
            )
        )
    return layouts, BID_ROUNDS * 2


def plan_edgeci(model: CostModel, routing: str = "p2p") -> tuple[DPResult, int]:
    """DPFL, then AWAS on the chosen blocks, then the better strips per block (the two DP
    passes share one memo of per-layout costs, `new_memo`). ``routing="requester"``: the
    ``edgeci-gather`` ablation, every boundary through the requester."""
    memo = new_memo(model)
    first = dpfl(model, block_candidates(model), routing=routing, memo=memo)
    distributed = [(s, e, t) for s, e, lay, t in _with_start_times(first) if lay.key != "requester"]
    if not distributed:
        return first, 0
    auctioned, rounds = auction_layouts(model, distributed, gather=routing == "requester")
    options: dict[tuple[int, int], list[StripLayout]] = {(s, e): [lay] for s, e, lay in first.blocks}
    for (s, e, _), lay in zip(distributed, auctioned):
        if lay is not None:
            options[(s, e)].append(lay)
    return dpfl(model, lambda s, e: options.get((s, e), []), routing=routing, memo=memo), rounds


def _with_start_times(result: DPResult) -> list[tuple[int, int, StripLayout, float]]:
    """The DP's blocks with the predicted start time of each (the end of the one before)."""
    out = []
    t = 0.0
    for s, e, lay in result.blocks:
        out.append((s, e, lay, t))
        t = result.block_ends[len(out) - 1]
    return out
