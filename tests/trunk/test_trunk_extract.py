"""Trunk extraction: segment structure, head, and the errors users see."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshci.cli import main
from meshci.errors import TraceError
from meshci.models import build_model
from meshci.trunk import Region, extract_trunk


@pytest.fixture(scope="module")
def vgg16():
    return build_model("vgg16")


@pytest.fixture(scope="module")
def resnet34():
    return build_model("resnet34")


def test_vgg16_segments(vgg16):
    trunk = extract_trunk(vgg16, (3, 64, 64), "vgg16")
    kinds = [s.kind for s in trunk.segments]
    assert kinds.count("conv") == 13 and kinds.count("pool") == 5 and len(kinds) == 18
    assert trunk.segments[0].name == "features.0" and trunk.segments[2].name == "features.4"
    assert trunk.boundary_shape(18) == (512, 2, 2)
    assert "avgpool" in trunk.head_start


def test_resnet34_segments(resnet34):
    trunk = extract_trunk(resnet34, (3, 64, 64), "resnet34")
    names = [s.name for s in trunk.segments]
    assert names[:3] == ["conv1", "maxpool", "layer1.0"] and names[-1] == "layer4.2"
    assert [s.kind for s in trunk.segments] == ["conv", "pool"] + ["residual"] * 16
    down = trunk.segments[5]  # layer2.0: 1x1 stride-2 conv + bn shortcut
    assert down.shortcut is not None and len(down.shortcut.ops) == 1
    assert len(trunk.segments[3].shortcut.ops) == 0  # identity shortcut
    assert down.out_shape == (128, 8, 8)


@torch.no_grad()
def test_head_of_trunk_reproduces_model(resnet34):
    trunk = extract_trunk(resnet34, (3, 48, 40), "resnet34")
    x = torch.randn(2, 3, 48, 40)
    bounds = trunk.forward_boundaries(x)
    assert len(bounds) == len(trunk.segments) + 1 and torch.equal(bounds[0], x)
    for k, b in enumerate(bounds):
        assert tuple(b.shape[1:]) == trunk.boundary_shape(k)
    assert torch.equal(trunk.head(bounds[-1]), resnet34(x))
    assert torch.equal(trunk.forward(x), resnet34(x))


@torch.no_grad()
def test_each_segment_matches_its_modules(resnet34):
    trunk = extract_trunk(resnet34, (3, 40, 56), "resnet34")
    x = torch.randn(1, 3, 40, 56)
    bounds = trunk.forward_boundaries(x)
    for seg in trunk.segments:
        full_in = Region.full(*seg.in_shape[1:])
        out = seg.run(bounds[seg.index], full_in, Region.full(*seg.out_shape[1:]))
        torch.testing.assert_close(out, bounds[seg.index + 1], rtol=1e-5, atol=1e-5)


class Functional(nn.Module):
    """Functional ops, scalar arithmetic, in-place activation, a pooled shortcut."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.branch = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        y = F.max_pool2d(y, 3, stride=1, padding=1)
        y = y * 0.5 + 1.0
        y = self.branch(y) + F.avg_pool2d(y, 2, ceil_mode=True)
        y = torch.relu(y)
        return self.fc(y.mean(dim=(2, 3)))


@torch.no_grad()
def test_functional_model_segments_and_head():
    model = Functional().eval()
    nn.init.uniform_(model.bn.running_var, 0.5, 2.0)
    trunk = extract_trunk(model, (3, 11, 9), "functional")
    assert [s.kind for s in trunk.segments] == ["conv", "pool", "pointwise", "residual"]
    assert trunk.segments[0].describe() == "conv3x3(3->8)+bn+relu"
    assert "mean" in trunk.head_start
    x = torch.randn(2, 3, 11, 9)
    x_copy = x.clone()
    torch.testing.assert_close(trunk.forward(x), model(x))
    y = x
    for seg in trunk.segments:
        y = seg.run(y, Region.full(*seg.in_shape[1:]), Region.full(*seg.out_shape[1:]))
    torch.testing.assert_close(trunk.head(y), model(x))
    assert torch.equal(x, x_copy)  # in-place activations never write into the caller's input


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_model_names_the_module():
    with pytest.raises(TraceError) as info:
        extract_trunk(Untraceable(), (3, 16, 16), "gated")
    text = str(info.value)
    assert "'gated'" in text and "gate (Gate)" in text and "\n" not in text


def test_model_without_spatial_trunk():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(TraceError, match="no spatially local trunk"):
        extract_trunk(model, (3, 8, 8), "mlp")


def test_input_too_small_is_a_clear_error(vgg16):
    with pytest.raises(TraceError, match="too small|does not fit"):
        extract_trunk(vgg16, (3, 16, 16), "vgg16")


def test_trunk_stops_at_reflect_padding():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    trunk = extract_trunk(model, (3, 10, 10))
    assert len(trunk.segments) == 1 and "Conv2d" in trunk.head_start
    x = torch.randn(1, 3, 10, 10)
    torch.testing.assert_close(trunk.forward(x), model(x))


def test_cli_errors_for_untraceable_and_unknown(capsys, monkeypatch, tmp_path):
    (tmp_path / "gated_zoo.py").write_text(
        "import torch\n"
        "class G(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.c = torch.nn.Conv2d(3, 3, 1)\n"
        "    def forward(self, x):\n"
        "        return self.c(x) if x.sum() > 0 else x\n"
        "def gated():\n"
        "    return G()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "--model", "gated_zoo:gated", "--size", "8", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshci: error: cannot trace model") and "\n" not in err
    assert main(["inspect", "--model", "nosuchnet"]) == 2
    assert "unknown model 'nosuchnet'" in capsys.readouterr().err


def test_add_with_two_inputs_is_not_pointwise():
    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return operator.add(y, y)

    model = Doubled()
    trunk = extract_trunk(model, (3, 6, 6))
    assert len(trunk.segments) == 1 and "add" in trunk.head_start
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(trunk.forward(x), model(x))


@torch.no_grad()
def test_segments_survive_pickling():
    import pickle

    model = Functional().eval()
    trunk = extract_trunk(model, (3, 11, 9), "functional")
    copies = pickle.loads(pickle.dumps(trunk.segments))
    x = torch.randn(1, 3, 11, 9)
    a = b = x
    for seg, twin in zip(trunk.segments, copies):
        full_in, full_out = Region.full(*seg.in_shape[1:]), Region.full(*seg.out_shape[1:])
        a, b = seg.run(a, full_in, full_out), twin.run(b, full_in, full_out)
    assert torch.equal(a, b)


class MidwayGlobal(nn.Module):
    """A local trunk, then a non-local adaptive pooling followed by more convolutions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.squeeze = nn.AdaptiveAvgPool2d((3, 3))
        self.late = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.late(self.squeeze(self.stem(x))).flatten(1)


@torch.no_grad()
def test_head_keeps_everything_after_the_first_non_local_node():
    model = MidwayGlobal().eval()
    trunk = extract_trunk(model, (3, 13, 17))
    assert len(trunk.segments) == 1 and "AdaptiveAvgPool2d" in trunk.head_start
    x = torch.randn(2, 3, 13, 17)
    torch.testing.assert_close(trunk.head(trunk.forward_boundaries(x)[-1]), model(x), rtol=0, atol=0)


def test_cli_model_without_spatial_trunk(capsys, monkeypatch, tmp_path):
    (tmp_path / "flat_zoo.py").write_text(
        "import torch\n"
        "def mlp():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["inspect", "--model", "flat_zoo:mlp", "--size", "8", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshci: error: model 'flat_zoo:mlp' has no spatially local trunk") and err.count("\n") == 1
