"""Executor plumbing: crop, assemble, block checks, weighted strips."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from meshci.errors import TilingError
from meshci.tiling import assemble, check_blocks, crop, run_block, run_tiled, split_rows_weighted
from meshci.trunk import Region, extract_trunk


def test_crop_is_a_view_of_the_wanted_cells():
    x = torch.arange(2 * 5 * 6).reshape(1, 2, 5, 6)
    have = Region(10, 15, 20, 26)
    part = crop(x, have, Region(11, 13, 22, 25))
    assert torch.equal(part, x[..., 1:3, 2:5]) and part.data_ptr() == x[..., 1:3, 2:5].data_ptr()
    with pytest.raises(TilingError, match="not inside"):
        crop(x, have, Region(9, 12, 20, 21))
    with pytest.raises(TilingError, match="does not match"):
        crop(x, Region(0, 4, 0, 6), Region(0, 1, 0, 1))


def test_assemble_overlapping_pieces_and_gaps():
    full = torch.randn(1, 3, 6, 5)
    want = Region(1, 6, 0, 5)
    pieces = [(r, full[..., r.r0 : r.r1, r.c0 : r.c1]) for r in (Region(0, 4, 0, 5), Region(3, 6, 0, 3), Region(2, 6, 2, 5))]
    assert torch.equal(assemble(want, pieces), full[..., 1:6, :])
    with pytest.raises(TilingError, match="uncovered"):
        assemble(want, pieces[:2])
    with pytest.raises(TilingError, match="no pieces"):
        assemble(want, [])


@pytest.fixture(scope="module")
def small():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 3, 3)).eval()
    return model, extract_trunk(model, (2, 12, 10))


def test_blocks_must_chain_and_cover_the_trunk(small):
    _, trunk = small
    full = [trunk.boundary_region(k) for k in range(4)]
    check_blocks(trunk, [(0, 2, [full[2]]), (2, 3, [full[3]])])
    for bad in (
        [(0, 2, [full[2]])],  # stops early
        [(0, 1, [full[1]]), (2, 3, [full[3]])],  # gap
        [(0, 3, [])],  # no tiles
    ):
        with pytest.raises(TilingError):
            check_blocks(trunk, bad)
    x = torch.randn(1, 2, 12, 10)
    with pytest.raises(TilingError):
        run_tiled(trunk, x, [(0, 2, [full[2]])])


def test_run_block_needs_its_input_region(small):
    _, trunk = small
    x = torch.randn(1, 2, 12, 10)
    out = Region(0, 2, 0, 3)
    assert run_block(trunk, 0, 3, x, Region.full(12, 10), out).shape == (1, 3, 2, 3)
    with pytest.raises(TilingError):
        run_block(trunk, 0, 3, x[..., 4:, :], Region(4, 12, 0, 10), out)


@given(st.integers(1, 300), st.lists(st.floats(0.01, 100), min_size=1, max_size=12))
def test_weighted_strips_cover_the_rows(height, weights):
    if len(weights) > height:
        with pytest.raises(TilingError):
            split_rows_weighted(height, weights)
        return
    bounds = split_rows_weighted(height, weights)
    assert bounds[0][0] == 0 and bounds[-1][1] == height
    assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    total = sum(weights)
    # each strip is within one row (plus its guaranteed row) of its fair share
    assert all(abs(size - 1 - w / total * (height - len(weights))) < 1 + 1e-9 for size, w in zip(sizes, weights))
