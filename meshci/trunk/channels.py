"""Channel split and channel shuffle as spatially local operations.

ShuffleNet-style units split a map's channels (`chunk`, `split`, `narrow` or a slice along
dim 1) and shuffle them (view to (N, g, C/g, H, W), transpose the two channel axes, view
back). Both act on each pixel's channels alone. `fuse_channel_ops` rewrites them in a traced
graph into calls of `ChannelSlice` and `ChannelShuffle` modules, using the shapes of one
forward pass (torch.fx's ShapeProp) to read the sizes the model computes from `x.size()`.
The classifier treats those modules as per-pixel ops that change the channel count.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from meshci.trunk.region import Region

Shape = tuple[int, int, int]


class ChannelSlice(nn.Module):
    """Channels [start, stop) of an (N, C, H, W) map."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        if not 0 <= start < stop:
            raise ValueError(f"channel slice [{start}, {stop})")
        self.start, self.stop = int(start), int(stop)

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.start:self.stop]

    def out_channels(self, channels: int) -> int:
        if self.stop > channels:
            raise ValueError(f"channel slice [{self.start}, {self.stop}) of a map of {channels} channels")
        return self.stop - self.start

    def extra_repr(self) -> str:
        return f"{self.start}:{self.stop}"


class ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle: view (N, g, C/g, H, W), swap the two channel axes, view back."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"channel shuffle of {groups} groups")
        self.groups = int(groups)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def out_channels(self, channels: int) -> int:
        if channels % self.groups:
            raise ValueError(f"{channels} channels do not shuffle in {self.groups} groups")
        return channels

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


CHANNEL_MODULES = (ChannelSlice, ChannelShuffle)


class ChannelOp:
    """A per-pixel op over channels (slice or shuffle) as the tiler sees it: a 1x1 window."""

    def __init__(self, module: ChannelSlice | ChannelShuffle) -> None:
        self.module = module

    def out_shape(self, in_shape: Shape) -> Shape:
        return (self.module.out_channels(in_shape[0]), in_shape[1], in_shape[2])

    def input_region(self, out: Region, in_shape: Shape) -> Region:
        return out

    def need(self, out: Region) -> Region:
        return out

    def run(self, x: Tensor, out: Region, in_shape: Shape) -> Tensor:
        return self.module(x)

    def flops(self, out: Region, in_shape: Shape) -> float:
        return 0.0  # a copy

    def describe(self) -> str:
        if isinstance(self.module, ChannelSlice):
            return f"channels[{self.module.start}:{self.module.stop}]"
        return f"shuffle{self.module.groups}"


# ---- the graph rewrite ---------------------------------------------------------------------

def shapes_of(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> bool:
    """Record each node's output shape (node.meta["tensor_meta"]) from one forward pass on
    zeros; False when the model does not run at that size (the rewrites are then skipped)."""
    params = list(gm.parameters())
    dtype = params[0].dtype if params else torch.float32
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros((1, *input_shape), dtype=dtype))
    except Exception:  # the model's own code on a too-small input: the trunk stops as it would have
        return False
    return True


def shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    s = getattr(meta, "shape", None)
    return tuple(int(v) for v in s) if s is not None else None


def _dim(value: Any, rank: int) -> int | None:
    return value + rank if isinstance(value, int) and value < 0 else value if isinstance(value, int) else None


def _method_or_function(node: fx.Node, method: str, function: Any) -> bool:
    return (node.op == "call_method" and node.target == method) or (node.op == "call_function" and node.target is function)


