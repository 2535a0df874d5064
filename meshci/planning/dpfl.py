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

Speed: the candidate layouts of a block are timed together (their strips stacked in one
array, `_Block`), so a predecessor costs a handful of numpy operations for all of them;
what does not depend on the start time (compute, input rows, receive seconds from given
holders) is kept in a memo that several passes over the same layouts share (`new_memo`).
Predecessors are visited in order of their end time and the scan stops when a lower bound
(the block's compute alone, started no earlier than the predecessor's end) cannot beat the
best found, which is exact. The timings are the cost model's to the bit (the tests
compare the DP with one that times every transition by `CostModel.strip_block`).
States at one boundary with the same layout (the requester-only one, and the same split
reached from different starts) keep only the earliest.
Under ``routing="requester"`` the holders are always the requester, so one state per
boundary suffices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
        return b"|".join(np.asarray(a, dtype=np.int64).tobytes() for a in (self.devices, self.r0, self.r1))

    def as_tiles(self) -> list[tuple[int, int, int]]:
        return [(int(d), int(a), int(b)) for d, a, b in zip(self.devices, self.r0, self.r1)]


Candidates = Callable[[int, int], Sequence[StripLayout]]


@dataclass
class _State:
    end_time: float
    start: int
    layout: StripLayout
    parent: _State | None
    comp: np.ndarray = field(repr=False)


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


