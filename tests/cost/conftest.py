"""Small trunks for the cost-model tests (a few segments, small maps: fast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meshci.models import build_model
from meshci.trunk import extract_trunk


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


@pytest.fixture(scope="session")
def tiny_trunk():
    torch.manual_seed(0)
    return extract_trunk(tiny_cnn().eval(), (3, 24, 24), "tiny")


@pytest.fixture(scope="session")
def small_models():
    """VGG-16 and ResNet-34 trunks at 64 x 64 (same segments as at 224, small maps)."""
    return {name: extract_trunk(build_model(name), (3, 64, 64), name) for name in ("vgg16", "resnet34")}
