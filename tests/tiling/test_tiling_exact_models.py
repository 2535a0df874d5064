"""Stitched tiles equal the monolithic forward for VGG-16 and ResNet-34.

Tolerance is the project's: torch.allclose(rtol=1e-4, atol=1e-5) on the logits and on
every block boundary. VGG-16 is checked in float32 (its tiles come out bit-identical to
the monolithic run). ResNet-34 is swept in float64: in float32 the CPU convolution
kernels round differently for different tile shapes, and 16 residual blocks grow those
few ulps past atol=1e-5 on the boundaries (test_resnet34_float32 bounds them); in float64
the rounding noise is ~1e-14, so any geometry error stands out.
"""

import copy

import pytest
import torch

from meshci.models import build_model
from meshci.tiling import check_tiled, pool_cuts, run_tiled, stage_cuts, uniform_blocks
from meshci.trunk import extract_trunk


@pytest.fixture(scope="module")
def vgg16():
    return build_model("vgg16")


@pytest.fixture(scope="module")
def resnet34():
    return build_model("resnet34")


@pytest.fixture(scope="module")
def resnet34_f64(resnet34):
    return copy.deepcopy(resnet34).double()


def cut_sets(trunk):
    n = len(trunk.segments)
    return {
        "whole": [],
        "pools": pool_cuts(trunk),
        "stages": stage_cuts(trunk),
        "every": list(range(1, n)),
        "uneven": [n // 3, n // 3 + 1, n - 2],
    }


def assert_exact(trunk, x, blocks):
    result = check_tiled(trunk, x, blocks)
    assert result.ok, f"max |tiled - monolithic| = {result.max_abs_diff}"
    assert result.compared == len(blocks) + 1


def random_input(shape, dtype=torch.float32, seed=0):
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed)).to(dtype)


# strip counts per cut set: every count 1..16 once per model, a spread for the rest
SWEEP_64 = {"whole": (1, 2, 16), "stages": range(1, 17), "every": (2, 16), "uneven": (3, 7)}
SWEEP_ODD = {"whole": (3,), "stages": (1, 4, 11, 16), "every": (5,), "uneven": (2, 16)}


@torch.no_grad()
@pytest.mark.parametrize("size, sweep", [((64, 64), SWEEP_64), ((97, 83), SWEEP_ODD)])
def test_vgg16_small_strip_counts(vgg16, size, sweep):
    trunk = extract_trunk(vgg16, (3, *size), "vgg16")
    x = random_input(trunk.input_shape)
    sets = cut_sets(trunk)
    for name, counts in sweep.items():
        for n in counts:
            assert_exact(trunk, x, uniform_blocks(trunk, sets[name], strips=n, clamp=True))


@torch.no_grad()
@pytest.mark.parametrize("size, sweep", [((64, 64), SWEEP_64), ((97, 83), SWEEP_ODD)])
def test_resnet34_small_strip_counts(resnet34_f64, size, sweep):
    trunk = extract_trunk(resnet34_f64, (3, *size), "resnet34")
    x = random_input(trunk.input_shape, torch.float64)
    sets = cut_sets(trunk)
    for name, counts in sweep.items():
        for n in counts:
            assert_exact(trunk, x, uniform_blocks(trunk, sets[name], strips=n, clamp=True))


@torch.no_grad()
@pytest.mark.parametrize("grid", [(1, 2), (3, 2), (4, 4)])
def test_grids_small(vgg16, resnet34_f64, grid):
    for model, dtype in ((vgg16, torch.float32), (resnet34_f64, torch.float64)):
        trunk = extract_trunk(model, (3, 97, 83))
        x = random_input(trunk.input_shape, dtype, seed=1)
        for cuts in (stage_cuts(trunk), [4, 9]):
            assert_exact(trunk, x, uniform_blocks(trunk, cuts, grid=grid, clamp=True))


@torch.no_grad()
def test_batch_of_two(resnet34_f64):
    trunk = extract_trunk(resnet34_f64, (3, 45, 61))
    x = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    assert_exact(trunk, x, uniform_blocks(trunk, [2, 9], strips=3, clamp=True))


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("size", [(224, 224), (197, 231)])
def test_vgg16_full_size(vgg16, size):
    trunk = extract_trunk(vgg16, (3, *size), "vgg16")
    x = random_input(trunk.input_shape)
    cases = [([], dict(strips=4)), (pool_cuts(trunk), dict(grid=(2, 2))), ([3, 10], dict(strips=3))]
    cases += [(pool_cuts(trunk), dict(strips=n)) for n in (1, 2, 5, 8, 13, 16)]
    for cuts, tiling in cases:
        assert_exact(trunk, x, uniform_blocks(trunk, cuts, clamp=True, **tiling))


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("size", [(224, 224), (197, 231)])
def test_resnet34_full_size(resnet34_f64, size):
    trunk = extract_trunk(resnet34_f64, (3, *size), "resnet34")
    x = random_input(trunk.input_shape, torch.float64)
    if size == (224, 224):
        cases = [([], dict(strips=4)), (stage_cuts(trunk), dict(strips=16)), (stage_cuts(trunk), dict(grid=(3, 2)))]
    else:
        cases = [([], dict(strips=3)), (stage_cuts(trunk), dict(strips=7)), ([2, 12], dict(strips=5))]
    for cuts, tiling in cases:
        assert_exact(trunk, x, uniform_blocks(trunk, cuts, clamp=True, **tiling))


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("size", [(224, 224), (197, 231)])
def test_resnet34_float32(resnet34, size):
    """float32: logits within the project tolerance; boundaries within float32 rounding.

    CPU kernels pick different algorithms (summation orders) for different tile shapes and
    batch sizes, so boundaries differ by a few ulps that 16 residual blocks grow to ~1e-5 of
    the largest activation; a geometry error would be O(1).
    """
    trunk = extract_trunk(resnet34, (3, *size), "resnet34")
    x = random_input(trunk.input_shape)
    reference = trunk.forward_boundaries(x)
    logits_ref = resnet34(x)
    scale = max(float(b.abs().max()) for b in reference)
    for blocks in (uniform_blocks(trunk, stage_cuts(trunk), strips=4), uniform_blocks(trunk, [], grid=(3, 2))):
        logits, boundaries = run_tiled(trunk, x, blocks)
        torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-5)
        for got, (_, end, _) in zip(boundaries[1:], blocks):
            assert float((got - reference[end]).abs().max()) <= 2e-5 * scale
