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

Speed: each transition is a handful of numpy operations; predecessors are visited in
order of their end time and the scan stops when a lower bound (the block's compute alone,
started no earlier than the predecessor's end) cannot beat the best found, which is exact.
States at one boundary with the same layout (the requester-only one, and the same split
reached from different starts) keep only the earliest.
Under ``routing="requester"`` the holders are always the requester, so one state per
boundary suffices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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

    @property
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


def dpfl(
    model: CostModel,
    candidates: Candidates,
    *,
    routing: str = "p2p",
    upper_bound: float = np.inf,
) -> DPResult:
    """Optimal cuts and layouts over the candidate layouts (module docstring).

    ``upper_bound``: the latency of a plan known to be reachable through these candidates
    (e.g. from a first pass over a subset of them). States and blocks that cannot finish
    below it even if the rest of the trunk ran ideally parallel are skipped (exact: the
    optimal path never exceeds it, and the pruning is strict).
    """
    n_seg = model.n_segments
    tables = model.tables
    init_layout = requester_layout(model, tables.heights[0])
    init = _State(0.0, -1, init_layout, None, np.zeros(1))
    states: list[list[_State]] = [[init]] + [[] for _ in range(n_seg)]
    backlog = model.backlog
    transitions = 0
    # rest[k]: lower bound on the time from boundary k to the end of the head
    seg_lb = segment_lower_bounds(model) if np.isfinite(upper_bound) else np.zeros(n_seg)
    rest = np.append(np.cumsum(seg_lb[::-1])[::-1], 0.0) + model.head_s
    limit = upper_bound * (1.0 + 1e-12) if np.isfinite(upper_bound) else np.inf
    for e in range(1, n_seg + 1):
        gather = e == n_seg or routing == "requester"
        for s in range(e):
            preds = sorted(states[s], key=lambda st: st.end_time)
            if not preds or preds[0].end_time + rest[s] > limit:
                continue
            block = tables.block(s, e)
            for layout in candidates(s, e):
                idx = np.arange(layout.devices.size)
                comp = model.strip_compute(block, layout.r0, layout.r1)[layout.devices, idx]
                lb_backlog = backlog[layout.devices]
                best_t = np.inf
                best_pred: _State | None = None
                for pred in preds:
                    lower = float((np.maximum(lb_backlog, pred.end_time) + comp).max())
                    if lower >= best_t or lower + rest[e] > limit:
                        break
                    holders = None
                    if routing == "p2p":
                        holders = (pred.layout.devices, pred.layout.r0, pred.layout.r1)
                    _, t = model.strip_block(
                        pred.end_time, s, e, layout.devices, layout.r0, layout.r1, holders, gather, comp
                    )
                    transitions += 1
                    if t < best_t:
                        best_t, best_pred = t, pred
                if best_pred is not None and best_t + rest[e] <= limit:
                    states[e].append(_State(best_t, s, layout, best_pred, comp))
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
