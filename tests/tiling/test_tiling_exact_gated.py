"""ShuffleNetV2, MobileNetV3-Small and EfficientNet-B0 tiled: channel split/shuffle and SE
gates (each block at a gate combines the previous tiles' partial sums) stay exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meshci.cost.model import CostModel
from meshci.errors import TilingError
from meshci.models.registry import build_model
from meshci.planning.strategies import default_cluster
from meshci.tiling import check_tiled, gate_cuts, run_tiled, uniform_blocks
from meshci.trunk import extract_trunk

FAMILIES = ["shufflenet_v2_x1_0", "mobilenet_v3_small", "efficientnet_b0"]
_TRUNKS: dict = {}


def trunk_of(name: str, size: tuple[int, int]):
    key = (name, size)
    if key not in _TRUNKS:
        _TRUNKS[key] = (build_model(name, seed=1), extract_trunk(build_model(name, seed=1), (3, *size), name))
    return _TRUNKS[key]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("size", [(64, 64), (67, 53)])
def test_strips_and_grids_are_exact(name, size) -> None:
    model, trunk = trunk_of(name, size)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = model(x)
    flops_trunk, flops_head = trunk.counted_flops()
    assert flops_trunk / (flops_trunk + flops_head) >= 0.7  # small inputs: the head weighs more
    cuts = gate_cuts(trunk)
    if name != "shufflenet_v2_x1_0":
        assert len(cuts) >= 9  # every SE unit is in the trunk
    extra = sorted(set(cuts) | {len(trunk.segments) // 3})
    for blocks in (uniform_blocks(trunk, cuts, strips=4, clamp=True),
                   uniform_blocks(trunk, extra, grid=(2, 2), clamp=True)):
        check = check_tiled(trunk, x, blocks)
        assert check.ok, check
        logits, _ = run_tiled(trunk, x, blocks)
        assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_a_gate_inside_a_tiled_block_is_refused() -> None:
    _, trunk = trunk_of("mobilenet_v3_small", (64, 64))
    cuts = gate_cuts(trunk)
    blocks = uniform_blocks(trunk, cuts[1:], strips=2)  # the first gate inside block 0
    with pytest.raises(TilingError, match="SE gate"):
        run_tiled(trunk, torch.randn(1, 3, 64, 64), blocks)
    whole = uniform_blocks(trunk, cuts[1:], strips=1)  # one whole-map tile may pool it itself
    logits, _ = run_tiled(trunk, torch.randn(1, 3, 64, 64), whole)
    assert logits.shape == (1, 1000)


def test_the_cost_model_prices_the_partial_sums() -> None:
    _, trunk = trunk_of("efficientnet_b0", (64, 64))
    cluster = default_cluster(3)
    model = CostModel(trunk, cluster)
    g = gate_cuts(trunk)[2]
    channels = trunk.boundary_shape(g)[0]
    assert model.tables.gate_bytes[g] == 8 * channels and model.tables.gate_bytes[g - 1] == 0
    h = model.tables.heights[g + 1]
    devices = np.array([0, 1, 2])
    r0, r1 = np.array([0, h // 3, 2 * h // 3]), np.array([h // 3, 2 * h // 3, h])
    hh = model.tables.heights[g]
    holders = (devices, np.array([0, hh // 3, 2 * hh // 3]), np.array([hh // 3, 2 * hh // 3, hh]))
    _, with_sums = model.strip_block(0.0, g, g + 1, devices, r0, r1, holders, False)
    saved = model.tables.gate_bytes[g]
    try:
        model.tables.gate_bytes[g] = 0
        _, without = model.strip_block(0.0, g, g + 1, devices, r0, r1, holders, False)
    finally:
        model.tables.gate_bytes[g] = saved
    # the gate's block is 1x1 (no halo): without the sums no message at all; with them one per pair
    link = cluster.link("dev0", "dev1")
    assert with_sums - without >= link.latency_ms / 1000.0
