"""Spatially local operations and their exact tiling geometry.

Every op maps an output region to the input region it needs and computes exactly that
output region from exactly that input region. Padding is never left to the kernel:
each windowed op runs with padding=0 after an explicit `F.pad` of the part of its
window that hangs off the real map (zeros for convolution and average pooling, -inf
for max pooling), so a tile's interior edge never sees padding.

Geometry per axis (kernel k, stride s, padding lo/hi, dilation d): output indices
[a, b) need input indices [a*s - lo, (b-1)*s - lo + d*(k-1) + 1); the part outside
[0, n) is the border padding to apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meshci.trunk.region import Region

Shape = tuple[int, int, int]  # C, H, W (batch excluded)


@dataclass(frozen=True)
class Window:
    """One axis of a sliding window: kernel, stride, padding before/after, dilation."""

    kernel: int
    stride: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.stride < 1 or self.dilation < 1 or self.pad_lo < 0 or self.pad_hi < 0:
            raise ValueError(f"invalid window {self}")

    @property
    def span(self) -> int:
        """How many input positions one window covers, holes included."""
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, n: int) -> int:
        """PyTorch's output size for an input of n positions (pooling's ceil rule included)."""
        num = n + self.pad_lo + self.pad_hi - self.span
        if num < 0:
            raise ValueError(f"window of span {self.span} does not fit an input of {n} (+padding)")
        if not self.ceil_mode:
            return num // self.stride + 1
        out = -(-num // self.stride) + 1
        # PyTorch: the last window must start inside the input or the leading padding
        if (out - 1) * self.stride >= n + self.pad_lo:
            out -= 1
        return out

    def need(self, a: int, b: int) -> tuple[int, int]:
        """Unclipped input range [lo, hi) that output range [a, b) reads."""
        return a * self.stride - self.pad_lo, (b - 1) * self.stride - self.pad_lo + self.span

    def clip(self, a: int, b: int, n: int) -> tuple[int, int, int, int]:
        """Input range clipped to [0, n), with the padding (before, after) it lacks."""
        lo, hi = self.need(a, b)
        return max(lo, 0), min(hi, n), max(0, -lo), max(0, hi - n)

    def counted(self, a: int, b: int, lo: int, hi: int) -> list[int]:
        """For each output index in [a, b): how many window taps fall in [lo, hi)."""
        out = []
        for o in range(a, b):
            start = o * self.stride - self.pad_lo
            end = start + self.span
            out.append(max(0, min(end, hi) - max(start, lo)))
        return out


class Op(Protocol):
    """A spatially local operation on an (N, C, H, W) tensor."""

    def out_shape(self, in_shape: Shape) -> Shape: ...

    def input_region(self, out: Region, in_shape: Shape) -> Region: ...

    def need(self, out: Region) -> Region: ...

    def run(self, x: Tensor, out: Region, in_shape: Shape) -> Tensor: ...

    def flops(self, out: Region, in_shape: Shape) -> float: ...

    def describe(self) -> str: ...


class _Windowed:
    """Shared geometry of ops that slide a window over rows and columns."""

    rows: Window
    cols: Window

    def _out_hw(self, in_shape: Shape) -> tuple[int, int]:
        return self.rows.out_size(in_shape[1]), self.cols.out_size(in_shape[2])

    def input_region(self, out: Region, in_shape: Shape) -> Region:
        r0, r1, _, _ = self.rows.clip(out.r0, out.r1, in_shape[1])
        c0, c1, _, _ = self.cols.clip(out.c0, out.c1, in_shape[2])
        return Region(r0, r1, c0, c1)

    def need(self, out: Region) -> Region:
        r0, r1 = self.rows.need(out.r0, out.r1)
        c0, c1 = self.cols.need(out.c0, out.c1)
        return Region(r0, r1, c0, c1)

    def _pads(self, out: Region, in_shape: Shape) -> tuple[int, int, int, int]:
        """F.pad order: (left, right, top, bottom)."""
        _, _, top, bottom = self.rows.clip(out.r0, out.r1, in_shape[1])
        _, _, left, right = self.cols.clip(out.c0, out.c1, in_shape[2])
        return left, right, top, bottom


def _pad(x: Tensor, pads: tuple[int, int, int, int], value: float) -> Tensor:
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant", value=value)


@dataclass(frozen=True, eq=False)
class ConvOp(_Windowed):
    """A 2-D convolution with the batch norm and the activation that follow it.

    FLOPs count the batch norm as the bias it could be folded into.
    """

    weight: Tensor
    bias: Tensor | None
    rows: Window
    cols: Window
    groups: int = 1
    norm: BatchNorm | None = None
    activation: PointwiseOp | None = None

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    def out_shape(self, in_shape: Shape) -> Shape:
        if in_shape[0] != self.in_channels:
            raise ValueError(f"conv expects {self.in_channels} channels, got {in_shape[0]}")
        return (self.out_channels, *self._out_hw(in_shape))

    def run(self, x: Tensor, out: Region, in_shape: Shape) -> Tensor:
        x = _pad(x, self._pads(out, in_shape), 0.0)
        stride = (self.rows.stride, self.cols.stride)
        if self.rows.kernel == 1 and self.cols.kernel == 1 and stride != (1, 1):
            # A strided 1x1 conv is a subsampling then a 1x1 conv. CPU kernels round a
            # strided 1x1 conv differently depending on the input width; subsampled they
            # agree with the untiled module bit for bit.
            x = x[..., :: stride[0], :: stride[1]]
            stride = (1, 1)
        y = F.conv2d(
            x,
            self.weight,
            self.bias,
            stride=stride,
            padding=0,
            dilation=(self.rows.dilation, self.cols.dilation),
            groups=self.groups,
        )
        if self.norm is not None:
            y = self.norm(y)
        if self.activation is not None:
            y = self.activation.fn(y)
        return y

    def flops(self, out: Region, in_shape: Shape) -> float:
        per_position = 2.0 * (self.in_channels // self.groups) * self.rows.kernel * self.cols.kernel
        per_position *= self.out_channels
        if self.bias is not None or self.norm is not None:
            per_position += self.out_channels
        if self.activation is not None:
            per_position += self.activation.cost * self.out_channels
        return per_position * out.area

    def describe(self) -> str:
        k = f"{self.rows.kernel}x{self.cols.kernel}"
        s = f"/{self.rows.stride}" if self.rows.stride > 1 or self.cols.stride > 1 else ""
        bn = "+bn" if self.norm is not None else ""
        act = f"+{self.activation.name}" if self.activation is not None else ""
        return f"conv{k}{s}({self.in_channels}->{self.out_channels}){bn}{act}"


@dataclass(frozen=True, eq=False)
class PoolOp(_Windowed):
    """Max or average pooling with PyTorch's exact border and ceil_mode semantics."""

    mode: str  # "max" | "avg"
    rows: Window
    cols: Window
    count_include_pad: bool = True
    divisor_override: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("max", "avg"):
            raise ValueError(f"pool mode {self.mode!r}")

    def out_shape(self, in_shape: Shape) -> Shape:
        return (in_shape[0], *self._out_hw(in_shape))

    def run(self, x: Tensor, out: Region, in_shape: Shape) -> Tensor:
        pads = self._pads(out, in_shape)
        kernel = (self.rows.kernel, self.cols.kernel)
        stride = (self.rows.stride, self.cols.stride)
        if self.mode == "max":
            return F.max_pool2d(
                _pad(x, pads, -math.inf),
                kernel,
                stride,
                padding=0,
                dilation=(self.rows.dilation, self.cols.dilation),
            )
        sums = F.avg_pool2d(_pad(x, pads, 0.0), kernel, stride, padding=0, divisor_override=1)
        if self.divisor_override is not None:
            return sums / self.divisor_override
        return sums / self._divisor(out, in_shape).to(dtype=sums.dtype, device=sums.device)

    def _divisor(self, out: Region, in_shape: Shape) -> Tensor:
        """PyTorch's per-window divisor: taps inside the padded map (count_include_pad) or the map."""
        h, w = in_shape[1], in_shape[2]
        if self.count_include_pad:
            rows = self.rows.counted(out.r0, out.r1, -self.rows.pad_lo, h + self.rows.pad_hi)
            cols = self.cols.counted(out.c0, out.c1, -self.cols.pad_lo, w + self.cols.pad_hi)
        else:
            rows = self.rows.counted(out.r0, out.r1, 0, h)
            cols = self.cols.counted(out.c0, out.c1, 0, w)
        return torch.tensor(rows, dtype=torch.float64)[:, None] * torch.tensor(cols, dtype=torch.float64)[None, :]

    def flops(self, out: Region, in_shape: Shape) -> float:
        return float(self.rows.kernel * self.cols.kernel * in_shape[0] * out.area)

    def describe(self) -> str:
        ceil = ",ceil" if self.rows.ceil_mode else ""
        return f"{self.mode}pool{self.rows.kernel}x{self.cols.kernel}/{self.rows.stride}{ceil}"


