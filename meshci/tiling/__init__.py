"""Tiling geometry (input regions, halo FLOPs) and the tile executor."""

from meshci.tiling.executor import (
    TiledCheck,
    assemble,
    block_mean,
    check_blocks,
    check_tiled,
    crop,
    gate_starts,
    interior_gates,
    run_block,
    run_tiled,
)
from meshci.tiling.geometry import (
    Block,
    block_flops,
    block_input_region,
    block_regions,
    blocks_from_cuts,
    gate_cuts,
    grid_regions,
    pool_cuts,
    receptive_field,
    redundant_flops,
    split_rows,
    split_rows_weighted,
    stage_cuts,
    strip_regions,
    uniform_blocks,
)

__all__ = [
    "Block", "TiledCheck", "assemble", "check_tiled", "uniform_blocks", "block_flops", "block_input_region", "block_regions", "blocks_from_cuts",
    "check_blocks", "crop", "grid_regions", "pool_cuts", "receptive_field", "redundant_flops",
    "run_block", "run_tiled", "block_mean", "gate_cuts", "gate_starts", "interior_gates", "split_rows", "split_rows_weighted", "stage_cuts", "strip_regions",
]  # fmt: skip
