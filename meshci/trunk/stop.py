"""Why a node is not spatially local: the one-line reason a trunk ends where it ends."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from meshci.trunk.classify import concatenated, node_inputs

GLOBAL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
GLOBAL_NAMES = frozenset({"adaptive_avg_pool2d", "adaptive_max_pool2d", "mean", "sum", "amax", "amin", "max",
                          "min", "std", "var", "norm", "logsumexp", "softmax", "log_softmax"})  # fmt: skip
LAYOUT_NAMES = frozenset({"flatten", "view", "reshape", "permute", "transpose", "squeeze", "unsqueeze", "chunk",
                          "split", "narrow", "roll", "getitem", "size", "contiguous", "movedim", "swapaxes"})  # fmt: skip


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def why_not_local(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A short reason why `node`, read by the trunk's last value, cannot continue the trunk."""
    if node.op == "output":
        return "the model output"
    if node.op == "call_module":
        m = modules[str(node.target)]
        kind = type(m).__name__
        if isinstance(m, GLOBAL_MODULES):
            return f"{kind} pools over the whole map (the classifier's pooling)"
        if isinstance(m, (nn.Linear, nn.Flatten)):
            return f"{kind} works on the flattened map, not per pixel"
        if isinstance(m, nn.BatchNorm2d) and (m.training or m.running_mean is None):
            return f"{kind} without running statistics normalises over the whole map"
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            return f"{kind} with padding_mode={m.padding_mode!r} (only zero padding is tiled)"
        if kind == "SqueezeGate":
            return "a squeeze-and-excitation gate on the input image (it needs a block before it)"
        if len(node_inputs(node)) > 1:
            return f"{kind} reads several tensors"
        return f"{kind} is not a known spatially local module"
    name = _name(node)
    parts = concatenated(node)
    if node.op == "call_function" and getattr(node.target, "__name__", "") in ("cat", "concat", "concatenate") \
            and parts is None:
        return "cat along rows or columns (only a concatenation of channels is local)"
    if name in GLOBAL_NAMES:
        return f"{name} reduces over the whole map (a global pooling or normalisation)"
    if name in LAYOUT_NAMES:
        return f"{name} changes the layout of the map (flatten, reshape, permute, split)"
    return f"{name} is not a known spatially local operation"
