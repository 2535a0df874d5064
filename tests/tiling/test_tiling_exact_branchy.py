"""Stitched tiles equal the monolithic forward for the branchy families (fire modules,
inception modules, dense layers) and ConvNeXt (channels-last per-pixel blocks) under strips,
grids and several cut sets.

float64, as for ResNet-34 (see test_tiling_exact_models): rounding noise is ~1e-14, so a
geometry error in a branch (a halo too small, a branch cropped at the wrong offset) stands out.
"""

import copy

import pytest
import torch

from meshci.models import build_model
from meshci.tiling import check_tiled, pool_cuts, stage_cuts, uniform_blocks
from meshci.trunk import extract_trunk

FAMILIES = ("squeezenet1_1", "googlenet", "densenet121", "convnext_tiny")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = copy.deepcopy(build_model(request.param)).double()
    with torch.no_grad():  # ConvNeXt's layer scales start at 1e-6: make its blocks count in the check
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.uniform_(0.5, 1.5)
    return request.param, model


def cut_sets(trunk):
    n = len(trunk.segments)
    branches = [s.index for s in trunk.segments if s.kind == "branch"]
    return {
        "whole": [],
        "stages": stage_cuts(trunk),
        "pools": pool_cuts(trunk),
        "around branches": sorted({i for b in branches[::3] for i in (b, b + 1) if 0 < i < n}),
        "uneven": [n // 3, n // 3 + 1, n - 2],
    }


def assert_exact(trunk, x, blocks):
    result = check_tiled(trunk, x, blocks)
    assert result.ok, f"max |tiled - monolithic| = {result.max_abs_diff}"
    assert result.compared == len(blocks) + 1


@torch.no_grad()
def test_branchy_families_odd_size(family):
    name, model = family
    size = (51, 59) if name == "convnext_tiny" else (67, 71)  # ConvNeXt's float64 7x7s and Linears: keep it < 5 s
    trunk = extract_trunk(model, (3, *size), name)
    x = torch.randn((1, *trunk.input_shape), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sets = cut_sets(trunk)
    cases = [("whole", dict(strips=4)), ("stages", dict(strips=3)), ("pools", dict(grid=(2, 3))),
             ("around branches", dict(strips=5)), ("uneven", dict(grid=(3, 2)))]  # fmt: skip
    for cuts, tiling in cases:
        assert_exact(trunk, x, uniform_blocks(trunk, sets[cuts], clamp=True, **tiling))


@pytest.mark.slow
@torch.no_grad()
def test_branchy_families_full_size(family):
    name, model = family
    trunk = extract_trunk(model, (3, 224, 224), name)
    x = torch.randn((1, *trunk.input_shape), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_exact(trunk, x, uniform_blocks(trunk, stage_cuts(trunk), strips=4, clamp=True))
