"""Memory discipline: a device never takes more tiles than fit its memory budget.

A node's budget (`meshci node --memory-mb N`; by default the memory the machine has
available when the node starts, within its cgroup's limit) is what it gives to the
tiles of the requests it holds at once. A plan costs a device (`plan_bytes`):

* the weights of every segment it runs (each tensor once), and
* the activations of its tiles: for each block, every map its tiles hold from the block's
  input (tile plus halo) to its output, all its tiles of that block at once; the largest
  block counts (a block's maps are freed before the next block's are made, in the worst
  case the pieces of two blocks overlap only by what the next block was sent, which is
  already counted as that block's input).

The node advertises its budget (`Advert.memory_mb`); a requester leaves a peer out of a
plan whose share would not fit it (`MemoryFit`), and the worker refuses a PLAN that does
not fit what its other requests leave (`MemoryBudgetError`, a clear reason). The bidder
bids only on auction items that fit (`item_bytes`). Pure: no IO, no clock.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meshci.errors import RuntimeFailure
from meshci.planning.plan import Plan
from meshci.tiling import block_regions
from meshci.trunk import Region

ACTIVATION_BYTES = 4  # float32 maps
MAX_DEPTH = 12  # how deep the weight walk looks into a segment's objects
_WEIGHTS: OrderedDict[int, tuple[Any, list[int]]] = OrderedDict()  # id(trunk) -> (trunk, bytes per segment)


class MemoryBudgetError(RuntimeFailure):
    """A plan's tiles do not fit this device's memory budget; the message says by how much."""


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MB"


def _tensors(obj: Any, seen: dict[int, torch.Tensor], depth: int = 0) -> None:
    """Every tensor an op, chain or segment holds (each once)."""
    if depth > MAX_DEPTH:
        return
    if isinstance(obj, torch.Tensor):
        seen.setdefault(id(obj), obj)
    elif isinstance(obj, nn.Module):
        for t in (*obj.parameters(), *obj.buffers()):
            seen.setdefault(id(t), t)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in obj:
            _tensors(value, seen, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, seen, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _tensors(getattr(obj, f.name, None), seen, depth + 1)


def segment_weights(trunk: Any) -> list[int]:
    """Bytes of the tensors each segment holds (shapes only: ``meta`` tensors count too)."""
    key = id(trunk)
    known = _WEIGHTS.get(key)
    if known is not None and known[0] is trunk:
        _WEIGHTS.move_to_end(key)
        return known[1]
    sizes = []
    for segment in trunk.segments:
        seen: dict[int, torch.Tensor] = {}
        _tensors(segment, seen)
        sizes.append(sum(t.numel() * t.element_size() for t in seen.values()))
    _WEIGHTS[key] = (trunk, sizes)
    while len(_WEIGHTS) > 8:
        _WEIGHTS.popitem(last=False)
    return sizes


def _tile_maps(trunk: Any, start: int, end: int, out: Region) -> list[int]:
    """Bytes of each map of one tile of block [start, end), from its input (with halo) to
    its output."""
    regions = block_regions(trunk, start, end, out)
    return [trunk.boundary_shape(k)[0] * region.area * ACTIVATION_BYTES
            for k, region in zip(range(start, end + 1), regions)]


def tile_bytes(trunk: Any, start: int, end: int, out: Region) -> int:
    """Activations of one tile of block [start, end) as a budget counts them: every map from
    its input (with halo) to its output."""
    return sum(_tile_maps(trunk, start, end, out))


def tile_peak_bytes(trunk: Any, start: int, end: int, out: Region) -> int:
    """About the memory a tile needs at its peak: the largest input plus output of one of its
    segments (what an out-of-memory message names)."""
    maps = _tile_maps(trunk, start, end, out)
    return max(a + b for a, b in zip(maps, maps[1:]))


def plan_bytes(trunk: Any, plan: Plan, device: str) -> int:
    """What `plan` costs `device`: the weights of its segments and its largest block's tiles."""
    weights = segment_weights(trunk)
    segments: set[int] = set()
    peak = 0
    for block in plan.blocks:
        mine = [t.region for t in block.tiles if t.device == device]
        if not mine:
            continue
        segments.update(range(block.start, block.end))
        peak = max(peak, sum(tile_bytes(trunk, block.start, block.end, r) for r in mine))
    return peak + sum(weights[k] for k in segments)


def item_bytes(item: Any) -> int:
    """An auction item's activations as its bidder sees them: its input (with halo) and output."""
    return int(item.recv_bytes) + int(item.send_bytes)


class MemoryFit:
    """A requester's memory of which peers a model's plans do not fit: peer -> the budget
    (MB) it had when left out, per (model, input size). A peer whose budget grows is tried
    again."""

    def __init__(self) -> None:
        self._out: OrderedDict[tuple[str, tuple[int, int]], dict[str, int]] = OrderedDict()
        self._checked: OrderedDict[tuple[Any, ...], tuple[Plan, Any, list[str]]] = OrderedDict()

    def leave_out(self, model: str, size: tuple[int, int], budgets: dict[str, int]) -> set[str]:
        out = self._out.get((model, size), {})
        return {name for name, mb_then in out.items() if budgets.get(name, 0) and budgets[name] <= mb_then}

    def check(self, model: str, size: tuple[int, int], trunk: Any, plan: Plan, budgets: dict[str, int],
              requester: str) -> list[str]:
        """The peers `plan` gives more than their budget (remembered, so the next plan
        leaves them out); the requester itself is never left out (its worker refuses)."""
        stated = tuple((d, budgets.get(d, 0)) for d in plan.devices if d != requester)
        key = (id(plan), id(trunk), stated)
        known = self._checked.get(key)
        if known is not None and known[0] is plan and known[1] is trunk:
            over = known[2]  # a standing plan, checked once per budgets (the walk costs ms)
        else:
            over = [d for d, budget in stated if budget > 0 and plan_bytes(trunk, plan, d) > budget * 2**20]
            self._checked[key] = (plan, trunk, over)
            while len(self._checked) > 64:
                self._checked.popitem(last=False)
        if over:
            entry = self._out.setdefault((model, size), {})
            entry.update({d: budgets[d] for d in over})
            self._out.move_to_end((model, size))
            while len(self._out) > 64:
                self._out.popitem(last=False)
        return over


def default_budget_mb() -> int:
    """The memory this machine has available now (MemAvailable), within this process's
    cgroup limit; 1024 where neither can be read."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1024
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            available = min(available, int(text))
    return max(1, available // 2**20)


__all__ = ["MemoryBudgetError", "MemoryFit", "default_budget_mb", "item_bytes", "plan_bytes", "segment_weights",
           "tile_bytes", "tile_peak_bytes"]