@dataclass(frozen=True, eq=False)
class PointwiseOp:
    """An elementwise op (activation, eval-mode batch norm, scalar arithmetic)."""

    fn: Callable[[Tensor], Tensor]
    name: str
    cost: float = 1.0  # FLOPs per element (0 for identities such as eval-mode dropout)

    def out_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def input_region(self, out: Region, in_shape: Shape) -> Region:
        return out

    def need(self, out: Region) -> Region:
        return out

    def run(self, x: Tensor, out: Region, in_shape: Shape) -> Tensor:
        return self.fn(x)

    def flops(self, out: Region, in_shape: Shape) -> float:
        return self.cost * in_shape[0] * out.area

    def describe(self) -> str:
        return self.name


class _Input:
    """Marks where the tensor goes in an ElementwiseCall's arguments."""

    def __repr__(self) -> str:
        return "INPUT"

    def __reduce__(self) -> str:
        return "INPUT"  # unpickles as the module's one INPUT, so `is INPUT` keeps working


INPUT = _Input()


def _substitute(value: Any, x: Tensor) -> Any:
    if value is INPUT:
        return x
    if isinstance(value, (tuple, list)):
        return type(value)(_substitute(v, x) for v in value)
    if isinstance(value, dict):
        return {k: _substitute(v, x) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ElementwiseCall:
    """A recorded call of an elementwise function or tensor method, with INPUT for the tensor.

    `method`: call getattr(x, target)(*args[1:]) instead of target(*args).
    """

    target: Callable[..., Any] | str
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()
    method: bool = False

    def __call__(self, x: Tensor) -> Tensor:
        args = _substitute(self.args, x)
        kwargs = {k: _substitute(v, x) for k, v in self.kwargs}
        if self.method:
            return getattr(x, str(self.target))(*args[1:], **kwargs)
        return self.target(*args, **kwargs)  # type: ignore[operator]


@dataclass(frozen=True, eq=False)
class BatchNorm:
    """Eval-mode batch norm: a per-channel affine map from running statistics.

    It is applied with F.batch_norm exactly as the module would apply it, not folded
    into the convolution's weights numerically: folding changes rounding by ~1e-6
    relative, which is more than the stitched-equals-monolithic check allows near zero.
    """

    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    @classmethod
    def from_module(cls, bn: torch.nn.BatchNorm2d) -> BatchNorm:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("batch norm without running statistics is not spatially local")
        weight = bn.weight.detach() if bn.weight is not None else None
        bias = bn.bias.detach() if bn.bias is not None else None
        return cls(bn.running_mean.detach(), bn.running_var.detach(), weight, bias, float(bn.eps))

    @property
    def channels(self) -> int:
        return int(self.running_mean.shape[0])

    def __call__(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class PerPixel(nn.Module):
    """Per-pixel work in channels-last layout (see meshci.trunk.channels_last): a graph that
    permutes a tile to (N, H, W, C), works on each pixel's channels and permutes back."""

    def __init__(self, body: nn.Module, flops_per_channel: float, text: str) -> None:
        super().__init__()
        self.body = body
        self.flops_per_channel = flops_per_channel  # per input channel and pixel
        self.text = text

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)
