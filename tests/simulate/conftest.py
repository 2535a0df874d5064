"""Small trunks for the simulator tests."""

from __future__ import annotations

import pytest

from meshci.models import build_model
from meshci.trunk import extract_trunk


@pytest.fixture(scope="session")
def small_models():
    """VGG-16 and ResNet-34 trunks at 64 x 64."""
    return {name: extract_trunk(build_model(name), (3, 64, 64), name) for name in ("vgg16", "resnet34")}
