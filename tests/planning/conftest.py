"""Small trunks for the planning tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshci.models import build_model
from meshci.trunk import extract_trunk


def five_segment_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 5),
    )


@pytest.fixture(scope="session")
def five_trunk():
    torch.manual_seed(0)
    trunk = extract_trunk(five_segment_cnn().eval(), (3, 32, 32), "five")
    assert len(trunk.segments) == 5
    return trunk


@pytest.fixture(scope="session")
def small_models():
    """VGG-16 and ResNet-34 trunks at 32 x 32 (all segments, tiny maps: fast)."""
    return {name: extract_trunk(build_model(name), (3, 32, 32), name) for name in ("vgg16", "resnet34")}


@pytest.fixture(scope="session")
def models_64():
    """VGG-16 and ResNet-34 trunks at 64 x 64: maps fine enough that row strips are not
    coarser than DeepThings's grid tiles."""
    return {name: extract_trunk(build_model(name), (3, 64, 64), name) for name in ("vgg16", "resnet34")}
