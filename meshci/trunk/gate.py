"""Squeeze-and-excitation inside the trunk: a global pooling that only rescales channels.

An SE unit pools a map `y` over the whole map, runs a few ops on the pooled vector and
multiplies `y` by the result. The pooling needs every pixel, so it cannot run on a tile;
but its result is a C-length vector, and the mean is the sum of the tiles' partial sums.
`carry_squeeze_excitation` rewrites each such unit of a traced graph into one call of a
`SqueezeGate` module on a block boundary:

    y -> pool -> f1 -> ... -> s;  m = s * y          becomes          g = gate(cat(y, carried))

where `carried` are the maps computed before the pooling that are still read after it (a
residual's input), concatenated along channels so the boundary stays one tensor; channel
slices of `g` replace `m` and the carried maps (meshci.trunk.channels). The trunk then holds
a `GateSegment` (kind "gate") right after that boundary: given the boundary's mean (from
the partial sums the previous block's tiles computed over their own disjoint output tiles:
`partial_sum`, `combine`), it computes the gate vector once and rescales any tile, so the
blocks on either side stay tiled and exact. Only a block that starts at the gate can be
split; a block holding a gate inside runs as one whole-map tile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from meshci.trunk.channels import ChannelSlice, shape, shapes_of
from meshci.trunk.classify import MUL_FUNCTIONS, MUL_METHODS, node_inputs
from meshci.trunk.ops import Shape
from meshci.trunk.region import Region
from meshci.trunk.segment import crop

MAX_GATE_NODES = 16  # ops between the pooling and the multiplication


class SqueezeGate(nn.Module):
    """cat(z[:, :C] * body(mean of z[:, :C]), z[:, C:]): an SE unit on its first C channels,
    the carried channels after them untouched."""

    def __init__(self, body: fx.GraphModule, channels: int, source: str = "se") -> None:
        super().__init__()
        self.body = body
        self.channels = int(channels)
        self.source = source  # the SE unit in the model (its pooling's parent module)

    def forward(self, z: Tensor) -> Tensor:
        # outside a tiled run (the reference, a whole-map tile): pool as the model did
        return self.apply_gate(z, self.scale(F.adaptive_avg_pool2d(z[:, :self.channels], 1)))

    def scale(self, pooled: Tensor) -> Tensor:
        """The gate (N, C, 1, 1) from the pooled map (N, C, 1, 1)."""
        return self.body(pooled)

    def apply_gate(self, z: Tensor, scale: Tensor) -> Tensor:
        gated = scale * z[:, :self.channels]
        if z.shape[1] == self.channels:
            return gated
        return torch.cat([gated, z[:, self.channels:]], dim=1)


def partial_sum(tile: Tensor) -> Tensor:
    """The per-channel sum of a tile (1, C, h, w) of a gate boundary, in float64: (C,)."""
    return tile.sum(dim=(-2, -1), dtype=torch.float64).reshape(-1)


def combine(parts: Sequence[Tensor], area: int) -> Tensor:
    """The map's per-channel mean from the partial sums of tiles that partition it."""
    if not parts:
        raise ValueError("no partial sums to combine")
    return torch.stack(list(parts)).sum(dim=0) / float(area)


class GateSegment:
    """The gate of an SE unit as a trunk segment (kind "gate"): a per-pixel rescale of its
    input once the input's per-channel mean is known (the exchange at its boundary)."""

    kind = "gate"

    def __init__(self, index: int, name: str, in_shape: Shape, gate: SqueezeGate) -> None:
        if not 0 < gate.channels <= in_shape[0]:
            raise ValueError(f"gate of {gate.channels} channels on a map of {in_shape[0]}")
        self.index = index
        self.name = name
        self.in_shape: Shape = tuple(in_shape)  # type: ignore[assignment]
        self.gate = gate
        with FlopCounterMode(display=False) as count:
            gate.scale(torch.zeros((1, gate.channels, 1, 1), dtype=_dtype(gate)))
        self.gate_flops = float(count.get_total_flops())

    @property
    def out_shape(self) -> Shape:
        return self.in_shape

    @property
    def ops(self) -> tuple:
        return ()

    @property
    def flops(self) -> float:
        return self.flops_for(Region.full(self.in_shape[1], self.in_shape[2]))

    def input_region(self, out: Region) -> Region:
        return out

    def need(self, out: Region) -> Region:
        return out

    def flops_for(self, out: Region) -> float:
        # the partial sum over the tile, the rescale, and the gate's own ops once
        return 2.0 * self.gate.channels * out.area + self.gate_flops

    def scale(self, mean: Tensor) -> Tensor:
        """The gate vector (1, C, 1, 1) from the boundary's per-channel mean (all channels)."""
        if mean.dim() != 1 or mean.numel() != self.in_shape[0]:
            raise ValueError(f"gate {self.name}: a mean of {self.in_shape[0]} channels is needed, "
                             f"got shape {tuple(mean.shape)}")
        pooled = mean[:self.gate.channels].to(_dtype(self.gate)).reshape(1, -1, 1, 1)
        return self.gate.scale(pooled)

    @torch.no_grad()
    def run(self, x: Tensor, have: Region, out: Region, mean: Tensor | None = None) -> Tensor:
        """Exactly `out` of the gated map; `mean`: the boundary's per-channel mean (None only
        when `x` covers the whole map, which then gives it)."""
        if mean is None:
            full = Region.full(self.in_shape[1], self.in_shape[2])
            if have != full:
                raise ValueError(f"gate {self.name} needs the map's mean to gate a tile {out}")
            mean = combine([partial_sum(x)], full.area)
        return self.gate.apply_gate(crop(x, have, out), self.scale(mean))

    def describe(self) -> str:
        carried = self.in_shape[0] - self.gate.channels
        more = f" (+{carried} carried)" if carried else ""
        return f"se-gate({self.gate.channels}){more}"


