"""Tiling geometry: strips, grids, input regions, halo FLOPs, cuts."""

import pytest
import torch
from torch import nn

from meshci.errors import TilingError
from meshci.tiling import (
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
from meshci.trunk import Region, extract_trunk


def test_split_rows_near_equal():
    assert split_rows(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_rows(5, 5) == [(i, i + 1) for i in range(5)]
    assert split_rows(7, 1) == [(0, 7)]
    with pytest.raises(TilingError, match="cannot cut 4 rows into 5"):
        split_rows(4, 5)
    with pytest.raises(TilingError):
        split_rows(4, 0)


def test_split_rows_weighted():
    assert split_rows_weighted(10, [1, 1]) == [(0, 5), (5, 10)]
    assert split_rows_weighted(10, [3, 1]) == [(0, 7), (7, 10)]
    bounds = split_rows_weighted(7, [100, 1, 1])  # every strip keeps at least one row
    assert [b - a for a, b in bounds] == [5, 1, 1]
    with pytest.raises(TilingError):
        split_rows_weighted(2, [1, 1, 1])
    with pytest.raises(TilingError):
        split_rows_weighted(5, [1, 0])


def test_grid_and_strips():
    grid = grid_regions(5, 7, 2, 3)
    assert len(grid) == 6 and grid[0] == Region(0, 3, 0, 3) and grid[-1] == Region(3, 5, 5, 7)
    assert sum(r.area for r in grid) == 35
    assert strip_regions(5, 7, 2) == [Region(0, 3, 0, 7), Region(3, 5, 0, 7)]
    with pytest.raises(TilingError, match="columns"):
        grid_regions(5, 2, 1, 3)


@pytest.fixture(scope="module")
def stack():
    # conv3x3 p1 -> maxpool2 -> conv3x3 s2 p1 -> conv 5x5 dilation 2, padding 4
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Conv2d(4, 2, 5, padding=4, dilation=2),
    )  # fmt: skip
    return extract_trunk(model, (3, 20, 20), "stack")


def test_hand_computed_regions(stack):
    assert [s.kind for s in stack.segments] == ["conv", "pool", "conv", "conv"]
    assert stack.boundary_shape(4) == (2, 5, 5)
    out = Region(2, 3, 0, 5)
    regions = block_regions(stack, 0, 4, out)
    # dilated 5x5, pad 4: rows [2*1-4, 2+8+1) = [-2, 11) -> clipped to the 5-row map
    assert regions[3] == Region(0, 5, 0, 5)
    assert block_regions(stack, 3, 4, Region(0, 1, 0, 1))[0] == Region(0, 5, 0, 5)
    assert block_regions(stack, 2, 3, Region(1, 2, 1, 3))[0] == Region(1, 4, 1, 6)
    assert block_regions(stack, 1, 2, Region(1, 4, 0, 10))[0] == Region(2, 8, 0, 20)
    assert block_input_region(stack, 0, 1, Region(0, 2, 3, 5)) == Region(0, 3, 2, 6)
    assert receptive_field(stack, 0, 1) == (3, 3)
    assert receptive_field(stack, 0, 2) == (4, 4)


def test_block_flops_and_redundancy(stack):
    full = stack.boundary_region(4)
    assert block_flops(stack, 0, 4, full) <= sum(s.flops for s in stack.segments)
    one = redundant_flops(stack, [(0, 4, [full])])
    assert one["redundant"] == 0 and one["percent"] == 0
    two = redundant_flops(stack, [(0, 4, strip_regions(5, 5, 2))])
    assert two["redundant"] > 0 and two["total"] == two["ideal"] + two["redundant"]
    cut = redundant_flops(stack, [(s, e, strip_regions(*stack.boundary_shape(e)[1:], 2)) for s, e in [(0, 2), (2, 4)]])
    assert cut["percent"] < two["percent"]


def test_conv_flops_formula():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True))
    trunk = extract_trunk(model, (4, 5, 7))
    assert trunk.segments[0].flops == (2 * 2 * 9 * 6 + 6) * 35
    assert trunk.segments[0].flops_for(Region(0, 1, 0, 2)) == (2 * 2 * 9 * 6 + 6) * 2


def test_regions_must_be_inside_the_map(stack):
    with pytest.raises(TilingError):
        block_regions(stack, 0, 4, Region(0, 6, 0, 5))
    with pytest.raises(TilingError):
        block_regions(stack, 2, 2, Region(0, 1, 0, 1))
    with pytest.raises(TilingError):
        block_regions(stack, 0, 5, Region(0, 1, 0, 1))


def test_cuts(stack):
    assert blocks_from_cuts(stack, []) == [(0, 4)]
    assert blocks_from_cuts(stack, [3, 1, 3]) == [(0, 1), (1, 3), (3, 4)]
    with pytest.raises(TilingError, match="outside"):
        blocks_from_cuts(stack, [4])
    assert pool_cuts(stack) == [2]
    assert stage_cuts(stack) == [2]  # the strided conv at index 2 starts the same stage


@torch.no_grad()
def test_vgg16_and_resnet34_halo_figures():
    from meshci.models import build_model

    vgg = extract_trunk(build_model("vgg16"), (3, 224, 224), "vgg16")
    whole = redundant_flops(vgg, [(0, 18, strip_regions(7, 7, 4))])
    staged = redundant_flops(
        vgg, [(s, e, strip_regions(*vgg.boundary_shape(e)[1:], 4)) for s, e in blocks_from_cuts(vgg, pool_cuts(vgg))]
    )
    assert whole["ideal"] == pytest.approx(vgg.flops)  # 224 divides evenly: nothing is skipped
    assert whole["percent"] > 4 * staged["percent"] > 0
