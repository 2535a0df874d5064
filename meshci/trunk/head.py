"""The head split across devices: its linear prefix summed from partial results.

Most CNN classifiers begin their head with an average pool (to ``oh x ow``), a flatten and
a fully connected layer. All three are linear in the trunk output, so the head's first
layer before its bias is a sum over the pixels of the trunk output: each device that holds
a tile of the trunk output can compute its tile's part of it (``partial``), and the head
device adds the parts, the bias, and runs the rest of the head (``finish``)::

    head(y) == rest(sum over tiles t of partial(t, y_t) + bias)

No device gathers the trunk output, and the fully connected layer's weights are read
once in all, each device reading only the columns of the pooled bins its tile touches
(VGG-16's first classifier layer is 411 MB of its 490 MB head). The weights are stored
by bin row first, (bin row, output, bin column, channel), so the weights of a band of bin
rows are one contiguous block: a strip's part is one batched matrix-vector product over a
view, with no copy, and a device whose head file is mapped from disk reads only its band's
pages. (In the Linear's own order, a band is a short run in every output's row of the file;
the kernel's read-ahead then faults in the whole 411 MB on every device.)

`HeadSplit.of` recognises the pattern in a head graph (pooling: adaptive or global
average, possibly an identity when the trunk output is already ``oh x ow``; flatten;
identity modules such as eval-mode dropout; a Linear); other heads are not split and run
whole on one device. Sums in another order differ from the single-device head by float
rounding only.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from meshci.trunk.region import Region

_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


@dataclass(eq=False)
class HeadSplit:
    """A head as ``rest(prefix(y) + bias)`` with ``prefix`` linear in the trunk output ``y``
    of shape (C, H, W): adaptive average pooling to (oh, ow), flatten, the first Linear."""

    channels: int
    height: int
    width: int
    oh: int
    ow: int
    weight: Tensor  # (oh, out, ow, C): the first Linear's weight, by bin row first
    bias: Tensor  # (out,)
    rest: nn.Module  # the head after the first Linear (takes its output, bias included)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    # ---- geometry ---------------------------------------------------------------------
    def row_bins(self, r0: int, r1: int) -> range:
        """Pooled bin rows whose input rows meet [r0, r1)."""
        return _bins(r0, r1, self.height, self.oh)

    def col_bins(self, c0: int, c1: int) -> range:
        return _bins(c0, c1, self.width, self.ow)

    def prefix_flops(self, region: Region) -> float:
        """Multiply-adds x 2 of `partial` for a tile (the weight columns it reads)."""
        bins = len(self.row_bins(region.r0, region.r1)) * len(self.col_bins(region.c0, region.c1))
        return 2.0 * self.out_features * bins * self.channels

    def weight_bytes(self, region: Region) -> int:
        """Bytes of weight `partial` reads for a tile."""
        return int(self.prefix_flops(region) / 2) * self.weight.element_size()

    # ---- compute ----------------------------------------------------------------------
    def partial(self, region: Region, y: Tensor) -> Tensor:
        """This tile's part of the prefix: ``prefix`` of the trunk output that is `y` on
        `region` and zero elsewhere. `y`: (1, C, h, w) or (C, h, w) covering `region`."""
        if y.dim() == 4:
            y = y[0]
        rows, cols = self.row_bins(region.r0, region.r1), self.col_bins(region.c0, region.c1)
        pooled = y.new_zeros((len(rows), len(cols), self.channels))
        for a, i in enumerate(rows):
            b0, b1 = _bin(i, self.height, self.oh)
            t0, t1 = max(b0, region.r0), min(b1, region.r1)
            for b, j in enumerate(cols):
                d0, d1 = _bin(j, self.width, self.ow)
                u0, u1 = max(d0, region.c0), min(d1, region.c1)
                if t0 < t1 and u0 < u1:
                    cell = y[:, t0 - region.r0 : t1 - region.r0, u0 - region.c0 : u1 - region.c0]
                    pooled[a, b] = cell.sum(dim=(1, 2)) / ((b1 - b0) * (d1 - d0))
        i0, i1, j0, j1 = rows.start, rows.stop, cols.start, cols.stop
        if j0 == 0 and j1 == self.ow:
            # whole bin rows: one contiguous block of the weights (a view, no copy)
            block = self.weight[i0:i1].reshape(i1 - i0, self.out_features, -1)
            return torch.bmm(block, pooled.reshape(i1 - i0, -1, 1)).sum(dim=0).reshape(-1)
        out = y.new_zeros(self.out_features)
        for a, i in enumerate(rows):
            out += torch.mv(self.weight[i, :, j0:j1].reshape(self.out_features, -1), pooled[a].reshape(-1))
        return out

    def finish(self, prefix: Tensor) -> Tensor:
        """The head's output from the sum of every tile's part (1, out_features) in."""
        return self.rest((prefix + self.bias).reshape(1, -1))

    def __call__(self, y: Tensor) -> Tensor:
        """The whole head on a whole trunk output (1, C, H, W), by the split (for tests)."""
        return self.finish(self.partial(Region(0, self.height, 0, self.width), y))

    # ---- recognising the pattern -------------------------------------------------------
    @classmethod
    def of(cls, head: nn.Module, in_shape: tuple[int, int, int], *, weights: bool = True) -> HeadSplit | None:
        """The split of `head` (a graph module taking the trunk output of shape `in_shape`),
        or None when it does not begin with pool, flatten, Linear. `weights=False`: only
        its shape (the weight is left as the layer has it: for costs, not for compute)."""
        if not isinstance(head, fx.GraphModule):
            return None
        channels, height, width = (int(v) for v in in_shape)
        modules = dict(head.named_modules())
        nodes = [n for n in head.graph.nodes]
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            return None
        cur = placeholders[0]
        oh, ow = height, width
        linear: fx.Node | None = None
        flat = False
        for node in nodes[nodes.index(cur) + 1 :]:
            if node.op == "output":
                return None
            if len(node.all_input_nodes) != 1 or node.all_input_nodes[0] is not cur or len(cur.users) != 1:
                return None  # the chain branches, or this node is not the next step of it
            if not flat and (size := _pool_size(node, modules, height, width)) is not None:
                oh, ow = size
            elif not flat and _is_flatten(node, modules):
                flat = True
            elif _is_identity(node, modules):
                pass
            elif flat and node.op == "call_module" and isinstance(modules[str(node.target)], nn.Linear):
                linear = node
                break
            else:
                return None
            cur = node
        if linear is None:
            return None
        fc = modules[str(linear.target)]
        assert isinstance(fc, nn.Linear)
        if fc.in_features != channels * oh * ow:
            return None
        if not weights:
            shape_only = torch.empty((oh, fc.out_features, ow, channels), dtype=fc.weight.dtype, device="meta")
            return cls(channels, height, width, oh, ow, shape_only, torch.zeros(0), nn.Identity())
        weight = fc.weight.detach().reshape(fc.out_features, channels, oh, ow).permute(2, 0, 3, 1).contiguous()
        bias = (fc.bias.detach().clone() if fc.bias is not None
                else torch.zeros(fc.out_features, dtype=fc.weight.dtype))
        return cls(channels, height, width, oh, ow, weight, bias, _rest_module(head, linear))


@dataclass(frozen=True)
class HeadCost:
    """What the head costs, for the planner (without the head's weights in memory).

    ``flops``: the whole head (its fully connected and convolution layers; the rest is
    negligible). With ``split``: ``prefix_flops`` for the linear prefix over the whole
    trunk output (a tile pays its share of bin rows) and ``rest_flops`` after it;
    ``prefix_rows``: the bin rows (oh) the prefix's weights are in."""

    flops: float
    split: bool = False
    prefix_flops: float = 0.0
    rest_flops: float = 0.0
    prefix_rows: int = 1
    out_features: int = 0

    @classmethod
    def of(cls, head: nn.Module | None, in_shape: tuple[int, int, int]) -> HeadCost:
        if head is None:
            return cls(0.0)
        flops = _layer_flops(head, in_shape)
        split = HeadSplit.of(head, in_shape, weights=False)
        if split is None:
            return cls(flops)
        prefix = split.prefix_flops(Region(0, split.height, 0, split.width))
        return cls(flops, True, prefix, max(0.0, flops - prefix), split.oh, split.out_features)

    def prefix_share(self, region: Region, height: int) -> float:
        """The prefix FLOPs of a tile of rows `region` of a trunk output of `height` rows."""
        if not self.split or height <= 0:
            return 0.0
        rows = _bins(region.r0, region.r1, height, self.prefix_rows)
        return self.prefix_flops * len(rows) / self.prefix_rows


def _layer_flops(head: nn.Module, in_shape: tuple[int, int, int]) -> float:
    """FLOPs of the head's linear and conv layers (the rest is negligible); at least the
    size of its input."""
    total = 0.0
    for module in head.modules():
        if isinstance(module, nn.Linear):
            total += 2.0 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            total += 2.0 * module.in_channels * module.out_channels * math.prod(module.kernel_size) / module.groups
    return total or float(math.prod(in_shape))


def _bin(i: int, size: int, bins: int) -> tuple[int, int]:
    """Input range [start, end) of adaptive pooling bin i (PyTorch's rule)."""
    return (i * size) // bins, -(-((i + 1) * size) // bins)


def _bins(lo: int, hi: int, size: int, bins: int) -> range:
    first = next((i for i in range(bins) if _bin(i, size, bins)[1] > lo), bins)
    last = next((i for i in range(bins - 1, -1, -1) if _bin(i, size, bins)[0] < hi), -1)
    return range(first, max(first, last + 1))


def _pool_size(node: fx.Node, modules: dict[str, nn.Module], h: int, w: int) -> tuple[int, int] | None:
    """(oh, ow) of an average pooling node over the whole map, else None."""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            return _pair_size(mod.output_size, h, w)
        return None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return _pair_size(size, h, w)
    if (node.op == "call_function" and node.target is torch.mean) or (
            node.op == "call_method" and node.target == "mean"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if keep and isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]:
            return 1, 1
    return None


def _pair_size(size: object, h: int, w: int) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        a, b = size
        return (h if a is None else int(a)), (w if b is None else int(b))
    return None


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        mod = modules[str(node.target)]
        return isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1 and node.kwargs.get("end_dim", -1) == -1 and len(node.args) <= 2
    return False


def _is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _IDENTITY)
    return node.op == "call_function" and node.target in (F.dropout, operator.pos)


def _rest_module(head: fx.GraphModule, linear: fx.Node) -> fx.GraphModule:
    """The head after `linear`, taking the Linear's output as its input."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {linear: graph.placeholder("z")}
    nodes = list(head.graph.nodes)
    for node in nodes[nodes.index(linear) + 1 :]:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    rest = fx.GraphModule(head, graph)
    rest.delete_all_unused_submodules()  # the pooling and the first Linear stay behind
    return rest


__all__ = ["HeadCost", "HeadSplit"]
