"""Split a model into spatially local segments and a non-spatial head with torch.fx.

The model is traced with standard `torch.nn` modules as leaves. Walking the graph from
the input, each step consumes one segment:

* a convolution, with the eval-mode batch norm after it and the elementwise activation
  after that (`conv`);
* a max/avg pooling (`pool`);
* a run of elementwise ops: batch norm, activations, scalar arithmetic (`pointwise`);
* a fork whose two paths are chains of the above and re-join at an addition, with the
  activation right after the addition (`residual`; one path may be the identity).

The first node that is none of these (global pooling, flatten, linear, attention, a
reshape, anything unknown) ends the trunk. The rest of the graph becomes the head, a
GraphModule whose single input is the trunk output.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from meshci.errors import TraceError
from meshci.trunk.ops import INPUT, BatchNorm, ConvOp, ElementwiseCall, Op, PointwiseOp, PoolOp, Shape, Window
from meshci.trunk.segment import Chain, Segment
from meshci.trunk.trunk import Trunk

log = logging.getLogger(__name__)

# leaf modules that act elementwise in eval mode
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)  # fmt: skip
IDENTITY_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)

# functions and tensor methods that act elementwise when every argument but the tensor is a constant
ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({
    torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu,
    F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.hardtanh, F.mish, F.softplus,
    torch.clamp, torch.neg, operator.neg,
    operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul,
})  # fmt: skip
ELEMENTWISE_METHODS = frozenset({
    "relu", "sigmoid", "tanh", "clamp", "neg", "add", "sub", "mul", "div", "contiguous",
})  # fmt: skip
ADD_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({operator.add, operator.iadd, torch.add})
ADD_METHODS = frozenset({"add", "add_"})


class _Tracer(fx.Tracer):
    """fx tracer that remembers which module was being traced when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # only to record where it failed (innermost module first); re-raised unchanged
            if self.failed_in is None:
                self.failed_in = f"{self._path(m)} ({type(m).__name__})"
            raise

    def _path(self, m: nn.Module) -> str:
        if m is self.root:
            return "<root>"
        for path, module in self.root.named_modules():
            if module is m:
                return path
        return "<unregistered module>"


def trace(model: nn.Module, name: str = "model") -> fx.GraphModule:
    """Trace `model` with torch.fx; TraceError (one line, naming the module) when it cannot."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        # torch.fx runs the model's own forward code, which can raise anything on a proxy
        where = f" in module {tracer.failed_in}" if tracer.failed_in else ""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TraceError(f"cannot trace model {name!r}{where}: {type(exc).__name__}: {first}") from exc
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def describe_node(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"'{node.target}' ({type(modules[str(node.target)]).__name__})"
    if node.op == "call_function":
        return f"'{node.name}' ({getattr(node.target, '__name__', node.target)})"
    if node.op == "call_method":
        return f"'{node.name}' (.{node.target}())"
    return f"'{node.name}' ({node.op})"


# ---------------------------------------------------------------------------------------
# classifying one node


@dataclass(frozen=True)
class _Item:
    """What one graph node is, seen as a spatially local op."""

    kind: str  # "conv" | "bn" | "pool" | "pointwise"
    node: fx.Node
    module: nn.Module | None = None
    op: Op | None = None


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _bind_input(node: fx.Node, method: bool = False) -> ElementwiseCall:
    """The node's call with its one tensor input left open (in-place variants made out-of-place)."""
    kwargs = dict(node.kwargs)
    if "inplace" in kwargs:
        kwargs["inplace"] = False  # tiles may be views of a shared input
    args, kwargs = fx.node.map_arg((node.args, kwargs), lambda n: INPUT)  # type: ignore[misc]
    return ElementwiseCall(node.target, tuple(args), tuple(kwargs.items()), method)  # type: ignore[arg-type]


def _windows_from_module(m: nn.Conv2d) -> tuple[Window, Window]:
    kernel, stride, dilation = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
    if m.padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    elif m.padding == "valid":
        pads = [(0, 0), (0, 0)]
    else:
        pads = [(p, p) for p in _pair(m.padding)]
    return tuple(  # type: ignore[return-value]
        Window(kernel[i], stride[i], pads[i][0], pads[i][1], dilation[i]) for i in range(2)
    )


