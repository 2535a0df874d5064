"""Segments: the spatially local units a trunk is cut into.

A segment is a chain of ops (`conv`, `pool`, `pointwise`) or a residual block: a main
chain and a shortcut chain (empty for an identity shortcut) that are added, followed by
an optional post chain (the activation after the add). Regions handed to and returned by
a segment are always clipped to their feature map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meshci.trunk.ops import Op, Shape
from meshci.trunk.region import Region

SEGMENT_KINDS = ("conv", "pool", "pointwise", "residual")


def crop(x: Tensor, have: Region, want: Region) -> Tensor:
    """The part `want` of a tensor whose last two axes cover `have`."""
    if not have.contains(want):
        raise ValueError(f"region {want} is not inside the region held {have}")
    if x.shape[-2] != have.height or x.shape[-1] != have.width:
        raise ValueError(f"tensor of spatial size {tuple(x.shape[-2:])} does not match region {have}")
    if want == have:
        return x
    return x[..., want.r0 - have.r0 : want.r1 - have.r0, want.c0 - have.c0 : want.c1 - have.c0]


@dataclass(frozen=True, eq=False)
class Chain:
    """Ops applied one after another, with the map shape before each and after the last."""

    ops: tuple[Op, ...]
    shapes: tuple[Shape, ...]

    @classmethod
    def build(cls, ops: tuple[Op, ...] | list[Op], in_shape: Shape) -> Chain:
        shapes = [tuple(in_shape)]
        for op in ops:
            shapes.append(op.out_shape(shapes[-1]))
        return cls(tuple(ops), tuple(shapes))  # type: ignore[arg-type]

    @property
    def in_shape(self) -> Shape:
        return self.shapes[0]

    @property
    def out_shape(self) -> Shape:
        return self.shapes[-1]

    def regions(self, out: Region) -> list[Region]:
        """Region at each op's input, then `out`: len(ops) + 1 regions."""
        regions = [out]
        for op, shape in zip(reversed(self.ops), reversed(self.shapes[:-1])):
            regions.append(op.input_region(regions[-1], shape))
        regions.reverse()
        return regions

    def need(self, out: Region) -> Region:
        """Unclipped input region (the receptive field of `out`)."""
        for op in reversed(self.ops):
            out = op.need(out)
        return out

    def run(self, x: Tensor, have: Region, out: Region) -> Tensor:
        regions = self.regions(out)
        y = crop(x, have, regions[0])
        for op, shape, region in zip(self.ops, self.shapes, regions[1:]):
            y = op.run(y, region, shape)
        return y

    def flops_for(self, out: Region) -> float:
        regions = self.regions(out)
        return sum(op.flops(r, s) for op, s, r in zip(self.ops, self.shapes, regions[1:]))


@dataclass(frozen=True, eq=False)
class Segment:
    """One spatially local unit of a trunk.

    `main` is the whole segment unless `shortcut` is set (a residual block):
    then out = post(main(x) + shortcut(x)).
    """

    index: int
    name: str
    kind: str
    main: Chain
    shortcut: Chain | None = None
    post: Chain | None = None

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind {self.kind!r}")
        if self.shortcut is not None:
            if self.shortcut.in_shape != self.main.in_shape or self.shortcut.out_shape != self.main.out_shape:
                raise ValueError(f"segment {self.name}: main and shortcut shapes differ")
            if self.post is not None and self.post.in_shape != self.main.out_shape:
                raise ValueError(f"segment {self.name}: post chain shape mismatch")

    @property
    def in_shape(self) -> Shape:
        return self.main.in_shape

    @property
    def out_shape(self) -> Shape:
        if self.post is not None:
            return self.post.out_shape
        return self.main.out_shape

    @property
    def flops(self) -> float:
        _, h, w = self.out_shape
        return self.flops_for(Region.full(h, w))

    @property
    def ops(self) -> tuple[Op, ...]:
        """Every op of the segment (main, shortcut, post)."""
        ops = list(self.main.ops)
        if self.shortcut is not None:
            ops.extend(self.shortcut.ops)
        if self.post is not None:
            ops.extend(self.post.ops)
        return tuple(ops)

    def _added(self, out: Region) -> Region:
        """Region needed at the add (input of the post chain)."""
        return self.post.regions(out)[0] if self.post is not None else out

    def input_region(self, out: Region) -> Region:
        if self.shortcut is None:
            return self.main.regions(out)[0]
        added = self._added(out)
        return self.main.regions(added)[0].union(self.shortcut.regions(added)[0])

    def need(self, out: Region) -> Region:
        """Unclipped input region (receptive field of `out`)."""
        if self.shortcut is None:
            return self.main.need(out)
        added = self.post.need(out) if self.post is not None else out
        return self.main.need(added).union(self.shortcut.need(added))

    def flops_for(self, out: Region) -> float:
        if self.shortcut is None:
            return self.main.flops_for(out)
        added = self._added(out)
        total = self.main.flops_for(added) + self.shortcut.flops_for(added)
        total += float(self.main.out_shape[0] * added.area)  # the add
        if self.post is not None:
            total += self.post.flops_for(out)
        return total

    @torch.no_grad()
    def run(self, x: Tensor, have: Region, out: Region) -> Tensor:
        """Exactly `out` of the output, from `x` covering `have` of the input."""
        if self.shortcut is None:
            return self.main.run(x, have, out)
        added = self._added(out)
        y = self.main.run(x, have, added) + self.shortcut.run(x, have, added)
        if self.post is not None:
            y = self.post.run(y, added, out)
        return y

    def describe(self) -> str:
        text = " > ".join(op.describe() for op in self.main.ops)
        if self.shortcut is not None:
            short = " > ".join(op.describe() for op in self.shortcut.ops) or "identity"
            text = f"[{text}] + [{short}]"
            if self.post is not None and self.post.ops:
                text += " > " + " > ".join(op.describe() for op in self.post.ops)
        return text
