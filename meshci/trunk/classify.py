"""What one fx graph node is, seen as a spatially local operation.

`classify` answers for a node reading one tensor: a convolution, an eval-mode batch norm, a
max/average pooling, or an elementwise op (activations, identities such as eval-mode
dropout, scalar arithmetic, a concatenation of one tensor), else None. `ops_from_items`
turns a chain of such items into ops, joining each convolution with the batch norm and the
activation that follow it.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from meshci.trunk.channels import CHANNEL_MODULES, ChannelOp
from meshci.trunk.ops import INPUT, BatchNorm, ConvOp, ElementwiseCall, Op, PerPixel, PointwiseOp, PoolOp, Window

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
MUL_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({operator.mul, operator.imul, torch.mul})
MUL_METHODS = frozenset({"mul", "mul_"})
CAT_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({torch.cat, torch.concat, torch.concatenate})
IN_PLACE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({operator.iadd, operator.imul, operator.isub, operator.itruediv})




@dataclass(frozen=True)
class Item:
    """What one graph node is, seen as a spatially local op."""

    kind: str  # "conv" | "bn" | "pool" | "pointwise" | "channel" (a split or shuffle) | "gate" (an SE gate)
    node: fx.Node
    module: nn.Module | None = None
    op: Op | None = None


def node_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _bind_input(node: fx.Node, method: bool = False, constants: dict[fx.Node, Any] | None = None) -> ElementwiseCall:
    """The node's call with its one tensor input left open (in-place variants made out-of-place)
    and its `constants` (parameters, buffers) bound."""
    kwargs = dict(node.kwargs)
    if "inplace" in kwargs:
        kwargs["inplace"] = False  # tiles may be views of a shared input
    known = constants or {}
    args, kwargs = fx.node.map_arg((node.args, kwargs), lambda n: known.get(n, INPUT))  # type: ignore[misc]
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


def classify(node: fx.Node, prev: fx.Node, modules: dict[str, nn.Module]) -> Item | None:
    """The node as a local op reading only `prev`, or None when it is not one."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    found = node_inputs(node)
    inputs = [n for n in found if n.op != "get_attr"]
    if len(inputs) != 1 or inputs[0] is not prev:
        return None
    constants = {n: attr_value(modules, n) for n in found if n.op == "get_attr"}
    if constants:  # a parameter or buffer: only as a per-channel operand of elementwise arithmetic
        per_channel = all(isinstance(v, Tensor) and _per_channel(v) for v in constants.values())
        if not per_channel or node.op == "call_module" or (
            node.target not in ELEMENTWISE_FUNCTIONS and node.target not in ELEMENTWISE_METHODS
        ):
            return None
        if node.op == "call_method" and node.args[0] is not prev:
            return None
        op = PointwiseOp(_bind_input(node, node.op == "call_method", constants), f"{_name(node)}(constant)")
        return Item("pointwise", node, op=op)
    if node.op == "call_module":
        return _classify_module(node, modules[str(node.target)])
    if node.op == "call_function":
        if node.target is F.max_pool2d:
            a = _max_pool_args(*node.args, **node.kwargs)
            if a.pop("return_indices"):
                return None
            return Item("pool", node, op=_pool_op("max", **a))
        if node.target is F.avg_pool2d:
            a = _avg_pool_args(*node.args, **node.kwargs)
            return Item("pool", node, op=_pool_op("avg", dilation=1, **a))
        parts = concatenated(node)
        if parts is not None:
            if len(parts) != 1:
                return None
            return Item("pointwise", node, op=PointwiseOp(_identity, "cat", 0.0))  # a copy of one tensor
        if node.target in ELEMENTWISE_FUNCTIONS:
            name = getattr(node.target, "__name__", str(node.target))
            return Item("pointwise", node, op=PointwiseOp(_bind_input(node), name))
        return None
    if node.target in ELEMENTWISE_METHODS and node.args and node.args[0] is prev:
        cost = 0.0 if node.target == "contiguous" else 1.0
        return Item("pointwise", node, op=PointwiseOp(_bind_input(node, method=True), str(node.target), cost))
    return None


