"""Tiling geometry: which input a fused block of segments needs for an output tile, and
how much work (halo included) computing that tile costs.

A block is the half-open segment range [start, end). Regions at its boundaries are
computed backwards from the requested output region, each clipped to its map; the part
a window hangs off the real map is border padding that the executor applies explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshci.errors import TilingError
from meshci.trunk.region import Region
from meshci.trunk.trunk import Trunk

Block = tuple[int, int, Sequence[Region]]  # (start, end, output tiles)


def check_range(trunk: Trunk, start: int, end: int) -> None:
    if not 0 <= start < end <= len(trunk.segments):
        raise TilingError(f"segment range [{start}, {end}) is not inside 0..{len(trunk.segments)} or is empty")


def check_region(trunk: Trunk, k: int, region: Region) -> None:
    full = trunk.boundary_region(k)
    if region.empty or not full.contains(region):
        raise TilingError(f"region {region} is empty or outside the {full.height}x{full.width} map at boundary {k}")


def block_regions(trunk: Trunk, start: int, end: int, out: Region) -> list[Region]:
    """The region needed at each boundary start..end (the last is `out`)."""
    check_range(trunk, start, end)
    check_region(trunk, end, out)
    regions = [out]
    for seg in reversed(trunk.segments[start:end]):
        regions.append(seg.input_region(regions[-1]))
    regions.reverse()
    return regions


def block_input_region(trunk: Trunk, start: int, end: int, out: Region) -> Region:
    """The input region (clipped to the map at boundary `start`) that `out` depends on."""
    return block_regions(trunk, start, end, out)[0]


def block_flops(trunk: Trunk, start: int, end: int, out: Region) -> float:
    """FLOPs to compute `out` from the block input, counting every region actually computed."""
    regions = block_regions(trunk, start, end, out)
    return sum(seg.flops_for(r) for seg, r in zip(trunk.segments[start:end], regions[1:]))


def receptive_field(trunk: Trunk, start: int, end: int) -> tuple[int, int]:
    """Rows and columns of the block input that one output pixel depends on (unclipped)."""
    check_range(trunk, start, end)
    region = Region(0, 1, 0, 1)
    for seg in reversed(trunk.segments[start:end]):
        region = seg.need(region)
    return region.height, region.width


def split_rows(height: int, n: int) -> list[tuple[int, int]]:
    """n near-equal strips [r0, r1) covering 0..height, the larger ones first."""
    if n < 1:
        raise TilingError(f"need at least one tile, got {n}")
    if n > height:
        raise TilingError(f"cannot cut {height} rows into {n} tiles")
    base, extra = divmod(height, n)
    bounds, r = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        bounds.append((r, r + size))
        r += size
    return bounds


def split_rows_weighted(height: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Strips with rows proportional to `weights` (largest remainder), each at least one row."""
    n = len(weights)
    if n < 1:
        raise TilingError("need at least one weight")
    if n > height:
        raise TilingError(f"cannot cut {height} rows into {n} tiles")
    if any(not w > 0 for w in weights):
        raise TilingError(f"strip weights must be positive, got {list(weights)}")
    spare = height - n  # every strip gets one row; the rest is shared by weight
    total = float(sum(weights))
    shares = [w / total * spare for w in weights]
    sizes = [1 + int(s) for s in shares]
    left = height - sum(sizes)
    order = sorted(range(n), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in order[:left]:
        sizes[i] += 1
    bounds, r = [], 0
    for size in sizes:
        bounds.append((r, r + size))
        r += size
    return bounds


def grid_regions(height: int, width: int, rows: int, cols: int) -> list[Region]:
    """rows x cols tiles in row-major order (DeepThings-style grid)."""
    row_bounds = split_rows(height, rows)
    try:
        col_bounds = split_rows(width, cols)
    except TilingError as exc:
        # same check as for rows, but the message should say columns
        raise TilingError(f"cannot cut {width} columns into {cols} tiles") from exc
    return [Region(r0, r1, c0, c1) for r0, r1 in row_bounds for c0, c1 in col_bounds]


def strip_regions(height: int, width: int, n: int) -> list[Region]:
    """n full-width row strips."""
    return [Region(r0, r1, 0, width) for r0, r1 in split_rows(height, n)]


def redundant_flops(trunk: Trunk, blocks: Sequence[Block]) -> dict[str, float]:
    """Work of a tiling against the untiled work of the same segments.

    total: FLOPs of every tile of every block, halo included; ideal: each block computed
    untiled (its whole output map at once); redundant = total - ideal;
    percent = 100 * redundant / ideal. Redundancy is negative only where a window's stride
    exceeds its span, so that tiles skip input cells the untiled run computes for nothing.
    """
    total = 0.0
    ideal = 0.0
    for start, end, tiles in blocks:
        check_range(trunk, start, end)
        total += sum(block_flops(trunk, start, end, t) for t in tiles)
        ideal += block_flops(trunk, start, end, trunk.boundary_region(end))
    redundant = total - ideal
    percent = 100.0 * redundant / ideal if ideal > 0 else 0.0
    return {"total": total, "ideal": ideal, "redundant": redundant, "percent": percent}


def blocks_from_cuts(trunk: Trunk, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """Segment ranges between cut points (indices 1..S-1, where a new block starts)."""
    n = len(trunk.segments)
    points = sorted(set(int(c) for c in cuts))
    bad = [c for c in points if not 0 < c < n]
    if bad:
        raise TilingError(f"cut {bad[0]} is outside 1..{n - 1} (the trunk has {n} segments)")
    edges = [0, *points, n]
    return list(zip(edges[:-1], edges[1:]))


def pool_cuts(trunk: Trunk) -> list[int]:
    """A cut after every pooling segment (except at the end of the trunk)."""
    n = len(trunk.segments)
    return [seg.index + 1 for seg in trunk.segments if seg.kind == "pool" and seg.index + 1 < n]


def gate_cuts(trunk: Trunk) -> list[int]:
    """The boundaries where an SE gate starts a block (`meshci.trunk.gate`): a tiled block
    must not hold one inside it, so tiled plans cut there."""
    return [seg.index for seg in trunk.segments if seg.kind == "gate" and seg.index > 0]


def stage_cuts(trunk: Trunk) -> list[int]:
    """Cuts between resolution stages: after each pooling, before each other downsampling segment."""
    cuts = set(pool_cuts(trunk))
    for seg in trunk.segments:
        downsamples = seg.out_shape[1] < seg.in_shape[1] or seg.out_shape[2] < seg.in_shape[2]
        if seg.kind != "pool" and downsamples and seg.index > 0:
            cuts.add(seg.index)
    return sorted(cuts)


def uniform_blocks(
    trunk: Trunk,
    cuts: Sequence[int],
    *,
    strips: int | None = None,
    grid: tuple[int, int] | None = None,
    clamp: bool = False,
) -> list[tuple[int, int, list[Region]]]:
    """Blocks between `cuts`, each output tiled the same way: `strips` row strips or a grid.

    With `clamp`, a block whose output has fewer rows (columns) than asked gets one tile
    per row (column) instead of a TilingError.
    """
    if (strips is None) == (grid is None):
        raise TilingError("give either a strip count or a grid")
    blocks = []
    for start, end in blocks_from_cuts(trunk, cuts):
        _, h, w = trunk.boundary_shape(end)
        try:
            if grid is not None:
                rows, cols = (min(grid[0], h), min(grid[1], w)) if clamp else grid
                tiles = grid_regions(h, w, rows, cols)
            else:
                tiles = strip_regions(h, w, min(strips, h) if clamp else strips)  # type: ignore[type-var]
        except TilingError as exc:
            # say which block's output was too small for the tiling
            raise TilingError(f"block [{start}, {end}) with a {h}x{w} output: {exc}") from exc
        blocks.append((start, end, tiles))
    return blocks