def _slices_of_split(node: fx.Node) -> list[tuple[int, int]] | None:
    """Channel ranges of the parts of a chunk/split along dim 1 of a 4-D map."""
    src = node.args[0] if node.args else None
    in_shape = shape(src)
    if in_shape is None or len(in_shape) != 4:
        return None
    channels = in_shape[1]
    if _method_or_function(node, "chunk", torch.chunk):
        args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("chunks", "dim") if k in node.kwargs]
        if len(args) != 2 or _dim(args[1], 4) != 1 or not isinstance(args[0], int):
            return None
        size = -(-channels // args[0])
        sizes = [min(size, channels - a) for a in range(0, channels, size)]
    elif _method_or_function(node, "split", torch.split):
        args = list(node.args[1:]) + [node.kwargs.get(k) for k in ("split_size_or_sections", "split_size", "dim")
                                      if k in node.kwargs]
        if len(args) != 2 or _dim(args[1], 4) != 1:
            return None
        if isinstance(args[0], int):
            sizes = [min(args[0], channels - a) for a in range(0, channels, args[0])]
        elif isinstance(args[0], (list, tuple)) and all(isinstance(v, int) for v in args[0]):
            sizes = list(args[0])
        else:
            return None
    else:
        return None
    if sum(sizes) != channels or any(s <= 0 for s in sizes):
        return None
    bounds, a = [], 0
    for s in sizes:
        bounds.append((a, a + s))
        a += s
    return bounds


def _view_shape(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("view", "reshape") or (
        node.op == "call_function" and node.target is torch.reshape)


def _shuffle_groups(node: fx.Node) -> tuple[fx.Node, list[fx.Node], int] | None:
    """(source, nodes to drop, groups) when `node` ends view(N,g,C/g,H,W) > transpose(1,2) >
    [contiguous] > view(N,C,H,W) (or flatten(1, 2)) of a 4-D map."""
    out = shape(node)
    is_flatten = _method_or_function(node, "flatten", torch.flatten)
    if out is None or len(out) != 4 or not (_view_shape(node) or is_flatten):
        return None
    chain = [node]
    prev = node.args[0]
    if isinstance(prev, fx.Node) and prev.op == "call_method" and prev.target == "contiguous":
        chain.append(prev)
        prev = prev.args[0]
    if not isinstance(prev, fx.Node) or not _method_or_function(prev, "transpose", torch.transpose):
        return None
    dims = sorted(_dim(d, 5) or -1 for d in prev.args[1:3])
    if dims != [1, 2] or len(prev.args) != 3:
        return None
    chain.append(prev)
    view = prev.args[0]
    if not isinstance(view, fx.Node) or not _view_shape(view):
        return None
    chain.append(view)
    src = view.args[0]
    mid, src_shape = shape(view), shape(src)
    if mid is None or src_shape is None or len(mid) != 5 or len(src_shape) != 4 or src_shape != out:
        return None
    if (mid[0], mid[3], mid[4]) != (src_shape[0], src_shape[2], src_shape[3]) or mid[1] * mid[2] != src_shape[1]:
        return None
    if any(len(n.users) != 1 for n in chain[1:]):
        return None
    return src, chain, mid[1]  # type: ignore[return-value]


def _drop_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the given nodes and the size arithmetic that only fed them."""
    pending = list(nodes)
    while pending:
        node = pending.pop(0)
        if node.users or node.graph is not graph or node.op in ("placeholder", "output"):
            continue
        feeds = [n for n in node.all_input_nodes]
        graph.erase_node(node)
        for n in feeds:
            if not n.users and (n.op == "call_method" and n.target == "size" or n.op == "call_function" and
                                n.target in (operator.getitem, operator.floordiv, operator.mul, getattr)):
                pending.append(n)


def _module_call(gm: fx.GraphModule, before: fx.Node, name: str, module: nn.Module, arg: fx.Node) -> fx.Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(before):
        return gm.graph.call_module(name, (arg,))


def fuse_channel_ops(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Rewrite channel splits and shuffles of `gm` into ChannelSlice/ChannelShuffle calls;
    returns how many were rewritten (0 when the graph holds none or does not run)."""
    graph = gm.graph
    candidates = [n for n in graph.nodes if n.op in ("call_method", "call_function") and (
        n.target in ("chunk", "split", "narrow", "transpose") or n.target in (torch.chunk, torch.split,
                                                                              torch.narrow, torch.transpose))]
    if not candidates or not shapes_of(gm, input_shape):
        return 0
    count = 0
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue
        bounds = _slices_of_split(node) if node.op != "placeholder" else None
        if bounds is not None and node.users and all(
                u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                for u in node.users):
            for user in list(node.users):
                a, b = bounds[user.args[1]]
                new = _module_call(gm, user, f"_meshci_channels{count}", ChannelSlice(a, b), node.args[0])
                new.meta = dict(user.meta)
                user.replace_all_uses_with(new)
                graph.erase_node(user)
                count += 1
            graph.erase_node(node)
            continue
        if _method_or_function(node, "narrow", torch.narrow) and len(node.args) == 4 and not node.kwargs:
            src, dim, start, length = node.args
            src_shape = shape(src)
            if src_shape is not None and len(src_shape) == 4 and _dim(dim, 4) == 1 and \
                    isinstance(start, int) and isinstance(length, int) and length > 0:
                new = _module_call(gm, node, f"_meshci_channels{count}", ChannelSlice(start, start + length), src)
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                count += 1
            continue
        found = _shuffle_groups(node)
        if found is not None:
            src, chain, groups = found
            new = _module_call(gm, node, f"_meshci_channels{count}", ChannelShuffle(groups), src)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            _drop_dead(graph, chain)
            count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