def _classify_module(node: fx.Node, m: nn.Module) -> Item | None:
    if node.kwargs or len(node.args) != 1:
        return None
    if type(m) is nn.Conv2d:
        if m.padding_mode != "zeros":
            return None  # reflect/replicate/circular borders are not handled
        return Item("conv", node, module=m)
    if isinstance(m, nn.BatchNorm2d):
        if m.running_mean is None or m.running_var is None or m.training:
            return None  # batch statistics depend on the whole map
        return Item("bn", node, module=m)
    if type(m) is nn.MaxPool2d:
        if m.return_indices:
            return None
        op = _pool_op("max", m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        return Item("pool", node, module=m, op=op)
    if type(m) is nn.AvgPool2d:
        op = _pool_op("avg", m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, m.count_include_pad,
                      m.divisor_override)  # fmt: skip
        return Item("pool", node, module=m, op=op)
    if isinstance(m, CHANNEL_MODULES):
        return Item("channel", node, module=m, op=ChannelOp(m))  # type: ignore[arg-type]
    from meshci.trunk.gate import SqueezeGate  # it imports this module

    if isinstance(m, SqueezeGate):
        return Item("gate", node, module=m)
    if isinstance(m, PerPixel):
        return Item("pointwise", node, module=m, op=PointwiseOp(m, m.text, m.flops_per_channel))
    if isinstance(m, ELEMENTWISE_MODULES):
        if isinstance(m, IDENTITY_MODULES):
            return Item("pointwise", node, module=m, op=PointwiseOp(_identity, type(m).__name__, 0.0))
        fn = copy.copy(m)
        if hasattr(fn, "inplace"):
            fn.inplace = False  # tiles may be views of a shared input
        return Item("pointwise", node, module=m, op=PointwiseOp(fn, type(m).__name__.lower()))
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


def ops_from_items(items: list[Item]) -> list[Op]:
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




def concatenated(node: fx.Node) -> list[fx.Node] | None:
    """The tensors a concatenation along channels joins, or None when the node is not one."""
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return None
    args, kwargs = list(node.args), dict(node.kwargs)
    tensors = args[0] if args else kwargs.pop("tensors", None)
    dim = args[1] if len(args) > 1 else kwargs.pop("dim", kwargs.pop("axis", 0))
    if len(args) > 2 or kwargs:
        return None  # out= and the like
    if not isinstance(tensors, (list, tuple)) or not tensors or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    if dim not in (1, -3):  # maps are (N, C, H, W): only a channel concatenation is spatially local
        return None
    return list(tensors)


def join(node: fx.Node) -> tuple[str, list[fx.Node]] | None:
    """(kind, inputs) when the node joins tensors: "cat" along channels, elementwise "add" or "mul"."""
    parts = concatenated(node)
    if parts is not None:
        return "cat", parts
    for kind, functions, methods in (("add", ADD_FUNCTIONS, ADD_METHODS), ("mul", MUL_FUNCTIONS, MUL_METHODS)):
        if (node.op == "call_function" and node.target in functions) or (
            node.op == "call_method" and node.target in methods
        ):
            if len(node.args) == 2 and not node.kwargs and all(
                isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args
            ):
                return kind, list(node.args)  # type: ignore[arg-type]
            return None
    return None


def mutates_input(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the node writes into its input (inplace=True, x.relu_(), x += y)."""
    if node.op == "call_module":
        return bool(getattr(modules[str(node.target)], "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return node.kwargs.get("inplace") is True or node.target in IN_PLACE_FUNCTIONS
    return False


def attr_value(modules: dict[str, nn.Module], node: fx.Node) -> Any:
    """The parameter, buffer or constant a get_attr node reads (detached), from the traced root."""
    value: Any = modules[""]
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value.detach() if isinstance(value, Tensor) else value


def _per_channel(value: Tensor) -> bool:
    """Whether a constant broadcast against (N, C, H, W) is the same at every pixel: shape (), (1,),
    (C, 1, 1) or (1, C, 1, 1)."""
    if value.dim() <= 1:
        return value.numel() == 1
    return value.dim() in (3, 4) and value.shape[-1] == 1 and value.shape[-2] == 1 and (value.dim() == 3 or value.shape[0] == 1)


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def writes_into_shared(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the node writes in place into a value (or an alias of one: an identity module,
    `.contiguous()`) that something else also reads, so that running it out of place would
    change what the model computes."""
    if not mutates_input(node, modules):
        return False
    value = next((n for n in node_inputs(node) if n.op != "get_attr"), None)
    while value is not None:
        if len(value.users) > 1:
            return True
        aliased = (value.op == "call_module" and isinstance(modules[str(value.target)], IDENTITY_MODULES)) or (
            value.op == "call_method" and value.target == "contiguous"
        )
        value = next((n for n in node_inputs(value) if n.op != "get_attr"), None) if aliased else None
    return False
