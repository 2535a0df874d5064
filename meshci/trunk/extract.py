"""Split a model into spatially local segments and a non-spatial head with torch.fx.

The model is traced with standard `torch.nn` modules as leaves. Walking the graph from
the input, each step consumes one segment:

* a convolution, with the eval-mode batch norm after it and the elementwise activation
  after that (`conv`);
* a max/avg pooling (`pool`);
* a run of elementwise ops: batch norm, activations, scalar arithmetic, channel splits and
  shuffles (`pointwise`; meshci.trunk.channels);
* the gate of a squeeze-and-excitation unit (`gate`; meshci.trunk.gate): its global pooling
  becomes an exchange of per-channel partial sums at the boundary before it;
* a fork whose two paths are chains of the above and re-join at an addition, with the
  activation right after the addition (`residual`; one path may be the identity);
* any other fork whose branches are local ops and re-join by channel concatenation,
  addition or multiplication (`branch`: inception and fire modules, dense layers; see
  meshci.trunk.dag). A dense block's repeated concatenations are first rewritten to read
  the previous one (same values), so each dense layer is a block of its own.

The first node that is none of these (global pooling, flatten, linear, attention, a
reshape, anything unknown) ends the trunk; `Trunk.stop_reason` says which and why. The
rest of the graph becomes the head, a GraphModule whose single input is the trunk output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from meshci.errors import TraceError
from meshci.trunk.classify import ADD_FUNCTIONS, ADD_METHODS, Item, classify, node_inputs, ops_from_items, writes_into_shared
from meshci.trunk.block import BranchSegment
from meshci.trunk.channels_last import fuse_channels_last
from meshci.trunk.channels import fuse_channel_ops
from meshci.trunk.gate import GateSegment, carry_squeeze_excitation
from meshci.trunk.dag import DagStep, build_branch_segment, dag_step, drop_single_concats, share_concat_prefixes, walk_fork
from meshci.trunk.ops import Shape
from meshci.trunk.region import Region
from meshci.trunk.segment import Chain, Segment
from meshci.trunk.stop import why_not_local
from meshci.trunk.trunk import Trunk

log = logging.getLogger(__name__)


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
    main: list[Item]
    shortcut: list[Item] | None = None
    post: list[Item] | None = None
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


def _next_step(cur: fx.Node, modules: dict[str, nn.Module]) -> _Step | DagStep | None:
    if len(cur.users) >= 2:
        step = _residual_step(cur, modules) if len(cur.users) == 2 else None
        return step if step is not None else dag_step(cur, modules)
    node = _sole_user(cur)
    if node is None:
        return None
    first = classify(node, cur, modules)
    if first is None:
        return None
    items = [first]
    if first.kind == "pool":
        return _Step("pool", items)
    if first.kind == "gate":
        return _Step("gate", items)
    if first.kind == "conv":
        for wanted in ("bn", "pointwise"):
            nxt = _sole_user(items[-1].node)
            item = classify(nxt, items[-1].node, modules) if nxt is not None else None
            if item is not None and item.kind == wanted:
                items.append(item)
        return _Step("conv", items)
    while (nxt := _sole_user(items[-1].node)) is not None:
        item = classify(nxt, items[-1].node, modules)
        if item is None or item.kind not in ("bn", "pointwise", "channel"):
            break
        items.append(item)
    if all(it.kind in ("pointwise", "channel") and it.op.flops(Region(0, 1, 0, 1), (1, 1, 1)) == 0  # type: ignore[union-attr]
           for it in items):
        # identities only (eval-mode dropout): no segment of their own, which would cost nothing
        # and give the planner a block without work; they join a convolution or pooling after them
        after = _next_step(items[-1].node, modules)
        if isinstance(after, _Step) and after.kind in ("conv", "pool"):
            return _Step(after.kind, items + after.main)
    return _Step("pointwise", items)


def _follow(start: fx.Node, fork: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[Item], fx.Node, fx.Node] | None:
    """Follow one path from a fork to an addition: (items, the addition, the node fed into it)."""
    items: list[Item] = []
    prev, node = fork, start
    while not _is_add(node):
        item = classify(node, prev, modules)
        if item is None or item.kind == "gate" or writes_into_shared(node, modules):
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
    post: list[Item] = []
    nxt = _sole_user(join)
    if nxt is not None:
        item = classify(nxt, join, modules)
        if item is not None and item.kind == "pointwise":
            post.append(item)
    return _Step("residual", main, shortcut, post, join)


def _segment_name(step: _Step | DagStep) -> str:
    if isinstance(step, _Step) and step.kind != "residual":
        node = next((it.node for it in step.main if it.kind in ("conv", "pool")), step.main[0].node)
        return str(node.target) if node.op == "call_module" else node.name
    paths = [str(n.target).split(".") for n in step.nodes if n.op == "call_module"
             and not str(n.target).startswith("_meshci")]  # modules the rewrites added
    if not paths:
        return step.last.name
    prefix: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    if len(prefix) == min(len(p) for p in paths):  # all the same module: drop the leaf
        prefix = prefix[:-1]
    return ".".join(prefix) or step.last.name


def _build_segment(index: int, step: _Step | DagStep, in_shape: Shape) -> Segment | BranchSegment | GateSegment:
    if isinstance(step, DagStep):
        return build_branch_segment(index, _segment_name(step), step, in_shape)
    if step.kind == "gate":
        gate = step.main[0].module
        return GateSegment(index, gate.source, in_shape, gate)  # type: ignore[union-attr,arg-type]
    main = Chain.build(ops_from_items(step.main), in_shape)
    if step.kind != "residual":
        return Segment(index, _segment_name(step), step.kind, main)
    shortcut = Chain.build(ops_from_items(step.shortcut or []), in_shape)
    if shortcut.out_shape != main.out_shape:
        raise ValueError(f"residual paths disagree: {main.out_shape} vs {shortcut.out_shape}")
    post = Chain.build(ops_from_items(step.post), main.out_shape) if step.post else None
    return Segment(index, _segment_name(step), "residual", main, shortcut, post)


def _stop_reason(cur: fx.Node, modules: dict[str, nn.Module]) -> str:
    """One line: the node after the trunk's last value that is not spatially local, and why."""
    users = list(cur.users)
    if not users or [u.op for u in users] == ["output"]:
        return "the trunk reaches the model output"
    if len(users) == 1:
        return f"{describe_node(users[0], modules)}: {why_not_local(users[0], modules)}"
    found = walk_fork(cur, modules)
    if isinstance(found, DagStep):  # cannot happen: the walk would have taken this block
        return f"the block forking at {cur.name!r} does not fit the input"
    where = describe_node(found.node, modules) if found.node is not None else "the model output"
    return f"the branches forking at {cur.name!r} do not re-join: {where}: {found.reason}"


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
        env[node] = graph.node_copy(node, lambda n: env[n] if n in env else env.setdefault(n, graph.node_copy(n)))
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
    fuse_channels_last(gm)
    fuse_channel_ops(gm, shape)
    carry_squeeze_excitation(gm, shape)
    modules = dict(gm.named_modules())
    share_concat_prefixes(gm.graph)
    drop_single_concats(gm.graph, modules)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(f"model {name!r} takes {len(placeholders)} inputs; meshci needs one image tensor")
    x = placeholders[0]
    cur = x
    segments: list[Segment | BranchSegment | GateSegment] = []
    consumed: set[fx.Node] = {x}
    boundaries = [x]
    while (step := _next_step(cur, modules)) is not None:
        if step.kind == "gate" and not segments:
            break  # a gate pools the previous block's tiles: the image itself has none
        try:
            seg = _build_segment(len(segments), step, shape)
        except ValueError as exc:
            # the input is too small for this window, or channels do not match: a user error
            raise TraceError(
                f"model {name!r} at {describe_node(step.nodes[0], modules)} with input {shape}: {exc}"
            ) from exc
        segments.append(seg)
        consumed.update(step.nodes)
        cur = step.last
        boundaries.append(cur)
        shape = seg.out_shape
    stop = [u for u in cur.users]
    stop_reason = _stop_reason(cur, modules)
    if not segments:
        raise TraceError(f"model {name!r} has no spatially local trunk: {stop_reason}")
    trunk_order = [n for n in gm.graph.nodes if n in consumed and n is not x]
    rest = [n for n in gm.graph.nodes if n not in consumed and n.op != "placeholder"
            and not (n.op == "get_attr" and all(u in consumed for u in n.users))]  # parameters only the trunk reads
    for node in rest:
        for used in node_inputs(node):
            if used in consumed and used is not cur:
                raise TraceError(
                    f"model {name!r}: {describe_node(node, modules)} uses {used.name!r} inside the trunk"
                )
    reference = _reference_module(gm, trunk_order, x, boundaries)
    head = _head_module(gm, rest, cur)
    head_start = describe_node(stop[0], modules) if stop else "the model output"
    log.debug("trunk of %s: %d segments, head starts at %s", name, len(segments), head_start)
    return Trunk(name, tuple(int(v) for v in input_shape), segments, head, reference, head_start,  # type: ignore[arg-type]
                 stop_reason)
