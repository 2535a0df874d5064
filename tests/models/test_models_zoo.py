"""Model zoo: torchvision architecture and key names, seeded init, weights, user models."""

import sys

import pytest
import torch

from meshci.cli import main
from meshci.errors import UnknownModelError
from meshci.models import MODEL_NAMES, WeightsError, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def vgg16():
    return build_model("vgg16")


@pytest.fixture(scope="module")
def resnet34():
    return build_model("resnet34")


def test_parameter_counts_match_torchvision(vgg16, resnet34):
    assert n_params(vgg16) == 138_357_544
    assert n_params(resnet34) == 21_797_672


def test_state_dict_keys_follow_torchvision(vgg16, resnet34):
    vkeys = set(vgg16.state_dict())
    assert {"features.0.weight", "features.28.bias", "classifier.0.weight", "classifier.6.bias"} <= vkeys
    rkeys = set(resnet34.state_dict())
    assert {
        "conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean", "layer4.2.bn2.weight", "fc.weight", "fc.bias",
    } <= rkeys  # fmt: skip
    assert not any(k.startswith("layer1.0.downsample") for k in rkeys)


def test_built_models_are_in_eval_mode(resnet34):
    assert not resnet34.training
    assert not any(m.training for m in resnet34.modules())


def test_init_is_deterministic_by_seed():
    a, b, c = build_model("resnet18", seed=3), build_model("resnet18", seed=3), build_model("resnet18", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])


def test_init_leaves_global_rng_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    build_model("resnet18", seed=5)
    assert torch.equal(torch.rand(3), expected)


@torch.no_grad()
def test_activations_stay_order_one(resnet34):
    out = resnet34(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out).all()
    assert 1e-2 < float(out.abs().max()) < 100


def test_unknown_model_is_one_line_error():
    with pytest.raises(UnknownModelError) as info:
        build_model("vgg17")
    text = str(info.value)
    assert "\n" not in text and "vgg16" in text and "resnet34" in text
    assert set(MODEL_NAMES) >= {"vgg16", "resnet34"}


def test_user_model_from_package_callable(tmp_path, monkeypatch):
    (tmp_path / "my_zoo.py").write_text(
        "import torch\n"
        "def tiny():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_zoo:tiny", seed=1)
    assert isinstance(model[0], torch.nn.Conv2d) and not model.training
    assert torch.equal(model[0].weight, build_model("my_zoo:tiny", seed=1)[0].weight)
    with pytest.raises(UnknownModelError, match="no attribute"):
        build_model("my_zoo:missing")
    with pytest.raises(UnknownModelError, match="not callable"):
        build_model("my_zoo:NOT_CALLABLE")
    with pytest.raises(UnknownModelError, match="cannot import"):
        build_model("no_such_module_xyz:tiny")
    sys.modules.pop("my_zoo", None)


def test_weights_round_trip(tmp_path):
    source = build_model("resnet18", seed=1)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    loaded = build_model("resnet18", seed=2, weights=path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("resnet18").state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit"):
        build_model("resnet34", weights=path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot load"):
        build_model("resnet18", weights=bad)


def test_weights_error_through_cli(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert main(["inspect", "--model", "resnet18", "--size", "32", "32", "--weights", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshci: error: cannot load weights") and "\n" not in err


@pytest.mark.parametrize(
    "name, params, keys",
    [
        ("squeezenet1_1", 1_235_496, {"features.0.weight", "features.3.squeeze.weight", "features.12.expand3x3.bias",
                                      "classifier.1.weight", "classifier.1.bias"}),
        ("googlenet", 6_624_904, {"conv1.conv.weight", "conv1.bn.running_var", "inception3a.branch2.1.conv.weight",
                                  "inception5b.branch4.1.bn.bias", "fc.weight"}),
        ("densenet121", 7_978_856, {"features.conv0.weight", "features.denseblock1.denselayer1.norm1.running_mean",
                                    "features.denseblock4.denselayer16.conv2.weight", "features.transition3.conv.weight",
                                    "features.norm5.bias", "classifier.weight"}),
        ("convnext_tiny", 28_589_128, {"features.0.0.weight", "features.0.1.bias", "features.1.0.layer_scale",
                                       "features.1.0.block.0.weight", "features.1.0.block.2.weight",
                                       "features.1.0.block.5.bias", "features.2.1.weight", "features.5.8.block.3.weight",
                                       "classifier.0.weight", "classifier.2.bias"}),
    ],
)  # fmt: skip
def test_branchy_families_follow_torchvision(name, params, keys):
    model = build_model(name)
    assert n_params(model) == params
    state = model.state_dict()
    assert keys <= set(state)
    assert not any(k.startswith(("aux1", "aux2")) for k in state)  # GoogLeNet as in eval: no aux classifiers
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
