"""Channels-last per-pixel runs (permute, LayerNorm over channels, Linear, activations, permute
back) fused into one local op; runs that are not per pixel stay out of the trunk."""

import pickle

import pytest
import torch
from torch import nn

from meshci.models import build_model
from meshci.trunk import Region, extract_trunk


class ChannelsLast(nn.Module):
    """conv, then permute > LayerNorm > Linear(C, hidden) > GELU > Linear(hidden, out) > scale > permute back."""

    def __init__(self, out: int = 6, scale_shape: tuple[int, ...] = (6,)):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.up = nn.Linear(6, 12)
        self.act = nn.GELU()
        self.down = nn.Linear(12, out)
        self.scale = nn.Parameter(torch.rand(scale_shape) + 0.5)
        self.after = nn.Conv2d(out, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.down(self.act(self.up(self.norm(y)))) * self.scale
        return self.after(y.permute(0, 3, 1, 2)).flatten(1)


@torch.no_grad()
def test_per_pixel_run_is_one_local_op_and_tiles_exactly():
    model = ChannelsLast().eval().double()
    trunk = extract_trunk(model, (3, 11, 13), "channels-last")
    assert [s.kind for s in trunk.segments] == ["conv", "conv"]
    assert "channels-last(layernorm > linear(6->12) > gelu > linear(12->6) > mul)" in trunk.segments[0].describe()
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(trunk.forward(x), model(x), rtol=0, atol=0)
    seg = trunk.segments[0]
    full = seg.run(x, Region.full(11, 13), Region.full(11, 13))
    tile = Region(4, 7, 2, 9)
    need = seg.input_region(tile)
    part = seg.run(x[..., need.r0 : need.r1, need.c0 : need.c1], need, tile)
    torch.testing.assert_close(part, full[..., 4:7, 2:9], rtol=1e-12, atol=1e-12)
    twin = pickle.loads(pickle.dumps(seg))
    assert torch.equal(twin.run(x, Region.full(11, 13), tile), seg.run(x, Region.full(11, 13), tile))


@pytest.mark.parametrize("kwargs", [dict(out=5, scale_shape=(5,)), dict(scale_shape=(13, 6))])
def test_runs_that_change_channels_or_vary_by_pixel_end_the_trunk(kwargs):
    model = ChannelsLast(**kwargs).eval()
    trunk = extract_trunk(model, (3, 11, 13), "channels-last")
    assert [s.kind for s in trunk.segments] == ["conv"]
    assert "permute" in trunk.stop_reason and "layout" in trunk.stop_reason
    x = torch.randn(1, 3, 11, 13)
    torch.testing.assert_close(trunk.forward(x), model(x), rtol=0, atol=0)


def test_convnext_tiny_trunk_reaches_the_classifier_pooling():
    model = build_model("convnext_tiny")
    trunk = extract_trunk(model, (3, 67, 71), "convnext_tiny")
    assert "avgpool" in trunk.head_start
    assert sum(s.kind == "residual" for s in trunk.segments) == 3 + 3 + 9 + 3
    in_trunk, in_head = trunk.counted_flops()
    assert in_trunk / (in_trunk + in_head) > 0.9
    x = torch.randn(1, 3, 67, 71)
    with torch.no_grad():
        torch.testing.assert_close(trunk.forward(x), model(x), rtol=0, atol=0)
