"""A model split into a spatially local trunk (a list of segments: chains, residual and branch blocks) and a head."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from meshci.trunk.ops import Shape
from meshci.trunk.region import Region
from meshci.trunk.block import BranchSegment
from meshci.trunk.segment import Segment

AnySegment = Segment | BranchSegment


class Trunk:
    """The spatial segments of a model, in order, and the head that follows them.

    `reference` is the original model's graph up to the end of the trunk; it returns the
    value at every segment boundary ([x, out_0, ..., out_{S-1}]) computed by the model's
    own modules, so it is an independent monolithic reference for the tiled execution.
    """

    def __init__(
        self,
        name: str,
        input_shape: Shape,
        segments: list[AnySegment],
        head: nn.Module,
        reference: nn.Module,
        head_start: str,
        stop_reason: str = "",
    ) -> None:
        if not segments:
            raise ValueError("a trunk needs at least one segment")
        self.name = name
        self.input_shape: Shape = tuple(input_shape)  # type: ignore[assignment]
        self.segments = list(segments)
        self.head = head
        self.reference = reference
        self.head_start = head_start  # the first node of the model that is not spatially local
        self.stop_reason = stop_reason  # one line: which node ends the trunk, and why

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        return f"Trunk({self.name!r}, input_shape={self.input_shape}, segments={len(self.segments)})"

    def boundary_shape(self, k: int) -> Shape:
        """Shape of the input of segment k; k == len(segments) gives the trunk output."""
        if not 0 <= k <= len(self.segments):
            raise IndexError(f"boundary {k} outside 0..{len(self.segments)}")
        if k == len(self.segments):
            return self.segments[-1].out_shape
        return self.segments[k].in_shape

    def boundary_region(self, k: int) -> Region:
        """The whole feature map at boundary k."""
        _, h, w = self.boundary_shape(k)
        return Region.full(h, w)

    @torch.no_grad()
    def forward_boundaries(self, x: Tensor) -> list[Tensor]:
        """Monolithic forward of the trunk: [x, out_0, ..., out_{S-1}]."""
        return list(self.reference(x))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """head(trunk(x)), equal to model(x)."""
        return self.head(self.forward_boundaries(x)[-1])

    __call__ = forward

    @property
    def flops(self) -> float:
        return sum(seg.flops for seg in self.segments)

    @torch.no_grad()
    def counted_flops(self, batch: int = 1) -> tuple[float, float]:
        """(trunk, head) FLOPs of one forward pass as torch's FlopCounterMode counts them
        (convolutions and matrix products, 2 per multiply-add), independently of the
        segments' own FLOPs model."""
        params = list(self.reference.parameters()) or list(self.head.parameters())
        dtype = params[0].dtype if params else torch.float32
        x = torch.zeros((batch, *self.input_shape), dtype=dtype)
        with FlopCounterMode(display=False) as trunk_count:
            y = self.forward_boundaries(x)[-1]
        with FlopCounterMode(display=False) as head_count:
            self.head(y)
        return float(trunk_count.get_total_flops()), float(head_count.get_total_flops())
