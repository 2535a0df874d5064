"""Property tests: random DAG blocks (random branches with random kernels, strides, dilations,
paddings and poolings, re-joined by cat / add / mul, nested forks), tiled exactly."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_tiling_properties import assert_tile_reads_only_its_input_region, cases
from torch import nn

from meshci.tiling import check_tiled

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


class Branches(nn.Module):
    """join(branch_1(x), ..., branch_k(x)): cat along channels, or a running add / mul."""

    def __init__(self, branches: list[nn.Module], join: str):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.join = join

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.join == "cat":
            return torch.cat(outs, 1)
        y = outs[0]
        for o in outs[1:]:
            y = y + o if self.join == "add" else y * o
        return y


def _out_shape(module: nn.Module, shape) -> tuple[int, int, int] | None:
    try:
        with torch.no_grad():
            return tuple(module.eval()(torch.zeros(1, *shape)).shape[1:])
    except RuntimeError:
        return None  # the window does not fit the map


@st.composite
def first_layers(draw, c: int, stride: int, cout: int):
    """The layer a branch starts with: a conv or pooling of the block's stride, or the identity."""
    kind = draw(st.sampled_from(["conv", "conv", "max", "avg"] + (["identity"] if stride == 1 and cout == c else [])))
    k = draw(st.integers(1, 5))
    if kind == "conv":
        d = draw(st.integers(1, 3))
        aligned = d * (k - 1) // 2 if k % 2 else draw(st.integers(0, d * (k - 1)))
        p = draw(st.sampled_from([aligned, aligned, draw(st.integers(0, d * (k - 1)))]))
        groups = draw(st.sampled_from([g for g in (1, 2) if c % g == 0 and cout % g == 0]))
        return nn.Conv2d(c, cout, k, stride, p, d, groups=groups, bias=draw(st.booleans()))
    if kind == "identity":
        return nn.Identity()
    p = draw(st.integers(0, k // 2))
    if kind == "max":
        return nn.MaxPool2d(k, stride, p, draw(st.integers(1, 2)), ceil_mode=draw(st.booleans()))
    return nn.AvgPool2d(k, stride, p, draw(st.booleans()), draw(st.booleans()))


@st.composite
def tails(draw, c: int, depth: int, aliased: bool = False):
    """Stride-1 layers after a branch's first one (maps keep their size, channels `c`). After an
    identity (`aliased`) no in-place activation: it would write into the block's shared input,
    which the trunk refuses (test_trunk_branches covers that)."""
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["same", "act", "bn"] + (["nested"] if depth == 0 else [])))
        if kind == "same":  # even kernels give asymmetric padding
            layers.append(nn.Conv2d(c, c, draw(st.integers(1, 4)), 1, "same", draw(st.integers(1, 2))))
        elif kind == "act":
            layers.append(draw(st.sampled_from([nn.ReLU(inplace=not aliased), nn.LeakyReLU(0.1), nn.Tanh()])))
            aliased = False
        elif kind == "bn":
            bn = nn.BatchNorm2d(c)
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
            layers.append(bn)
        else:
            layers.append(draw(blocks(c, 1, depth + 1, same_channels=True)))
    return layers


@st.composite
def blocks(draw, c: int, stride: int, depth: int = 0, same_channels: bool = False):
    """A fork of 2-4 random branches re-joined by cat (channels add up) or add / mul."""
    join = draw(st.sampled_from(["add", "mul"] if same_channels else ["cat", "cat", "add", "mul"]))
    branches = []
    for _ in range(draw(st.integers(2, 4))):
        cout = c if join != "cat" or same_channels else draw(st.integers(1, 4))
        first = draw(first_layers(c, stride, cout if not same_channels else c))
        width = cout if isinstance(first, nn.Conv2d) else c
        branches.append(nn.Sequential(first, *draw(tails(width, depth, isinstance(first, nn.Identity)))))
    return Branches(branches, join)


@st.composite
def dag_models(draw):
    """(model, input shape): 1-3 random blocks, each followed by an optional conv, on a small image."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    in_shape = (draw(st.integers(1, 3)), draw(st.integers(6, 30)), draw(st.integers(6, 30)))
    shape = in_shape
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        block = draw(blocks(shape[0], draw(st.integers(1, 2))))
        shapes = [_out_shape(b, shape) for b in block.branches]
        keep = [b for b, s in zip(block.branches, shapes) if s is not None and s[1:] == shapes[0][1:]] \
            if shapes[0] is not None else []  # fmt: skip
        if block.join != "cat":
            keep = [b for b, s in zip(block.branches, shapes) if s is not None and s == shapes[0]]
        if len(keep) < 2:
            continue
        block = Branches(keep, block.join)
        layers.append(block)
        shape = _out_shape(block, shape)
        if draw(st.booleans()) and min(shape[1:]) >= 3:
            layers.append(nn.Conv2d(shape[0], draw(st.integers(1, 4)), 3))
            shape = _out_shape(layers[-1], shape)
    assume(layers and min(shape[1:]) >= 1)
    return nn.Sequential(*layers).eval().double(), in_shape


def dag_cases():
    return cases(dag_models())


@SETTINGS
@given(dag_cases())
@torch.no_grad()
def test_random_dag_blocks_tile_exactly(case):
    model, trunk, x, blocks_ = case
    assert trunk.stop_reason == "the trunk reaches the model output", trunk.stop_reason  # all blocks in the trunk
    assert any(s.kind in ("branch", "residual") for s in trunk.segments)  # two-branch adds are residual blocks
    torch.testing.assert_close(trunk.forward(x), model(x), rtol=0, atol=0)
    result = check_tiled(trunk, x, blocks_, rtol=1e-10, atol=1e-10)
    assert result.ok, f"max diff {result.max_abs_diff} for {[(s, e, len(t)) for s, e, t in blocks_]}"


@SETTINGS
@given(dag_cases(), st.data())
@torch.no_grad()
def test_dag_tiles_read_nothing_outside_their_input_region(case, data):
    """Poison every input cell outside block_input_region with NaN: the tile must not change."""
    assert_tile_reads_only_its_input_region(case, data)
