"""A tiny CNN for the shipping tests: a user model (`tests.node.shipmodels:tiny`) with a
custom activation of its own, so its code must travel by value."""

from __future__ import annotations

import torch
from torch import nn


def wobble(x: torch.Tensor) -> torch.Tensor:
    """An activation no library has: only this module knows it."""
    return torch.relu(x) + 0.25 * torch.tanh(x)


class Wobble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wobble(x)


def tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), Wobble(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), Wobble(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
