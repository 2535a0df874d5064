"""Tiling geometry (input regions, halo FLOPs) and the tile executor."""

from meshci.tiling.executor import assemble, check_blocks, crop, run_block, run_tiled
from meshci.tiling.geometry import (
    Block,
    block_flops,
    block_input_region,
    block_regions,
    blocks_from_cuts,
    grid_regions,
    pool_cuts,
    receptive_field,
    redundant_flops,
    split_rows,
    split_rows_weighted,
    stage_cuts,
    strip_regions,
)

__all__ = [
    "Block", "assemble", "block_flops", "block_input_region", "block_regions", "blocks_from_cuts",
    "check_blocks", "crop", "grid_regions", "pool_cuts", "receptive_field", "redundant_flops",
    "run_block", "run_tiled", "split_rows", "split_rows_weighted", "stage_cuts", "strip_regions",
]  # fmt: skip
