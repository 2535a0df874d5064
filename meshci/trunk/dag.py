"""Walking a fork of the fx graph until its branches re-join: the nodes of one branch segment.

From a boundary value with several users, the graph is followed in its own (topological)
order. Every node that reads a value of the block must be a spatially local op of one
value, or a join of values (channel concatenation, elementwise add or mul); the block closes
at the first node after which it is the only value of the block still to be read. A node that
reads anything from outside the block, a node that is not local, or an in-place op on a
value that another branch still reads ends the walk without a block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from meshci.trunk.block import BranchSegment, Step, join_shape
from meshci.trunk.classify import (
    Item,
    classify,
    concatenated,
    join,
    mutates_input,
    node_inputs,
    ops_from_items,
    writes_into_shared,
)
from meshci.trunk.ops import Shape
from meshci.trunk.segment import Chain
from meshci.trunk.stop import why_not_local

MAX_BLOCK_NODES = 1000  # a fork that has not re-joined after this many nodes is not a block


@dataclass
class _Run:
    """One step in the making: a chain of items reading one node, or a join of nodes."""

    kind: str  # "chain" | "cat" | "add" | "mul"
    inputs: list[fx.Node]
    items: list[Item] = field(default_factory=list)
    join: fx.Node | None = None

    @property
    def last(self) -> fx.Node:
        return self.join if self.join is not None else self.items[-1].node  # type: ignore[return-value]


@dataclass
class DagStep:
    """The nodes of one branch segment, from the boundary value `start` to `end`."""

    start: fx.Node
    end: fx.Node
    runs: list[_Run]
    kind: str = "branch"

    @property
    def nodes(self) -> list[fx.Node]:
        found: list[fx.Node] = []
        for run in self.runs:
            found.extend(item.node for item in run.items)
            if run.join is not None:
                found.append(run.join)
        return found

    @property
    def last(self) -> fx.Node:
        return self.end


@dataclass(frozen=True)
class Unjoined:
    """Why the branches forking at a value do not make a block: the node that stops them."""

    node: fx.Node | None  # None: the model output
    reason: str


def dag_step(start: fx.Node, modules: dict[str, nn.Module]) -> DagStep | None:
    """The branch block that forks at `start`, or None when its branches do not re-join locally."""
    found = walk_fork(start, modules)
    return found if isinstance(found, DagStep) else None


def walk_fork(start: fx.Node, modules: dict[str, nn.Module]) -> DagStep | Unjoined:
    """The branch block that forks at `start`, or where and why its branches do not re-join."""
    inside: set[fx.Node] = {start}
    unread: dict[fx.Node, int] = {start: len(start.users)}
    open_values: set[fx.Node] = {start}
    runs: list[_Run] = []
    run_ending: dict[fx.Node, _Run] = {}  # chain runs by their last node
    joined = False
    node = start.next
    for _ in range(MAX_BLOCK_NODES):
        if node.op in ("output", "root"):
            return Unjoined(None, "the branches reach the model output without re-joining")
        inputs = [i for i in dict.fromkeys(node_inputs(node)) if i.op != "get_attr"]  # parameters are constants
        if not any(i in inside for i in inputs):
            node = node.next
            continue  # not part of this block (it must not be read by it: checked below)
        outside = [i for i in inputs if i not in inside]
        if outside:  # a constant, an earlier map
            return Unjoined(node, f"reads {outside[0].name!r} from outside the branches")
        if writes_into_shared(node, modules):
            return Unjoined(node, f"writes in place into {inputs[0].name!r}, which another branch reads")
        joining = join(node)
        if joining is not None and (len(joining[1]) > 1 or concatenated(node) is None):
            runs.append(_Run(joining[0], joining[1], join=node))
            joined = True
        else:
            item = classify(node, inputs[0], modules) if len(inputs) == 1 else None
            if item is None:
                return Unjoined(node, why_not_local(node, modules))
            if item.kind == "gate":
                return Unjoined(node, "a squeeze-and-excitation gate inside branches (it must start a block)")
            previous = run_ending.pop(inputs[0], None)
            if previous is not None and len(inputs[0].users) == 1:
                previous.items.append(item)
            else:
                if previous is not None:
                    run_ending[inputs[0]] = previous
                previous = _Run("chain", [inputs[0]], [item])
                runs.append(previous)
            run_ending[node] = previous
        inside.add(node)
        for i in inputs:
            unread[i] -= 1
            if unread[i] == 0:
                open_values.discard(i)
        unread[node] = len(node.users)
        if node.users:
            open_values.add(node)
        if joined and open_values == {node}:
            return DagStep(start, *_with_channel_tail(node, runs, modules))
        node = node.next
    return Unjoined(node, f"the branches do not re-join within {MAX_BLOCK_NODES} nodes")


def _with_channel_tail(end: fx.Node, runs: list[_Run], modules: dict[str, nn.Module]) -> tuple[fx.Node, list[_Run]]:
    """The block's end and runs, with the channel shuffles right after its join taken in (a
    ShuffleNet unit ends with one: a segment of its own would be a block without work)."""
    tail: list[Item] = []
    node = end
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        item = classify(nxt, node, modules)
        if item is None or item.kind != "channel":
            break
        tail.append(item)
        node = nxt
    if tail:
        runs = [*runs, _Run("chain", [end], tail)]
    return node, runs


def build_branch_segment(index: int, name: str, step: DagStep, in_shape: Shape) -> BranchSegment:
    """The branch segment of a walked block; ValueError when shapes do not fit (a too-small input)."""
    value_of: dict[fx.Node, int] = {step.start: 0}
    shapes: list[Shape] = [tuple(in_shape)]  # type: ignore[list-item]
    steps: list[Step] = []
    for run in step.runs:
        inputs = tuple(value_of[n] for n in run.inputs)
        if run.kind == "chain":
            chain = Chain.build(ops_from_items(run.items), shapes[inputs[0]])
            steps.append(Step("chain", inputs, chain.out_shape, chain))
        else:
            steps.append(Step(run.kind, inputs, join_shape(run.kind, [shapes[j] for j in inputs])))
        shapes.append(steps[-1].out_shape)
        value_of[run.last] = len(steps)
    return BranchSegment(index, name, tuple(in_shape), tuple(steps))  # type: ignore[arg-type]


def share_concat_prefixes(graph: fx.Graph) -> int:
    """Rewrite cat([a, b, c]) as cat([cat([a, b]), c]) when the graph already holds cat([a, b]).

    A dense block concatenates every earlier map again for each layer; reading the previous
    concatenation instead makes each layer a block of its own (it forks from the previous
    concatenation and re-joins at the next) with the same values, copied in the same order.
    Returns how many concatenations were rewritten.
    """
    seen: dict[tuple[fx.Node, ...], fx.Node] = {}
    rewritten = 0
    for node in graph.nodes:
        parts = concatenated(node)
        if parts is None:
            continue
        key = tuple(parts)
        for k in range(len(key) - 1, 0, -1):
            prefix = seen.get(key[:k])
            if prefix is not None:
                node.args = ([prefix, *key[k:]], 1)
                node.kwargs = {}
                rewritten += 1
                break
        seen.setdefault(key, node)
    return rewritten


def drop_single_concats(graph: fx.Graph, modules: dict[str, nn.Module]) -> int:
    """Read x itself where the graph copies it by cat([x]) and nothing writes into the copy.

    A dense block's first layer concatenates its one input; without the copy that layer
    forks straight from the block input. Returns how many copies were dropped.
    """
    dropped = 0
    for node in list(graph.nodes):
        parts = concatenated(node)
        if parts is None or len(parts) != 1 or any(mutates_input(u, modules) for u in node.users):
            continue
        node.replace_all_uses_with(parts[0])
        graph.erase_node(node)
        dropped += 1
    return dropped
