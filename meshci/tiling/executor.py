"""Tile executor: run a fused block of segments on an input tile, stitch tiles together."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from meshci.errors import TilingError
from meshci.tiling.geometry import Block, block_regions
from meshci.trunk.gate import GateSegment, combine, partial_sum
from meshci.trunk.region import Region
from meshci.trunk.segment import crop as _crop
from meshci.trunk.trunk import Trunk


def crop(x: Tensor, have: Region, want: Region) -> Tensor:
    """The part `want` of a tensor whose last two axes cover `have` (a view, no copy)."""
    try:
        return _crop(x, have, want)
    except ValueError as exc:
        # a caller asked for data it does not hold: a tiling mistake, not a crash
        raise TilingError(str(exc)) from exc


@torch.no_grad()
def run_block(trunk: Trunk, start: int, end: int, x: Tensor, have: Region, out: Region,
              mean: Tensor | None = None) -> Tensor:
    """Exactly `out` of boundary `end`, from `x` covering `have` of boundary `start`.

    `have` must contain block_input_region(trunk, start, end, out). A block that starts
    with an SE gate needs `mean`, the per-channel mean of boundary `start` (`block_mean`),
    unless `x` covers the whole map; a gate further inside the block needs the whole map
    there (a one-tile block).
    """
    regions = block_regions(trunk, start, end, out)
    y = crop(x, have, regions[0])
    for k, seg, r_in, r_out in zip(range(start, end), trunk.segments[start:end], regions[:-1], regions[1:]):
        if isinstance(seg, GateSegment):
            try:
                y = seg.run(y, r_in, r_out, mean if k == start else None)
            except ValueError as exc:
                raise TilingError(f"block [{start}, {end}): {exc}") from exc
        else:
            y = seg.run(y, r_in, r_out)
    return y


def gate_starts(trunk: Trunk, start: int) -> bool:
    """Whether the block starting at boundary `start` opens with an SE gate (its tiles then
    need the boundary's mean, combined from the previous block's partial sums)."""
    return start < len(trunk.segments) and isinstance(trunk.segments[start], GateSegment)


def block_mean(trunk: Trunk, boundary: int, pieces: Sequence[tuple[Region, Tensor]]) -> Tensor:
    """The per-channel mean of boundary `boundary` from the previous block's output tiles
    (each tile's partial sum, then their sum over the map's area); the tiles must partition it."""
    _, h, w = trunk.boundary_shape(boundary)
    if sum(r.area for r, _ in pieces) != h * w:
        raise TilingError(f"the tiles at boundary {boundary} cover {sum(r.area for r, _ in pieces)} "
                          f"cells of a {h}x{w} map: their partial sums do not make its mean")
    return combine([partial_sum(t) for _, t in pieces], h * w)


def interior_gates(trunk: Trunk, start: int, end: int) -> list[int]:
    """The SE gates strictly inside block [start, end): such a block must be one whole-map tile."""
    return [k for k in range(start + 1, end) if isinstance(trunk.segments[k], GateSegment)]


def assemble(want: Region, pieces: Sequence[tuple[Region, Tensor]]) -> Tensor:
    """One tensor covering `want` from pieces (region, tensor) that together cover it."""
    if not pieces:
        raise TilingError(f"no pieces to assemble {want}")
    first = pieces[0][1]
    out = first.new_empty((*first.shape[:-2], want.height, want.width))
    covered = torch.zeros((want.height, want.width), dtype=torch.bool)
    for region, tensor in pieces:
        if tuple(tensor.shape[-2:]) != (region.height, region.width):
            raise TilingError(f"piece of spatial size {tuple(tensor.shape[-2:])} does not match region {region}")
        part = region.intersect(want)
        if part is None:
            continue
        dst = part.shift(-want.r0, -want.c0)
        out[..., dst.r0 : dst.r1, dst.c0 : dst.c1] = crop(tensor, region, part)
        covered[dst.r0 : dst.r1, dst.c0 : dst.c1] = True
    if not bool(covered.all()):
        rows = torch.nonzero(~covered)[0].tolist()
        raise TilingError(f"pieces leave {want} uncovered (e.g. at row {rows[0] + want.r0}, col {rows[1] + want.c0})")
    return out


def check_blocks(trunk: Trunk, blocks: Sequence[Block]) -> None:
    """Blocks must follow each other and cover the whole trunk; a block with an SE gate
    inside it is one whole-map tile."""
    expected = 0
    for start, end, tiles in blocks:
        if start != expected or end <= start:
            raise TilingError(f"block [{start}, {end}) does not follow boundary {expected}")
        if not tiles:
            raise TilingError(f"block [{start}, {end}) has no tiles")
        gates = interior_gates(trunk, start, end)
        if gates and list(tiles) != [trunk.boundary_region(end)]:
            raise TilingError(f"block [{start}, {end}) holds the SE gate of segment {gates[0]} inside it: "
                              "it must start a block, or the block be one whole-map tile")
        expected = end
    if expected != len(trunk.segments):
        raise TilingError(f"blocks end at boundary {expected}, the trunk has {len(trunk.segments)} segments")


@torch.no_grad()
def run_tiled(trunk: Trunk, x: Tensor, blocks: Sequence[Block]) -> tuple[Tensor, list[Tensor]]:
    """Run the trunk block by block, each block tile by tile, then the head.

    Returns (head output, boundaries), boundaries = [x, output of block 0, ..., output of
    the last block] as whole feature maps.
    """
    check_blocks(trunk, blocks)
    boundaries = [x]
    pieces: list[tuple[Region, Tensor]] = [(trunk.boundary_region(0), x)]
    for start, end, tiles in blocks:
        have = trunk.boundary_region(start)
        # an SE gate at the block's start: the previous tiles' partial sums, as the mesh combines them
        mean = block_mean(trunk, start, pieces) if gate_starts(trunk, start) else None
        pieces = [(t, run_block(trunk, start, end, boundaries[-1], have, t, mean)) for t in tiles]
        boundaries.append(assemble(trunk.boundary_region(end), pieces))
    return trunk.head(boundaries[-1]), boundaries


@dataclass(frozen=True)
class TiledCheck:
    """How far a tiled run is from the monolithic one (logits and every block boundary)."""

    max_abs_diff: float
    ok: bool  # torch.allclose(tiled, monolithic, rtol, atol) for every compared tensor
    compared: int  # how many tensors were compared


@torch.no_grad()
def check_tiled(trunk: Trunk, x: Tensor, blocks: Sequence[Block], rtol: float = 1e-4, atol: float = 1e-5) -> TiledCheck:
    """Run `blocks` tiled and the trunk monolithically on `x`; compare logits and boundaries."""
    reference = trunk.forward_boundaries(x)
    logits, boundaries = run_tiled(trunk, x, blocks)
    pairs = [(logits, trunk.head(reference[-1]))]
    pairs += [(b, reference[end]) for b, (_, end, _) in zip(boundaries[1:], blocks)]
    diff = max(float((a - b).abs().max()) for a, b in pairs)
    ok = all(a.shape == b.shape and torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in pairs)
    return TiledCheck(diff, ok, len(pairs))
