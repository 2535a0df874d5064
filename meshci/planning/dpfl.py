"""DPFL: the bottom-up dynamic programme over fused-block cuts (EdgeCI, Chen et al. 2024).

The trunk's S segments are cut into consecutive fused blocks; each block [s, e) gets one
of a few candidate *layouts* (full-width row strips, one per device), among them the
block on the requester alone and splits over the k fastest devices for several degrees
k (see `meshci.planning.edgeci`). Under the cost model (`meshci.cost.model`) a block's end
time depends only on its own layout, on the layout of the block before it (who holds the
rows it needs) and on its start time, and it never decreases when the block starts later.

So the programme runs over boundaries e = 1..S in order (bottom-up, no recursion): a
*state* at boundary e is a block [s, e) with one of its layouts, valued by the earliest
time it can end over all ways of reaching boundary s. With monotone block times, the
earliest end of a state is reached from the earliest ends of the states before it
(the FIFO property of time-dependent shortest paths), so the DP's optimum equals the
best plan over every cut set and every choice of candidate layouts — the tests check this
against brute-force enumeration on small trunks.

Speed: a block is timed once against all the states it can follow: the strips of its
candidate layouts are stacked (`_Block`), so are the strips of the states at its start
boundary (`_Holders`, built once per boundary), and a handful of numpy operations give the
end time of every layout after every state; per layout the earliest wins (the first state,
by end time, on a tie). What does not depend on the states (compute, input rows, sends, the
shared medium's receive order) is kept per block in a memo that several passes over the same
layouts share (`new_memo`). The timings are the cost model's to the bit (the tests compare
the DP with one that times every transition by `CostModel.strip_block`).
States at one boundary with the same layout (the requester-only one, and the same split
reached from different starts) keep only the earliest.
Under ``routing="requester"`` the holders are always the requester, so one state per
boundary suffices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from meshci.cost.model import CostModel


@dataclass(frozen=True, eq=False)
class StripLayout:
    """Full-width output strips of one block, one per device, in row order."""

    devices: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    rounds: int = 0
    key: str = ""  # names the requester-only layout; plans report no auction for it

    def __post_init__(self) -> None:
        if not (self.devices.size == self.r0.size == self.r1.size) or self.devices.size == 0:
            raise ValueError("a layout needs one (r0, r1) per device and at least one device")

    @cached_property
    def signature(self) -> bytes:
        """Equal for layouts with the same strips on the same devices."""
        return np.concatenate((self.devices, self.r0, self.r1)).astype(np.int64, copy=False).tobytes()

    def as_tiles(self) -> list[tuple[int, int, int]]:
        return [(int(d), int(a), int(b)) for d, a, b in zip(self.devices, self.r0, self.r1)]


Candidates = Callable[[int, int], Sequence[StripLayout]]


@dataclass
class _State:
    end_time: float
    start: int
    layout: StripLayout
    parent: _State | None


@dataclass(frozen=True)
class DPResult:
    """The optimum: latency (incl. head) and the blocks (start, end, layout)."""

    latency_s: float
    blocks: tuple[tuple[int, int, StripLayout], ...]
    transitions: int
    block_ends: tuple[float, ...] = ()


def requester_layout(model: CostModel, height: int) -> StripLayout:
    return StripLayout(
        np.array([model.requester]), np.array([0]), np.array([height]), 0, key="requester"
    )


def segment_lower_bounds(model: CostModel) -> np.ndarray:
    """Per segment, a lower bound on its time however it is split: the whole map's work
    shared by every device at once in proportion to speed (no halo, transfer or backlog).
    Valid for curves too: a share f of the rows costs a device at least f x its full-map
    time (its fixed cost a is paid at least once)."""
    n_seg = model.n_segments
    bounds = np.empty(n_seg)
    for k in range(n_seg):
        block = model.tables.block(k, k + 1)
        full = model.strip_compute(block, np.array([0]), np.array([block.height]))[:, 0]
        bounds[k] = 1.0 / float((1.0 / np.maximum(full, 1e-300)).sum())
    return bounds


class _Layouts:
    """Per-block costs that do not depend on the predecessor's end time, kept across the
    DP passes of one plan (`dpfl`'s ``memo``): one `_Block` per block and candidate list."""

    def __init__(self, model: CostModel) -> None:
        self.model = model
        self.blocks: dict[tuple[int, int, bool, tuple[StripLayout, ...]], _Block] = {}

    def block(self, start: int, end: int, gather: bool, layouts: Sequence[StripLayout]) -> _Block:
        key = (start, end, gather, tuple(layouts))
        hit = self.blocks.get(key)
        if hit is None:
            hit = self.blocks[key] = _Block(self.model, start, end, gather, key[3])
        return hit


class _Holders:
    """The states at one boundary, earliest end first, with the strips of their layouts
    stacked: the holders of the next block's input under ``p2p`` routing (else the
    requester holds it all). Built once per boundary, used by every block starting there."""

    def __init__(self, states: list[_State], p2p: bool) -> None:
        self.states = sorted(states, key=lambda st: st.end_time)
        self.t0 = np.array([st.end_time for st in self.states])
        self.t0_col = self.t0[:, None]
        self.p2p = p2p
        if p2p and self.states:
            layouts = [st.layout for st in self.states]
            self.devices = np.concatenate([lay.devices for lay in layouts])
            self.r0 = np.concatenate([lay.r0 for lay in layouts])
            self.r1 = np.concatenate([lay.r1 for lay in layouts])
            bounds = np.cumsum([0] + [lay.devices.size for lay in layouts])
            self.offsets = bounds[:-1]
            self.spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


class _Block:
    """The candidate layouts of one block with their strips stacked, so that one numpy pass
    times all of them after all the states before them (`best`): compute seconds, input
    rows, output sends; then, per predecessor, every layout's end time. Each strip's
    numbers come from the same elementwise arithmetic as `CostModel.strip_block` on its own
    layout (bytes are exact integers, so integer rows x row bytes converts to the same
    float; sums over a strip's holders and a layout's strips are taken over the same
    values in the same order), so the end times agree to the bit; the tests compare them
    with `CostModel.strip_block`."""

    def __init__(
        self, model: CostModel, start: int, end: int, gather: bool, layouts: tuple[StripLayout, ...]
    ) -> None:
        tables = model.tables
        block = tables.block(start, end)
        self.model = model
        self.layouts = layouts
        devices = np.concatenate([lay.devices for lay in layouts])
        r0 = np.concatenate([lay.r0 for lay in layouts])
        r1 = np.concatenate([lay.r1 for lay in layouts])
        sizes = [lay.devices.size for lay in layouts]
        self.offsets = np.cumsum([0, *sizes[:-1]])
        bounds = np.cumsum([0, *sizes]).tolist()
        self.spans = list(zip(bounds, bounds[1:]))
        self.row_bytes = tables.row_bytes[start]
        lo = block.in_lo[r0]
        hi = block.in_hi[r1]
        self.lo_col = lo[:, None]
        self.hi_col = hi[:, None]
        self.devices = devices
        self.dev_col = devices[:, None]
        self.requester_rows = (hi - lo)[:, None]
        if model.curves_free and bool((r1 > r0).all()):
            # strip_compute's flops / speed, for each strip's own device only
            self.comp = block.flops(r0, r1) / model.speed[devices]
        else:
            self.comp = np.concatenate(
                [
                    model.strip_compute(block, lay.r0, lay.r1)[lay.devices, np.arange(lay.devices.size)]
                    for lay in layouts
                ]
            )
        final = end == model.n_segments
        if gather and final and model.head_split:
            # strip_block's order: compute, then the strip's part of the split head
            self.comp = self.comp + model.prefix_seconds(devices, r0, r1)
        self.backlog = model.backlog[devices]
        if gather:
            out_bytes = ((r1 - r0) * tables.row_bytes[end]).astype(np.float64)
            sender = model.final_send_seconds if final else model.send_seconds
            self.send = sender(devices, out_bytes)
        else:
            self.send = np.zeros(devices.size)
        self.sends = bool(self.send.any())
        if model.shared:
            self._shared_orders(sizes)

    def _shared_orders(self, sizes: list[int]) -> None:
        """Per layout, its strips in `CostModel.block_timing`'s receive order (longest
        compute first, ties by index) and in index order, padded with a dummy strip
        (index K)."""
        k = self.comp.size
        which = np.repeat(np.arange(len(sizes)), sizes)
        column = np.arange(k) - self.offsets[which]
        self.by_index = np.full((len(sizes), max(sizes)), k)
        self.by_index[which, column] = np.arange(k)
        self.padding = self.by_index == k
        self.by_comp = np.full((len(sizes), max(sizes)), k)
        self.by_comp[which, column] = np.lexsort((np.arange(k), -self.comp, which))

    def receive(self, holders: _Holders) -> np.ndarray:
        """Receive seconds [holder state, strip] from each state's strips (the requester's
        whole input when not p2p), reduced over a strip's holders as
        `CostModel.block_timing` reduces them: the slowest message on a switched medium,
        their sum on a shared one."""
        model = self.model
        lat = model.latency
        spb = model.sec_per_byte
        if not holders.p2p:
            req = model.requester
            sent = (self.requester_rows > 0) & (self.dev_col != req)
            recv = np.where(sent, lat[req, self.dev_col] + (self.requester_rows * self.row_bytes) * spb[req, self.dev_col], 0.0)
            recv = recv[:, 0] if not model.shared else recv.sum(axis=1)
            return np.broadcast_to(recv, (holders.t0.size, recv.size))
        src = holders.devices
        rows = np.minimum(self.hi_col, holders.r1) - np.maximum(self.lo_col, holders.r0)
        sent = (rows > 0) & (self.dev_col != src)
        recv = np.where(sent, lat[src, self.dev_col] + (rows * self.row_bytes) * spb[src, self.dev_col], 0.0)
        if model.shared:
            return np.stack([recv[:, a:b].sum(axis=1) for a, b in holders.spans])
        return np.maximum.reduceat(recv, holders.offsets, axis=1).T

    def ends(self, holders: _Holders) -> np.ndarray:
        """Every layout's end time [holder state, layout] when it starts at that state's
        end, after it."""
        recv = self.receive(holders)
        t0 = holders.t0_col
        if self.model.shared:
            finish = self._shared_finish(t0, recv)
        else:
            finish = np.maximum(t0 + recv, self.backlog) + self.comp
            if self.sends:
                finish = finish + self.send
        return np.maximum.reduceat(finish, self.offsets, axis=1)

    def lower(self, holders: _Holders) -> np.ndarray:
        """Every layout's end [holder state, layout] if it started at that state's end with
        no transfer at all (a lower bound of `ends`)."""
        finish = np.maximum(self.backlog, holders.t0_col) + self.comp
        return np.maximum.reduceat(finish, self.offsets, axis=1)

    def _shared_finish(self, t0: np.ndarray, recv: np.ndarray) -> np.ndarray:
        """`CostModel.block_timing` on a shared medium, for every state and layout at
        once: each layout's receives one after another in its order, then its sends in
        order of finish time on the channel."""
        n_states, k = recv.shape
        padded = np.concatenate([recv, np.zeros((n_states, 1))], axis=1)
        done = np.empty((n_states, k + 1))
        done[:, self.by_comp] = t0[:, :, None] + np.cumsum(padded[:, self.by_comp], axis=2)
        done = np.where(recv > 0, done[:, :k], t0)
        finish = np.maximum(done, self.backlog) + self.comp
        if not self.sends:
            return finish
        # the channel is free once all receives are done: t0 + each layout's receive total
        channel = t0 + np.stack([recv[:, a:b].sum(axis=1) for a, b in self.spans], axis=1)
        fin = np.concatenate([finish, np.full((n_states, 1), np.inf)], axis=1)[:, self.by_index]
        send = np.broadcast_to(np.append(self.send, 0.0)[self.by_index], fin.shape)
        order = np.argsort(fin, axis=2, kind="stable")  # by finish, ties by index
        for j in range(order.shape[2]):
            at = order[:, :, j : j + 1]
            f = np.take_along_axis(fin, at, axis=2)[:, :, 0]
            s = np.take_along_axis(send, at, axis=2)[:, :, 0]
            sending = s > 0
            channel = np.where(sending, np.maximum(channel, f) + s, channel)
            np.put_along_axis(fin, at, np.where(sending, channel, f)[:, :, None], axis=2)
        out = np.empty((n_states, k + 1))
        out[:, self.by_index] = np.where(self.padding, -np.inf, fin)
        return out[:, :k]


def dpfl(
    model: CostModel,
    candidates: Candidates,
    *,
    routing: str = "p2p",
    upper_bound: float = np.inf,
    memo: _Layouts | None = None,
) -> DPResult:
    """Optimal cuts and layouts over the candidate layouts (module docstring).

    ``upper_bound``: the latency of a plan known to be reachable through these candidates
    (e.g. from a first pass over a subset of them). States and blocks that cannot finish
    below it even if the rest of the trunk ran ideally parallel are skipped (exact: the
    optimal path never exceeds it, and the pruning is strict).
    ``memo``: per-layout costs shared by several passes over the same layouts
    (`new_memo`); the result is the same with or without it.
    """
    n_seg = model.n_segments
    tables = model.tables
    memo = memo if memo is not None and memo.model is model else _Layouts(model)
    init_layout = requester_layout(model, tables.heights[0])
    init = _State(0.0, -1, init_layout, None)
    p2p = routing == "p2p"
    holders: list[_Holders] = [_Holders([init], p2p)]
    transitions = 0
    # rest[k]: lower bound on the time from boundary k to the end of the head
    bounded = bool(np.isfinite(upper_bound))
    seg_lb = segment_lower_bounds(model) if bounded else np.zeros(n_seg)
    rest = np.append(np.cumsum(seg_lb[::-1])[::-1], 0.0) + model.head_s
    rest_l = rest.tolist()
    limit = upper_bound * (1.0 + 1e-12) if bounded else np.inf
    for e in range(1, n_seg + 1):
        gather = e == n_seg or routing == "requester"
        rest_e = rest_l[e]
        found: list[_State] = []
        for s in range(e):
            preds = holders[s]
            if not preds.states or preds.states[0].end_time + rest_l[s] > limit:
                continue
            layouts = candidates(s, e)
            if not layouts:
                continue
            costs = memo.block(s, e, gather, layouts)
            ends = costs.ends(preds)
            if bounded:
                # a state whose start alone (no transfer) cannot end the trunk below the bound
                usable = costs.lower(preds) + rest_e <= limit
                transitions += int(usable.sum())
                ends = np.where(usable, ends, np.inf)
            else:
                transitions += ends.size
            # per layout the first (earliest-ending) state with the earliest end
            pick = ends.argmin(axis=0).tolist()
            best = ends[pick, range(len(layouts))].tolist()
            for layout, p, t in zip(layouts, pick, best):
                if t + rest_e <= limit:
                    found.append(_State(t, s, layout, preds.states[p]))
        holders.append(_Holders(_dedupe(found, everything=routing == "requester"), p2p))
    final = holders[n_seg].states[0]
    blocks: list[tuple[int, int, StripLayout]] = []
    ends: list[float] = []
    node: _State | None = final
    end = n_seg
    while node is not None and node.start >= 0:
        blocks.append((node.start, end, node.layout))
        ends.append(node.end_time)
        end = node.start
        node = node.parent
    blocks.reverse()
    ends.reverse()
    return DPResult(final.end_time + model.head_s, tuple(blocks), transitions, tuple(ends))


def new_memo(model: CostModel) -> _Layouts:
    """A per-layout cost memo for several `dpfl` passes on ``model`` (see `dpfl`)."""
    return _Layouts(model)


def _dedupe(states: list[_State], everything: bool) -> list[_State]:
    """Keep the earliest state per identical layout (or the earliest of all): a later
    state with the same holders can only lead to later ends (monotone block times)."""
    if everything and states:
        return [min(states, key=lambda st: st.end_time)]
    best: dict[bytes, _State] = {}
    for st in states:
        key = st.layout.signature
        prev = best.get(key)
        if prev is None or st.end_time < prev.end_time:
            best[key] = st
    return list(best.values())