def _pool_op(mode: str, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool,
             count_include_pad: bool = True, divisor_override: int | None = None) -> PoolOp:  # fmt: skip
    k, p, d = _pair(kernel), _pair(padding), _pair(dilation)
    s = _pair(stride) if stride not in (None, [], ()) else k
    rows = Window(k[0], s[0], p[0], p[0], d[0], bool(ceil_mode))
    cols = Window(k[1], s[1], p[1], p[1], d[1], bool(ceil_mode))
    return PoolOp(mode, rows, cols, bool(count_include_pad), divisor_override)


def _max_pool_args(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                   ceil_mode: bool = False, return_indices: bool = False) -> dict:  # fmt: skip
    return dict(kernel=kernel_size, stride=stride, padding=padding, dilation=dilation,
                ceil_mode=ceil_mode, return_indices=return_indices)  # fmt: skip


def _avg_pool_args(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
                   count_include_pad: bool = True, divisor_override: int | None = None) -> dict:  # fmt: skip
    return dict(kernel=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                count_include_pad=count_include_pad, divisor_override=divisor_override)  # fmt: skip


def _classify(node: fx.Node, prev: fx.Node, modules: dict[str, nn.Module]) -> _Item | None:
    """The node as a local op reading only `prev`, or None when it is not one."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    inputs = _node_inputs(node)
    if len(inputs) != 1 or inputs[0] is not prev:
        return None
    if node.op == "call_module":
        return _classify_module(node, modules[str(node.target)])
    if node.op == "call_function":
        if node.target is F.max_pool2d:
            a = _max_pool_args(*node.args, **node.kwargs)
            if a.pop("return_indices"):
                return None
            return _Item("pool", node, op=_pool_op("max", **a))
        if node.target is F.avg_pool2d:
            a = _avg_pool_args(*node.args, **node.kwargs)
            return _Item("pool", node, op=_pool_op("avg", dilation=1, **a))
        if node.target in ELEMENTWISE_FUNCTIONS:
            name = getattr(node.target, "__name__", str(node.target))
            return _Item("pointwise", node, op=PointwiseOp(_bind_input(node), name))
        return None
    if node.target in ELEMENTWISE_METHODS and node.args and node.args[0] is prev:
        cost = 0.0 if node.target == "contiguous" else 1.0
        return _Item("pointwise", node, op=PointwiseOp(_bind_input(node, method=True), str(node.target), cost))
    return None


def _classify_module(node: fx.Node, m: nn.Module) -> _Item | None:
    if node.kwargs or len(node.args) != 1:
        return None
    if type(m) is nn.Conv2d:
        if m.padding_mode != "zeros":
            return None  # reflect/replicate/circular borders are not handled
        return _Item("conv", node, module=m)
    if isinstance(m, nn.BatchNorm2d):
        if m.running_mean is None or m.running_var is None or m.training:
            return None  # batch statistics depend on the whole map
        return _Item("bn", node, module=m)
    if type(m) is nn.MaxPool2d:
        if m.return_indices:
            return None
        op = _pool_op("max", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        return _Item("pool", node, module=m, op=op)
    if type(m) is nn.AvgPool2d:
        op = _pool_op("avg", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, m.count_include_pad,
                      m.divisor_override)  # fmt: skip
        return _Item("pool", node, module=m, op=op)
    if isinstance(m, ELEMENTWISE_MODULES):
        if isinstance(m, IDENTITY_MODULES):
            return _Item("pointwise", node, module=m, op=PointwiseOp(_identity, type(m).__name__, 0.0))
        fn = copy.copy(m)
        if hasattr(fn, "inplace"):
            fn.inplace = False  # tiles may be views of a shared input
        return _Item("pointwise", node, module=m, op=PointwiseOp(fn, type(m).__name__.lower()))
    return None


def _identity(x: Tensor) -> Tensor:
    return x


def _conv_op(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act: PointwiseOp | None) -> ConvOp:
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else None
    norm = BatchNorm.from_module(bn) if bn is not None else None
    rows, cols = _windows_from_module(conv)
    return ConvOp(weight, bias, rows, cols, conv.groups, norm, act)


def _bn_op(bn: nn.BatchNorm2d) -> PointwiseOp:
    return PointwiseOp(BatchNorm.from_module(bn), "batchnorm")


def _ops_from_items(items: list[_Item]) -> list[Op]:
    """Ops for a chain of items: the batch norm and activation after a conv join that conv."""
    ops: list[Op] = []
    i = 0
    while i < len(items):
        item = items[i]
        if item.kind == "conv":
            bn = None
            act = None
            if i + 1 < len(items) and items[i + 1].kind == "bn":
                bn = items[i + 1].module
                i += 1
            if i + 1 < len(items) and items[i + 1].kind == "pointwise":
                act = items[i + 1].op
                i += 1
            ops.append(_conv_op(item.module, bn, act))  # type: ignore[arg-type]
        elif item.kind == "bn":
            ops.append(_bn_op(item.module))  # type: ignore[arg-type]
        else:
            ops.append(item.op)  # type: ignore[arg-type]
        i += 1
    return ops


# ---------------------------------------------------------------------------------------
# walking the graph


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADD_FUNCTIONS or (
        node.op == "call_method" and node.target in ADD_METHODS
    ):
        return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
    return False


@dataclass
class _Step:
    kind: str
    main: list[_Item]
    shortcut: list[_Item] | None = None
    post: list[_Item] | None = None
    join: fx.Node | None = None

    @property
    def nodes(self) -> list[fx.Node]:
        items = self.main + (self.shortcut or []) + (self.post or [])
        nodes = [it.node for it in items]
        if self.join is not None:
            nodes.append(self.join)
        return nodes

    @property
    def last(self) -> fx.Node:
        if self.join is not None:
            return self.post[-1].node if self.post else self.join
        return self.main[-1].node


def _next_step(cur: fx.Node, modules: dict[str, nn.Module]) -> _Step | None:
    if len(cur.users) == 2:
        return _residual_step(cur, modules)
    node = _sole_user(cur)
    if node is None:
        return None
    first = _classify(node, cur, modules)
    if first is None:
        return None
    items = [first]
    if first.kind == "pool":
        return _Step("pool", items)
    if first.kind == "conv":
        for wanted in ("bn", "pointwise"):
            nxt = _sole_user(items[-1].node)
            item = _classify(nxt, items[-1].node, modules) if nxt is not None else None
            if item is not None and item.kind == wanted:
                items.append(item)
        return _Step("conv", items)
    while (nxt := _sole_user(items[-1].node)) is not None:
        item = _classify(nxt, items[-1].node, modules)
        if item is None or item.kind not in ("bn", "pointwise"):
            break
        items.append(item)
    return _Step("pointwise", items)


def _follow(start: fx.Node, fork: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[_Item], fx.Node, fx.Node] | None:
    """Follow one path from a fork to an addition: (items, the addition, the node fed into it)."""
    items: list[_Item] = []
    prev, node = fork, start
    while not _is_add(node):
        item = _classify(node, prev, modules)
        if item is None:
            return None
        items.append(item)
        nxt = _sole_user(node)
        if nxt is None:
            return None
        prev, node = node, nxt
    return items, node, prev


def _residual_step(cur: fx.Node, modules: dict[str, nn.Module]) -> _Step | None:
    a, b = list(cur.users)
    pa, pb = _follow(a, cur, modules), _follow(b, cur, modules)
    if pa is None or pb is None or pa[1] is not pb[1]:
        return None
    join = pa[1]
    if sorted(map(id, join.args)) != sorted([id(pa[2]), id(pb[2])]):
        return None
    main, shortcut = (pa[0], pb[0]) if len(pa[0]) >= len(pb[0]) else (pb[0], pa[0])
    if not main:
        return None
    post: list[_Item] = []
    nxt = _sole_user(join)
    if nxt is not None:
        item = _classify(nxt, join, modules)
        if item is not None and item.kind == "pointwise":
            post.append(item)
    return _Step("residual", main, shortcut, post, join)


def _segment_name(step: _Step) -> str:
    if step.kind != "residual":
        node = step.main[0].node
        return str(node.target) if node.op == "call_module" else node.name
    paths = [str(n.target).split(".") for n in step.nodes if n.op == "call_module"]
    if not paths:
        return step.join.name  # type: ignore[union-attr]
    prefix: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    if len(prefix) == min(len(p) for p in paths):  # all the same module: drop the leaf
        prefix = prefix[:-1]
    return ".".join(prefix) or step.join.name  # type: ignore[union-attr]


def _build_segment(index: int, step: _Step, in_shape: Shape) -> Segment:
    main = Chain.build(_ops_from_items(step.main), in_shape)
    if step.kind != "residual":
        return Segment(index, _segment_name(step), step.kind, main)
    shortcut = Chain.build(_ops_from_items(step.shortcut or []), in_shape)
    if shortcut.out_shape != main.out_shape:
        raise ValueError(f"residual paths disagree: {main.out_shape} vs {shortcut.out_shape}")
    post = Chain.build(_ops_from_items(step.post), main.out_shape) if step.post else None
    return Segment(index, _segment_name(step), "residual", main, shortcut, post)


def _head_module(gm: fx.GraphModule, nodes: list[fx.Node], trunk_out: fx.Node) -> fx.GraphModule:
    """The graph after the trunk, with the trunk output as its single input."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {trunk_out: graph.placeholder("trunk_out")}
    for node in nodes:
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.lint()
    return fx.GraphModule(gm, graph)


