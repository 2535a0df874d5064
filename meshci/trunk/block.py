"""Branch segments: a small DAG of spatially local chains that fork and re-join.

A branch segment reads one feature map (value 0) and computes values 1..n in order, each
by one step: a chain of ops applied to one earlier value, or a join of earlier values
(`cat` along channels, elementwise `add` or `mul` of equal shapes). The last value is the
segment's output. Inception modules, fire modules and dense layers are such blocks.

Regions are computed backwards from the wanted output: every step is asked exactly the
region its consumers need (the union of their needs when several read it), so a block's
input region is the union of its branches' receptive fields and each branch computes only
what it must produce. Every region is clipped to its map; each consumer crops what it
reads from the region its producer computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meshci.trunk.ops import Op, Shape
from meshci.trunk.region import Region
from meshci.trunk.segment import Chain, crop

JOIN_KINDS = ("cat", "add", "mul")


@dataclass(frozen=True, eq=False)
class Step:
    """Value i+1 of a branch segment: `chain` applied to one value, or a join of values."""

    kind: str  # "chain" or one of JOIN_KINDS
    inputs: tuple[int, ...]
    out_shape: Shape
    chain: Chain | None = None

    def input_regions(self, out: Region, clipped: bool = True) -> list[Region]:
        """The region of each input that `out` of this step's value reads (unclipped: its receptive field)."""
        if self.chain is not None:
            return [self.chain.regions(out)[0] if clipped else self.chain.need(out)]
        return [out] * len(self.inputs)

    def flops_for(self, out: Region) -> float:
        if self.chain is not None:
            return self.chain.flops_for(out)
        if self.kind == "cat":
            return 0.0  # a copy
        return float((len(self.inputs) - 1) * self.out_shape[0] * out.area)


def join_shape(kind: str, shapes: list[Shape]) -> Shape:
    """The shape a join of `shapes` produces; ValueError when they do not fit together."""
    if kind not in JOIN_KINDS:
        raise ValueError(f"join kind {kind!r}")
    if not shapes:
        raise ValueError(f"{kind} of no values")
    if any(s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(f"{kind} of maps of different sizes: {[list(s) for s in shapes]}")
    if kind == "cat":
        return (sum(s[0] for s in shapes), shapes[0][1], shapes[0][2])
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{kind} of different shapes: {[list(s) for s in shapes]}")
    return shapes[0]


@dataclass(frozen=True, eq=False)
class BranchSegment:
    """A spatially local block whose inside forks and re-joins (kind "branch")."""

    index: int
    name: str
    in_shape: Shape
    steps: tuple[Step, ...]
    kind: str = "branch"

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError(f"segment {self.name}: a branch segment needs at least one step")
        shapes = [self.in_shape]
        for i, step in enumerate(self.steps):
            if step.kind not in ("chain", *JOIN_KINDS) or not step.inputs:
                raise ValueError(f"segment {self.name}: step {i} is a {step.kind!r} of {step.inputs}")
            if any(not 0 <= j <= i for j in step.inputs):
                raise ValueError(f"segment {self.name}: step {i} reads a value not yet computed {step.inputs}")
            ins = [shapes[j] for j in step.inputs]
            if step.kind == "chain":
                if step.chain is None or len(step.inputs) != 1 or step.chain.in_shape != ins[0]:
                    raise ValueError(f"segment {self.name}: chain step {i} does not fit its input {ins}")
                expected = step.chain.out_shape
            else:
                expected = join_shape(step.kind, ins)
            if expected != step.out_shape:
                raise ValueError(f"segment {self.name}: step {i} gives {expected}, not {step.out_shape}")
            shapes.append(expected)

    @property
    def out_shape(self) -> Shape:
        return self.steps[-1].out_shape

    @property
    def flops(self) -> float:
        _, h, w = self.out_shape
        return self.flops_for(Region.full(h, w))

    @property
    def ops(self) -> tuple[Op, ...]:
        return tuple(op for step in self.steps if step.chain is not None for op in step.chain.ops)

    def regions(self, out: Region, clipped: bool = True) -> list[Region | None]:
        """The region wanted of each value (0 = the input, n = `out`); None for a value nothing reads.

        A value read by several steps is wanted over the union of what they read.
        """
        wanted: list[Region | None] = [None] * (len(self.steps) + 1)
        wanted[-1] = out
        for i in range(len(self.steps) - 1, -1, -1):
            region = wanted[i + 1]
            if region is None:
                continue
            for j, r in zip(self.steps[i].inputs, self.steps[i].input_regions(region, clipped)):
                have = wanted[j]
                wanted[j] = r if have is None else have.union(r)
        return wanted

    def input_region(self, out: Region) -> Region:
        region = self.regions(out)[0]
        assert region is not None  # the last step reads value 0 directly or through earlier steps
        return region

    def need(self, out: Region) -> Region:
        """Unclipped input region (the receptive field of `out`): union over branches."""
        return self.regions(out, clipped=False)[0]  # type: ignore[return-value]

    def flops_for(self, out: Region) -> float:
        wanted = self.regions(out)
        return sum(step.flops_for(r) for step, r in zip(self.steps, wanted[1:]) if r is not None)

    @torch.no_grad()
    def run(self, x: Tensor, have: Region, out: Region) -> Tensor:
        """Exactly `out` of the output, from `x` covering `have` of the input."""
        wanted = self.regions(out)
        values: list[Tensor | None] = [crop(x, have, wanted[0])]  # type: ignore[arg-type]
        for i, step in enumerate(self.steps):
            region = wanted[i + 1]
            if region is None:
                values.append(None)
                continue
            if step.chain is not None:
                j = step.inputs[0]
                values.append(step.chain.run(values[j], wanted[j], region))  # type: ignore[arg-type]
                continue
            parts = [crop(values[j], wanted[j], region) for j in step.inputs]  # type: ignore[arg-type]
            if step.kind == "cat":
                values.append(torch.cat(parts, dim=1))
            elif step.kind == "add":
                values.append(_fold(parts, torch.add))
            else:
                values.append(_fold(parts, torch.mul))
        return values[-1]  # type: ignore[return-value]

    def describe(self) -> str:
        return self._describe_value(len(self.steps)) or "identity"

    def _describe_value(self, k: int) -> str:
        if k == 0:
            return ""
        step = self.steps[k - 1]
        if step.chain is not None:
            before = self._describe_value(step.inputs[0])
            ops = " > ".join(op.describe() for op in step.chain.ops)
            return f"{before} > {ops}" if before else ops
        return f"{step.kind}(" + " | ".join(self._describe_value(j) or "identity" for j in step.inputs) + ")"


def _fold(parts: list[Tensor], fn: object) -> Tensor:
    y = parts[0]
    for p in parts[1:]:
        y = fn(y, p)  # type: ignore[operator]
    return y