class _Block:
    """The candidate layouts of one block with their strips stacked, so that one numpy pass
    times all of them: compute seconds, input rows, output sends; and, per predecessor,
    every layout's end time (`ends`). Each strip's numbers come from the same elementwise
    arithmetic as `CostModel.strip_block` on its own layout (bytes are exact integers, so
    integer rows x row bytes converts to the same float), so the end times agree to the
    bit; the tests compare them with `CostModel.strip_block`."""

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
        self.bounds: list[int] = np.cumsum([0, *sizes]).tolist()
        self.row_bytes = tables.row_bytes[start]
        self.gate_bytes = tables.gate_bytes[start]
        lo = block.in_lo[r0]
        hi = block.in_hi[r1]
        self.lo_col = lo[:, None]
        self.hi_col = hi[:, None]
        self.dev_col = devices[:, None]
        self.requester_rows = (hi - lo)[:, None]
        self.requester_src = np.array([model.requester])
        # [strip, holder device]: the link from the holder to the strip's device
        self.lat_t = model.latency[:, devices].T
        self.spb_t = model.sec_per_byte[:, devices].T
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
        spans = list(zip(self.bounds, self.bounds[1:]))
        self.comps = [self.comp[a:b] for a, b in spans]
        self.comp_max: list[float] = np.maximum.reduceat(self.comp, self.offsets).tolist()
        self.backlog = model.backlog[devices]
        self.backlog_max: list[float] = np.maximum.reduceat(self.backlog, self.offsets).tolist()
        if gather:
            out_bytes = ((r1 - r0) * tables.row_bytes[end]).astype(np.float64)
            sender = model.final_send_seconds if final else model.send_seconds
            self.send = sender(devices, out_bytes)
        else:
            self.send = np.zeros(devices.size)
        self.sends = bool(self.send.any())
        self._recv: dict[StripLayout | None, np.ndarray] = {}
        self._ends: dict[tuple[StripLayout | None, float], list[float]] = {}

    def lower(self, i: int, t0: float) -> float:
        """Layout i's end if it started at ``t0`` with no transfer at all."""
        if t0 >= self.backlog_max[i]:
            # max_j(t0 + c_j) == t0 + max_j c_j exactly (rounding is monotone)
            return t0 + self.comp_max[i]
        a, b = self.bounds[i], self.bounds[i + 1]
        return float((np.maximum(self.backlog[a:b], t0) + self.comp[a:b]).max())

    def recv(self, pred: StripLayout | None) -> np.ndarray:
        """Receive seconds per strip from the holders ``pred`` (None: the requester holds
        the whole input), reduced over holders as `CostModel.block_timing` reduces them
        (slowest message on a switched medium, their sum on a shared one)."""
        hit = self._recv.get(pred)
        if hit is None:
            if pred is None:
                src = self.requester_src
                rows = self.requester_rows
            else:
                src = pred.devices
                rows = np.minimum(self.hi_col, pred.r1) - np.maximum(self.lo_col, pred.r0)
            if self.gate_bytes:
                # an SE gate starts the block: every holder also sends its partial sums
                sent = self.dev_col != src
                n_bytes = np.maximum(rows, 0) * self.row_bytes + self.gate_bytes
                recv = np.where(sent, self.lat_t[:, src] + n_bytes * self.spb_t[:, src], 0.0)
            else:
                sent = (rows > 0) & (self.dev_col != src)
                recv = np.where(sent, self.lat_t[:, src] + (rows * self.row_bytes) * self.spb_t[:, src], 0.0)
            hit = self._recv[pred] = recv.sum(axis=1) if self.model.shared else recv.max(axis=1)
        return hit

    def ends(self, pred: StripLayout | None, t0: float) -> list[float]:
        """Every layout's end time when it starts at ``t0`` after holders ``pred``."""
        key = (pred, t0)
        hit = self._ends.get(key)
        if hit is not None:
            return hit
        recv = self.recv(pred)
        model = self.model
        if model.shared:
            hit = []
            for i, lay in enumerate(self.layouts):
                a, b = self.bounds[i], self.bounds[i + 1]
                # a one-column receive matrix: its row sums are the per-strip sums
                timing = model.block_timing(t0, lay.devices, self.comp[a:b], recv[a:b, None], self.send[a:b])
                hit.append(timing[1])
        else:
            finish = np.maximum(t0 + recv, self.backlog) + self.comp
            if self.sends:
                finish = finish + self.send
            hit = np.maximum.reduceat(finish, self.offsets).tolist()
        self._ends[key] = hit
        return hit


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
    init = _State(0.0, -1, init_layout, None, np.zeros(1))
    states: list[list[_State]] = [[init]] + [[] for _ in range(n_seg)]
    ordered: list[list[_State] | None] = [None] * (n_seg + 1)
    transitions = 0
    # rest[k]: lower bound on the time from boundary k to the end of the head
    seg_lb = segment_lower_bounds(model) if np.isfinite(upper_bound) else np.zeros(n_seg)
    rest = np.append(np.cumsum(seg_lb[::-1])[::-1], 0.0) + model.head_s
    rest_l = rest.tolist()
    limit = upper_bound * (1.0 + 1e-12) if np.isfinite(upper_bound) else np.inf
    p2p = routing == "p2p"
    for e in range(1, n_seg + 1):
        gather = e == n_seg or routing == "requester"
        rest_e = rest_l[e]
        for s in range(e):
            preds = ordered[s]
            if preds is None:
                preds = ordered[s] = sorted(states[s], key=lambda st: st.end_time)
            if not preds or preds[0].end_time + rest_l[s] > limit:
                continue
            layouts = candidates(s, e)
            if tables.gated[s + 1:e].any():
                # an SE gate inside the block: only one device holding the whole map can pool it
                layouts = [lay for lay in layouts if lay.devices.size == 1 and int(lay.r0[0]) == 0
                           and int(lay.r1[0]) == tables.heights[e]]
            if not layouts:
                continue
            costs = memo.block(s, e, gather, layouts)
            for i, layout in enumerate(layouts):
                best_t = np.inf
                best_pred: _State | None = None
                for pred in preds:
                    lower = costs.lower(i, pred.end_time)
                    if lower >= best_t or lower + rest_e > limit:
                        break
                    t = costs.ends(pred.layout if p2p else None, pred.end_time)[i]
                    transitions += 1
                    if t < best_t:
                        best_t, best_pred = t, pred
                if best_pred is not None and best_t + rest_e <= limit:
                    states[e].append(_State(best_t, s, layout, best_pred, costs.comps[i]))
        states[e] = _dedupe(states[e], everything=routing == "requester")
    final = min(states[n_seg], key=lambda st: st.end_time)
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
