"""Per-pixel work in channels-last layout as one spatially local op.

ConvNeXt-style blocks permute a map to (N, H, W, C), apply LayerNorm over channels, Linear
layers and activations per pixel, and permute back. Each op reads one pixel's channels, so
the whole run is local with a 1x1 window. `fuse_channels_last` replaces every such run in a
traced graph (from `permute(0, 2, 3, 1)` to `permute(0, 3, 1, 2)`, nothing else reading its
values, channels kept) by one call of a `PerPixel` module that runs the same nodes, in the
same order, on whatever tile it is given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from meshci.trunk.classify import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, attr_value
from meshci.trunk.ops import PerPixel

TO_LAST = (0, 2, 3, 1)
TO_FIRST = (0, 3, 1, 2)


def _permutation(node: fx.Node) -> tuple[int, ...] | None:
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1:] or (node.kwargs.get("dims"),)
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]


def _last_axis_constant(value: Any) -> bool:
    """A constant broadcast against (N, H, W, C) that is the same at every pixel."""
    if not isinstance(value, Tensor):
        return isinstance(value, (int, float))
    return all(size == 1 for size in value.shape[:-1])


def _per_pixel(node: fx.Node, prev: fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float] | None:
    """(channels in, FLOPs per pixel) when `node` works on each pixel's channels of `prev` alone."""
    tensors = _inputs(node)
    others = [n for n in tensors if n is not prev]
    if prev not in tensors or any(n.op != "get_attr" or not _last_axis_constant(attr_value(modules, n)) for n in others):
        return None
    if node.op == "call_module":
        m = modules[str(node.target)]
        if node.args != (prev,) or node.kwargs:
            return None
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            return float(m.normalized_shape[0]), 5.0 * m.normalized_shape[0]
        if isinstance(m, nn.Linear):
            return float(m.in_features), 2.0 * m.in_features * m.out_features
        if isinstance(m, ELEMENTWISE_MODULES):
            return 0.0, 0.0  # charged per channel below
        return None
    if node.op == "call_function" and node.target is F.layer_norm:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if node.args[0] is prev and isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 1:
            return float(shape[0]), 5.0 * shape[0]
        return None
    if (node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS) or (
        node.op == "call_method" and node.target in ELEMENTWISE_METHODS and node.args[0] is prev
    ):
        return 0.0, 0.0
    return None


def _inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def fuse_channels_last(gm: fx.GraphModule) -> int:
    """Replace each channels-last per-pixel run of `gm`'s graph by one PerPixel call; returns how many."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    fused = 0
    for start in list(graph.nodes):
        if start.graph is not graph or _permutation(start) != TO_LAST or len(_inputs(start)) != 1:
            continue
        run: list[fx.Node] = []
        node, end = start, None
        channels, flops, linear_in, linear_out = 0.0, 0.0, None, None
        while len(node.users) == 1:
            user = next(iter(node.users))
            if _permutation(user) == TO_FIRST and _inputs(user) == [node]:
                end = user
                break
            found = _per_pixel(user, node, modules)
            if found is None:
                break
            channels = channels or found[0]
            flops += found[1]
            m = modules.get(str(user.target)) if user.op == "call_module" else None
            if isinstance(m, nn.Linear):
                linear_in = linear_in if linear_in is not None else m.in_features
                linear_out = m.out_features
            run.append(user)
            node = user
        if end is None or linear_in != linear_out:
            continue  # not closed by the permute back, or the channels change: left as it is
        body = fx.Graph()
        x = body.placeholder("x")
        env: dict[fx.Node, fx.Node] = {start.args[0]: x}  # type: ignore[index]

        def lookup(n: fx.Node) -> fx.Node:
            if n not in env:  # a parameter the run reads
                env[n] = body.get_attr(str(n.target))
            return env[n]

        for n in (start, *run, end):
            env[n] = body.node_copy(n, lookup)
        body.output(env[end])
        text = " > ".join(_describe(n, modules) for n in run) or "identity"
        per_channel = (flops / channels if channels else 0.0) + len(run)
        name = _free_name(gm, start, run, fused)
        gm.add_submodule(name, PerPixel(fx.GraphModule(gm, body), per_channel, f"channels-last({text})"))
        with graph.inserting_before(end):
            call = graph.call_module(name, (start.args[0],))
        end.replace_all_uses_with(call)
        for n in reversed((start, *run, end)):
            graph.erase_node(n)
        fused += 1
    return fused


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, nn.Linear):
            return f"linear({m.in_features}->{m.out_features})"
        return type(m).__name__.lower()
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _free_name(gm: fx.GraphModule, start: fx.Node, run: list[fx.Node], index: int) -> str:
    """`<module of the run>.per_pixel` (the module path its first layer or parameter has), else per_pixel_<i>."""
    paths = [str(n.target) for n in run if n.op == "call_module"]
    paths += [str(a.target) for n in run for a in _inputs(n) if a.op == "get_attr"]
    for path in paths[:1]:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        name = f"{parent}.per_pixel" if parent else "per_pixel"
        try:
            gm.get_submodule(name)
        except AttributeError:  # free: not a module of the model yet
            try:
                gm.get_submodule(parent)
                return name
            except AttributeError:  # the parent is not a module (a parameter's owner path): use the root
                break
    return f"per_pixel_{index}"
