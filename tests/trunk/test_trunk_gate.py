"""Squeeze-and-excitation units become gate segments at block boundaries (meshci.trunk.gate)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from meshci.tiling import gate_cuts, run_tiled, uniform_blocks
from meshci.trunk import extract_trunk
from tests.trunk.test_trunk_branches import PooledShift


class SqueezeExcite(PooledShift):
    """conv, then an SE unit whose gate multiplies the conv's output (not adds to it)."""

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))


class ResidualSE(nn.Module):
    """An inverted residual with SE between the depthwise and the projection: the block
    input is read after the pooling, so it rides along the gate boundary as channels."""

    def __init__(self, c: int, kernel: int, se_at: int, pool: str) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, kernel, padding=kernel // 2, groups=2 * c)
        self.fc1 = nn.Conv2d(2 * c, 3, 1)
        self.fc2 = nn.Conv2d(3, 2 * c, 1)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.se_at = se_at
        self.pool = pool

    def _se(self, y):
        pooled = F.adaptive_avg_pool2d(y, 1) if self.pool == "adaptive" else y.mean((2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled)))) * y

    def forward(self, x):
        y = F.silu(self.expand(x))
        if self.se_at == 0:
            y = self._se(y)
        y = F.silu(self.dw(y))
        if self.se_at == 1:
            y = self._se(y)
        return x + self.project(y)


@torch.no_grad()
def test_an_se_unit_is_a_gate_segment():
    model = SqueezeExcite().eval()
    trunk = extract_trunk(model, (3, 9, 10), "se")
    assert [s.kind for s in trunk.segments] == ["conv", "gate"]
    x = torch.randn(1, 3, 9, 10)
    torch.testing.assert_close(trunk.forward(x), model(x))
    logits, _ = run_tiled(trunk, x, uniform_blocks(trunk, gate_cuts(trunk), strips=3))
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(c=st.integers(2, 5), kernel=st.sampled_from([1, 3, 5]), se_at=st.integers(0, 1),
       pool=st.sampled_from(["adaptive", "mean"]), h=st.integers(6, 13), w=st.integers(6, 13),
       strips=st.integers(1, 4), blocks=st.integers(1, 3), seed=st.integers(0, 99))
@torch.no_grad()
def test_random_se_placements_are_exact(c, kernel, se_at, pool, h, w, strips, blocks, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1),
                          *[ResidualSE(c, kernel, se_at, pool) for _ in range(blocks)]).eval()
    trunk = extract_trunk(model, (3, h, w), "se")
    assert sum(s.kind == "gate" for s in trunk.segments) == blocks
    assert trunk.stop_reason == "the trunk reaches the model output"
    x = torch.randn(1, 3, h, w)
    expected = model(x)
    logits, _ = run_tiled(trunk, x, uniform_blocks(trunk, gate_cuts(trunk), strips=strips, clamp=True))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


class PlainSE(ResidualSE):
    """The same without the residual: nothing read after the pooling but the gated map."""

    def forward(self, x):
        return self.project(self._se(F.silu(self.dw(F.silu(self.expand(x))))))


@pytest.mark.parametrize("carried", [False, True])
def test_carried_maps_ride_along_the_gate_boundary(carried):
    model = (ResidualSE if carried else PlainSE)(3, 3, 1, "adaptive").eval()
    trunk = extract_trunk(model, (3, 8, 8), "se")
    gate = next(s for s in trunk.segments if s.kind == "gate")
    assert gate.in_shape[0] == (6 + 3 if carried else 6)  # the residual's input as extra channels


class GateFirst(nn.Module):
    """SE on the image itself: no block before it to pool, so no trunk at all."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(3, 3, 1)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1))))


def test_a_gate_on_the_image_is_refused_as_untileable():
    from meshci.errors import TraceError

    with pytest.raises(TraceError, match="squeeze-and-excitation gate on the input image"):
        extract_trunk(GateFirst().eval(), (3, 8, 8), "gatefirst")
