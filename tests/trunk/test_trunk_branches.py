"""Branch segments: forks that re-join by cat / add / mul, their regions, and where they stop."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshci.models import build_model
from meshci.trunk import BranchSegment, Region, extract_trunk


class Wide(nn.Module):
    """Three branches with different receptive fields (1x1, 5x5, 3x3 pool > 1x1), concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.narrow = nn.Conv2d(4, 2, 1)
        self.wide = nn.Conv2d(4, 3, 5, padding=2)
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        x = self.stem(x)
        return torch.cat([self.narrow(x), self.wide(x), self.pool(x)], 1)


@torch.no_grad()
def test_branch_block_input_is_the_union_and_each_branch_computes_only_its_output():
    trunk = extract_trunk(Wide().eval(), (3, 20, 17), "wide")
    assert [s.kind for s in trunk.segments] == ["conv", "branch"]
    seg = trunk.segments[1]
    assert isinstance(seg, BranchSegment) and seg.out_shape == (7, 20, 17)
    out = Region(10, 12, 3, 9)
    assert seg.input_region(out) == Region(8, 14, 1, 11)  # the 5x5 branch's need
    assert seg.need(Region(0, 2, 0, 17)) == Region(-2, 4, -2, 19)  # unclipped
    wanted = seg.regions(out)
    chains = [(i, s) for i, s in enumerate(seg.steps) if s.chain is not None]
    # every branch is asked for exactly `out`; only the pool reads a halo of 1, the 5x5 one of 2
    assert [wanted[i + 1] for i, _ in chains] == [out] * len(chains)
    assert sorted(s.chain.regions(out)[0].height for _, s in chains) == [2, 4, 6]
    per_branch = sum(s.chain.flops_for(out) for _, s in chains)
    assert seg.flops_for(out) == pytest.approx(per_branch)
    x = torch.randn(1, 4, 20, 17)
    full = Region.full(20, 17)
    reference = seg.run(x, full, full)
    need = seg.input_region(out)
    tile = seg.run(x[..., need.r0 : need.r1, need.c0 : need.c1], need, out)
    assert torch.equal(tile, reference[..., 10:12, 3:9])


class PooledShift(nn.Module):
    """A fork whose other branch is a global pooling that is added, not a gate (a
    squeeze-and-excitation multiplies: meshci.trunk.gate): the trunk stops at the fork."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y + torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))


class SharedInPlace(nn.Module):
    """relu_ writes into a value the other branch reads later: the model's own result depends on it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        a = y.relu_()
        return torch.cat([a, self.other(y)], 1)


class AliasInPlace(SharedInPlace):
    """The same write through an alias: an identity module hands over the very tensor."""

    def __init__(self):
        super().__init__()
        self.alias = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True))

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([self.alias(y), self.other(y)], 1)


class RowConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y, self.other(y)], 2)  # along rows: not spatially local


@pytest.mark.parametrize("model, reason", [
    (PooledShift(), "adaptive_avg_pool2d"), (SharedInPlace(), "in place"), (AliasInPlace(), "in place"),
    (RowConcat(), "cat"),
])  # fmt: skip
@torch.no_grad()
def test_forks_that_do_not_rejoin_locally_end_the_trunk(model, reason):
    model.eval()
    trunk = extract_trunk(model, (3, 9, 10), "fork")
    assert [s.kind for s in trunk.segments] == ["conv"]
    assert reason in trunk.stop_reason
    x = torch.randn(1, 3, 9, 10)
    torch.testing.assert_close(trunk.forward(x), model(x), rtol=0, atol=0)


@pytest.fixture(scope="module")
def families():
    return {name: build_model(name) for name in ("squeezenet1_1", "googlenet", "densenet121")}


def test_family_structure(families):
    squeeze = extract_trunk(families["squeezenet1_1"], (3, 67, 71), "squeezenet1_1")
    assert [s.name for s in squeeze.segments if s.kind == "branch"] == [f"features.{i}" for i in (3, 4, 6, 7, 9, 10, 11, 12)]
    assert "classifier.3" in squeeze.head_start  # the final 1x1 conv and its ReLU are in the trunk
    google = extract_trunk(families["googlenet"], (3, 67, 71), "googlenet")
    inceptions = [s.name for s in google.segments if s.kind == "branch"]
    assert inceptions == ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
                          "inception4d", "inception4e", "inception5a", "inception5b"]  # fmt: skip
    assert "avgpool" in google.head_start
    dense = extract_trunk(families["densenet121"], (3, 67, 71), "densenet121")
    layers = [s.name for s in dense.segments if s.kind == "branch"]
    assert len(layers) == 6 + 12 + 24 + 16  # one segment per dense layer
    assert layers[0] == "features.denseblock1.denselayer1" and layers[-1] == "features.denseblock4.denselayer16"
    assert dense.segments[-1].out_shape == (1024, 2, 2) and "adaptive_avg_pool2d" in dense.head_start
    for trunk in (squeeze, google, dense):  # eval-mode dropout joins the conv after it: no block without work
        assert all(seg.flops > 0 for seg in trunk.segments)
    assert squeeze.segments[-1].name == "classifier.1" and squeeze.segments[-1].kind == "conv"


@torch.no_grad()
def test_family_trunks_reproduce_the_model(families):
    x = torch.randn(1, 3, 67, 71)
    for name, model in families.items():
        trunk = extract_trunk(model, (3, 67, 71), name)
        torch.testing.assert_close(trunk.forward(x), model(x), rtol=0, atol=0)
        bounds = trunk.forward_boundaries(x)
        for seg in trunk.segments[::7]:
            full_in, full_out = Region.full(*seg.in_shape[1:]), Region.full(*seg.out_shape[1:])
            got = seg.run(bounds[seg.index], full_in, full_out)
            torch.testing.assert_close(got, bounds[seg.index + 1], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_branch_segments_survive_pickling(families):
    trunk = extract_trunk(families["googlenet"], (3, 35, 33), "googlenet")
    seg = next(s for s in trunk.segments if s.kind == "branch")
    twin = pickle.loads(pickle.dumps(seg))
    x = torch.randn(1, *seg.in_shape)
    full_in, full_out = Region.full(*seg.in_shape[1:]), Region.full(*seg.out_shape[1:])
    assert torch.equal(seg.run(x, full_in, full_out), twin.run(x, full_in, full_out))


def test_branch_segment_refuses_inconsistent_steps():
    from meshci.trunk.block import Step

    with pytest.raises(ValueError, match="reads a value not yet computed"):
        BranchSegment(0, "bad", (2, 4, 4), (Step("add", (0, 1), (2, 4, 4)),))
    with pytest.raises(ValueError, match="different shapes"):
        BranchSegment(0, "bad", (2, 4, 4), (Step("cat", (0, 0), (4, 4, 4)), Step("add", (0, 1), (4, 4, 4))))
    with pytest.raises(ValueError, match="not"):
        BranchSegment(0, "bad", (2, 4, 4), (Step("cat", (0, 0), (5, 4, 4)),))


def test_model_without_any_local_trunk_says_why_in_one_line():
    from meshci.errors import TraceError

    class Gate(nn.Module):
        def forward(self, x):
            return x * x.mean((2, 3), keepdim=True)

    with pytest.raises(TraceError) as info:
        extract_trunk(Gate(), (3, 8, 8), "gate")
    text = str(info.value)
    assert "no spatially local trunk" in text and "'mean'" in text and "\n" not in text
