"""The head's linear prefix summed from tiles: exact for strips and grids, and each band of
bin rows one contiguous block of the weights (a device mapping the head file from disk
reads only its band)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from meshci.trunk import Region
from meshci.trunk.head import HeadSplit

C, H, W = 8, 9, 7


@pytest.fixture(scope="module")
def head_and_split():
    torch.manual_seed(3)
    head = nn.Sequential(nn.AdaptiveAvgPool2d((3, 3)), nn.Flatten(), nn.Linear(C * 9, 16), nn.ReLU(),
                         nn.Dropout(), nn.Linear(16, 5)).eval()
    graph = fx.symbolic_trace(head)
    split = HeadSplit.of(graph, (C, H, W))
    assert split is not None
    return head, split


def _tiled(split: HeadSplit, y: torch.Tensor, regions: list[Region]) -> torch.Tensor:
    prefix = sum(split.partial(r, y[:, :, r.r0:r.r1, r.c0:r.c1]) for r in regions)
    return split.finish(prefix)


@pytest.mark.parametrize("regions", [
    [Region(0, 3, 0, W), Region(3, 7, 0, W), Region(7, H, 0, W)],  # strips
    [Region(0, 4, 0, 3), Region(0, 4, 3, W), Region(4, H, 0, 3), Region(4, H, 3, W)],  # a 2x2 grid
])
def test_the_prefix_summed_over_tiles_is_the_head(head_and_split, regions) -> None:
    head, split = head_and_split
    y = torch.randn(1, C, H, W)
    with torch.no_grad():
        assert torch.allclose(_tiled(split, y, regions), head(y), rtol=1e-5, atol=1e-6)


def test_a_band_of_bin_rows_is_one_contiguous_block_of_the_weights(head_and_split) -> None:
    _, split = head_and_split
    w = split.weight
    assert w.shape == (split.oh, split.out_features, split.ow, split.channels)
    band = w[1:3]
    assert band.is_contiguous()
    start = band.data_ptr() - w.data_ptr()
    assert start == 1 * split.out_features * split.ow * split.channels * w.element_size()
    assert split.weight_bytes(Region(3, 6, 0, W)) == band[:1].numel() * w.element_size()  # rows 3-6: bin row 1


def test_shape_only_split_knows_its_sizes_without_weights(head_and_split) -> None:
    head, split = head_and_split
    shaped = HeadSplit.of(fx.symbolic_trace(head), (C, H, W), weights=False)
    assert shaped is not None and shaped.weight.device.type == "meta"
    assert shaped.out_features == split.out_features == 16
    assert shaped.prefix_flops(Region(0, H, 0, W)) == split.prefix_flops(Region(0, H, 0, W))
