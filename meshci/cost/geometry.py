"""Fast strip geometry of a trunk: O(1) input rows and FLOPs of any full-width row strip.

The planner looks at thousands of candidate strips; asking the segments each time is too
slow. Every op of a segment (conv, pool, pointwise, the two chains of a residual block)
maps an output row range [r0, r1) to an input row range whose start depends only on r0
and whose end only on r1 (clipping at the border is per end). Composing such maps keeps
that property, and the FLOPs of a strip are a sum over ops of (per-row cost x rows at
that op), so for any block of segments [start, end):

    input rows(r0, r1) = (in_lo[r0], in_hi[r1])
    flops(r0, r1)      = fl_up[r1] + fl_down[r0] + fl_const
    rows at the output of segment k = rows_hi[k][r1] - rows_lo[k][r0]

The per-segment tables come from the trunk's own ``Segment.input_region``/``flops_for``
(2 H calls per segment), so they agree with `meshci.tiling` by construction; the tests
check that they do on random strips.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from meshci.trunk import Trunk
from meshci.trunk.region import Region

BYTES_PER_VALUE = 4  # float32 feature maps
GATE_BYTES_PER_VALUE = 8  # an SE gate's partial sums travel as float64


@dataclass(frozen=True, eq=False)
class BlockTable:
    """Tables of the block of segments [start, end) for output strips at boundary ``end``.

    Arrays are indexed by an output row boundary 0..H (H = height at ``end``): ``in_lo``
    and ``fl_down`` by a strip's r0, ``in_hi`` and ``fl_up`` by its r1. ``rows_lo`` /
    ``rows_hi`` have one row per segment of the block.
    """

    start: int
    end: int
    height: int
    in_lo: np.ndarray
    in_hi: np.ndarray
    fl_up: np.ndarray
    fl_down: np.ndarray
    fl_const: float
    rows_lo: np.ndarray
    rows_hi: np.ndarray

    def input_rows(self, r0: int, r1: int) -> tuple[int, int]:
        return int(self.in_lo[r0]), int(self.in_hi[r1])

    def flops(self, r0: np.ndarray | int, r1: np.ndarray | int) -> np.ndarray | float:
        return self.fl_up[r1] + self.fl_down[r0] + self.fl_const


class StripTables:
    """Per-trunk strip tables; build once with `strip_tables(trunk)` (cached per trunk)."""

    def __init__(self, trunk: Trunk) -> None:
        self._segments = list(trunk.segments)
        self._chains: dict[tuple[int, int, Region], tuple[list[Region], float]] = {}
        self.n_segments = len(trunk.segments)
        shapes = [tuple(trunk.boundary_shape(k)) for k in range(self.n_segments + 1)]
        self.channels = [s[0] for s in shapes]
        self.heights = [s[1] for s in shapes]
        self.widths = [s[2] for s in shapes]
        # bytes of one full-width row at each boundary
        self.row_bytes = [c * w * BYTES_PER_VALUE for c, _, w in shapes]
        self.segment_flops = np.array([float(seg.flops) for seg in trunk.segments])
        # SE gates (meshci.trunk.gate): segment k pools its input over the whole map, so a
        # block starting at k receives every previous tile's partial sums (float64, one per
        # channel) with its rows; a block holding one further inside is one whole-map tile
        self.gated = np.array([seg.kind == "gate" for seg in trunk.segments] + [False])
        self.gate_bytes = [int(shapes[k][0]) * GATE_BYTES_PER_VALUE if self.gated[k] else 0
                           for k in range(self.n_segments + 1)]
        self._lo: list[np.ndarray] = []
        self._hi: list[np.ndarray] = []
        self._up: list[np.ndarray] = []
        self._down: list[np.ndarray] = []
        self._total: list[float] = []
        for k, seg in enumerate(trunk.segments):
            h_out, w_out = self.heights[k + 1], self.widths[k + 1]
            h_in = self.heights[k]
            lo = np.empty(h_out + 1, dtype=np.int64)
            hi = np.zeros(h_out + 1, dtype=np.int64)
            up = np.zeros(h_out + 1)
            down = np.zeros(h_out + 1)
            for r in range(h_out):
                region = seg.input_region(Region(r, r + 1, 0, w_out))
                lo[r] = region.r0
                hi[r + 1] = region.r1
                up[r + 1] = seg.flops_for(Region(0, r + 1, 0, w_out))
                down[r] = seg.flops_for(Region(r, h_out, 0, w_out))
            lo[h_out] = h_in  # only reached by empty strips
            self._lo.append(lo)
            self._hi.append(hi)
            self._up.append(up)
            self._down.append(down)
            self._total.append(float(up[h_out]))
        self._blocks: dict[tuple[int, int], BlockTable] = {}
        self._build_blocks()

    def _build_blocks(self) -> None:
        s_count = self.n_segments
        for end in range(1, s_count + 1):
            h = self.heights[end]
            m_lo = np.arange(h + 1, dtype=np.int64)
            m_hi = np.arange(h + 1, dtype=np.int64)
            fl_up = np.zeros(h + 1)
            fl_down = np.zeros(h + 1)
            const = 0.0
            rows_lo: list[np.ndarray] = []
            rows_hi: list[np.ndarray] = []
            for k in range(end - 1, -1, -1):
                # m_lo / m_hi: rows at the output of segment k for each strip end at `end`
                rows_lo.append(m_lo)
                rows_hi.append(m_hi)
                fl_up = fl_up + self._up[k][m_hi]
                fl_down = fl_down + self._down[k][m_lo]
                const -= self._total[k]
                m_lo = self._lo[k][m_lo]
                m_hi = self._hi[k][m_hi]
                self._blocks[(k, end)] = BlockTable(
                    start=k,
                    end=end,
                    height=h,
                    in_lo=m_lo,
                    in_hi=m_hi,
                    fl_up=fl_up,
                    fl_down=fl_down,
                    fl_const=const,
                    rows_lo=np.array(rows_lo[::-1]),
                    rows_hi=np.array(rows_hi[::-1]),
                )

    def block(self, start: int, end: int) -> BlockTable:
        try:
            return self._blocks[(start, end)]
        except KeyError:
            raise ValueError(f"no block [{start}, {end}) in a trunk of {self.n_segments} segments") from None


    def chain(self, start: int, end: int, out: Region) -> tuple[list[Region], float]:
        """Any output region (not only strips) of block [start, end): the regions at the
        boundaries start..end and the block's FLOPs incl. halo (cached, slow path)."""
        key = (start, end, out)
        hit = self._chains.get(key)
        if hit is None:
            regions = [out]
            flops = 0.0
            for k in range(end - 1, start - 1, -1):
                seg = self._segments[k]
                flops += seg.flops_for(regions[-1])
                regions.append(seg.input_region(regions[-1]))
            regions.reverse()
            hit = (regions, flops)
            self._chains[key] = hit
        return hit


_CACHE: dict[int, tuple[weakref.ref, StripTables]] = {}


def strip_tables(trunk: Trunk) -> StripTables:
    """The (cached) strip tables of ``trunk``."""
    key = id(trunk)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is trunk:
        return hit[1]
    tables = StripTables(trunk)
    _CACHE[key] = (weakref.ref(trunk, lambda _ref, key=key: _CACHE.pop(key, None)), tables)
    return tables