def _reference_module(gm: fx.GraphModule, nodes: list[fx.Node], x: fx.Node, boundaries: list[fx.Node]) -> fx.GraphModule:
    """The model's own graph up to the trunk end, returning a copy of every boundary value.

    Each copy is taken as soon as its value exists, because later in-place ops (ReLU(inplace=True))
    may overwrite it; the ops run on a copy of the input, so the caller's tensor is never written.
    """
    graph = fx.Graph()
    placeholder = graph.placeholder("x")
    env: dict[fx.Node, fx.Node] = {x: graph.call_function(torch.clone, (placeholder,))}
    saved: dict[fx.Node, fx.Node] = {x: placeholder}
    wanted = set(boundaries)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node in wanted:
            saved[node] = graph.call_function(torch.clone, (env[node],))
    graph.output(tuple(saved[b] for b in boundaries))
    graph.lint()
    return fx.GraphModule(gm, graph)


def extract_trunk(model: nn.Module, input_shape: tuple[int, int, int] = (3, 224, 224), name: str = "model") -> Trunk:
    """Trace `model` (put in eval mode) into spatial segments and a head.

    TraceError when the model cannot be traced, takes more than one input, has no
    spatially local first layer, or the input is too small for it.
    """
    if len(input_shape) != 3 or any(int(v) < 1 for v in input_shape):
        raise TraceError(f"input shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    shape: Shape = tuple(int(v) for v in input_shape)  # type: ignore[assignment]
    model.eval()
    gm = trace(model, name)
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(f"model {name!r} takes {len(placeholders)} inputs; meshci needs one image tensor")
    x = placeholders[0]
    cur = x
    segments: list[Segment] = []
    consumed: set[fx.Node] = {x}
    boundaries = [x]
    while (step := _next_step(cur, modules)) is not None:
        try:
            seg = _build_segment(len(segments), step, shape)
        except ValueError as exc:
            # the input is too small for this window, or channels do not match: a user error
            raise TraceError(
                f"model {name!r} at {describe_node(step.main[0].node, modules)} with input {shape}: {exc}"
            ) from exc
        segments.append(seg)
        consumed.update(step.nodes)
        cur = step.last
        boundaries.append(cur)
        shape = seg.out_shape
    stop = [u for u in cur.users]
    stop_text = ", ".join(describe_node(u, modules) for u in stop) or "the model output"
    if not segments:
        raise TraceError(
            f"model {name!r} has no spatially local trunk: its input goes to {stop_text}, "
            "which is not a convolution, pooling, elementwise op or residual block"
        )
    trunk_order = [n for n in gm.graph.nodes if n in consumed and n is not x]
    rest = [n for n in gm.graph.nodes if n not in consumed and n.op != "placeholder"]
    for node in rest:
        for used in _node_inputs(node):
            if used in consumed and used is not cur:
                raise TraceError(
                    f"model {name!r}: {describe_node(node, modules)} uses {used.name!r} inside the trunk"
                )
    reference = _reference_module(gm, trunk_order, x, boundaries)
    head = _head_module(gm, rest, cur)
    head_start = describe_node(stop[0], modules) if stop else "the model output"
    log.debug("trunk of %s: %d segments, head starts at %s", name, len(segments), head_start)
    return Trunk(name, tuple(int(v) for v in input_shape), segments, head, reference, head_start)  # type: ignore[arg-type]