def _dtype(module: nn.Module) -> torch.dtype:
    params = list(module.parameters())
    return params[0].dtype if params else torch.float32


# ---- the graph rewrite ---------------------------------------------------------------------

def _global_mean(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The map a global average pooling to (N, C, 1, 1) reads, or None."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1), [1, 1]) and len(node.args) == 1:
            return node.args[0] if isinstance(node.args[0], fx.Node) else None
        return None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return node.args[0] if size in (1, (1, 1), [1, 1]) and isinstance(node.args[0], fx.Node) else None
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if keep is True and isinstance(dims, (list, tuple)) and sorted(d % 4 for d in dims) == [2, 3]:
            return node.args[0] if isinstance(node.args[0], fx.Node) else None
    return None


def _is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in MUL_METHODS)


def _se_units(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> list[tuple[fx.Node, fx.Node, list[fx.Node], fx.Node]]:
    """(y, pool, ops on the pooled vector, the multiplication) of every SE unit."""
    found = []
    for pool in gm.graph.nodes:
        y = _global_mean(pool, modules)
        if y is None or len(y.users) != 2:
            continue
        chain: list[fx.Node] = []
        node = pool
        while len(node.users) == 1 and len(chain) <= MAX_GATE_NODES:
            nxt = next(iter(node.users))
            if _is_mul(nxt):
                args = [a for a in nxt.args]
                if len(args) == 2 and not nxt.kwargs and set(map(id, args)) == {id(node), id(y)} and node is not pool:
                    found.append((y, pool, chain, nxt))
                break
            inputs = [i for i in node_inputs(nxt) if i.op != "get_attr"]
            if inputs != [node] or nxt.op not in ("call_module", "call_function", "call_method"):
                break
            chain.append(nxt)
            node = nxt
    return found


def _body(gm: fx.GraphModule, pool: fx.Node, chain: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {pool: graph.placeholder("pooled")}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            env[n] = graph.node_copy(n)  # a get_attr: a parameter of the unit
        return env[n]

    for node in chain:
        env[node] = graph.node_copy(node, arg)
    graph.output(env[chain[-1]])
    graph.lint()
    return fx.GraphModule(gm, graph)


def carry_squeeze_excitation(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> int:
    """Rewrite every SE unit of `gm` into a `SqueezeGate` call on a boundary (module
    docstring); returns how many. A unit whose carried maps do not fit one tensor (another
    size, another batch) is left alone, and the trunk ends there as before."""
    modules = dict(gm.named_modules())
    units = _se_units(gm, modules)
    if not units or not shapes_of(gm, input_shape):
        return 0
    done = 0
    for y, pool, chain, mul in units:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        y_shape = shape(y)
        if y_shape is None or len(y_shape) != 4:
            continue
        unit = {pool, *chain, mul}
        cut = order[pool]
        live = [n for n in gm.graph.nodes if order.get(n, cut) < cut and n is not y and n.op != "get_attr"
                and any(u not in unit and order.get(u, cut) >= cut for u in n.users)]
        shapes = [shape(n) for n in live]
        if any(s is None or len(s) != 4 or s[0] != y_shape[0] or s[2:] != y_shape[2:] for s in shapes):
            continue
        name = f"_meshci_gate{done}"
        source = str(pool.target).rpartition(".")[0] if pool.op == "call_module" else pool.name
        gm.add_submodule(name, SqueezeGate(_body(gm, pool, chain), y_shape[1], source or pool.name))
        graph = gm.graph
        with graph.inserting_before(pool):
            z = graph.call_function(torch.cat, ([y, *live], 1)) if live else y
            gated = graph.call_module(name, (z,))
            if live:
                y_new = graph.call_module(_slice(gm, f"{name}_y", 0, y_shape[1]), (gated,))
                start = y_shape[1]
                for n, s in zip(live, shapes):
                    part = graph.call_module(_slice(gm, f"{name}_c{order[n]}", start, start + s[1]), (gated,))  # type: ignore[index]
                    start += s[1]  # type: ignore[index]
                    after = {u for u in n.users if u not in unit and u is not z and order.get(u, cut) >= cut}
                    n.replace_all_uses_with(part, delete_user_cb=lambda u, after=after: u in after)
            else:
                y_new = gated
        mul.replace_all_uses_with(y_new)
        for node in [mul, *reversed(chain), pool]:
            graph.erase_node(node)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _slice(gm: fx.GraphModule, name: str, start: int, stop: int) -> str:
    gm.add_submodule(name, ChannelSlice(start, stop))
    return name

