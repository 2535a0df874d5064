"""Shared test configuration. Each concern's tests live in tests/<concern>/."""

import os

import pytest
import torch

# Two cores here: keep torch from oversubscribing when tests spawn node processes.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield
