"""The plan: where the trunk is cut into fused blocks and which device computes which tile.

A tile is a region of a block's OUTPUT map; its device computes it from the block's
input rows it needs (its tile plus the halo of the fused stack). The head runs on the
plan's head device (`HeadPlan`; the requester unless the plan says otherwise), whole or
split across the devices holding the trunk output. ``routing="p2p"``: at a block boundary each device sends the rows the next
block's tiles need straight to their devices (EdgeCI, DeepThings's fused stage, local);
``routing="requester"``: the requester gathers every block's output and scatters the next
block's inputs (MoDNN, AOFL).

Plans are frozen: the planner builds them, the node, the simulator and ``execute_plan``
only read them. ``to_json``/``from_json`` round-trip exactly (the node ships plans to its
peers as JSON).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshci.errors import PlanningError
from meshci.trunk.region import Region

CLASSIC = ("local", "modnn", "deepthings", "aofl", "edgeci")  # EdgeCI and the schemes it is compared with
STRATEGIES = (*CLASSIC, "edgeci-dp", "edgeci-gather")  # and the ablations (`meshci.planning.ablations`)
ROUTINGS = ("p2p", "requester")


@dataclass(frozen=True)
class TileSpec:
    """A tile of a block's output map and the device that computes it."""

    device: str
    region: Region


@dataclass(frozen=True)
class BlockPlan:
    """Segments [start, end) fused into one block, its tiles, and the predicted absolute
    time (seconds from the request's start) at which each device finishes its part of it.
    ``auction_rounds``: rounds of the auction that assigned the tiles (0: no auction)."""

    start: int
    end: int
    tiles: tuple[TileSpec, ...]
    finish_s: dict[str, float]
    auction_rounds: int = 0

    @property
    def devices(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for tile in self.tiles:
            seen.setdefault(tile.device)
        return tuple(seen)

    def to_json(self) -> dict[str, Any]:
        return {
            "segments": [self.start, self.end],
            "tiles": [
                {
                    "device": t.device,
                    "rows": [t.region.r0, t.region.r1],
                    "cols": [t.region.c0, t.region.c1],
                    "region": t.region.to_list(),
                }
                for t in self.tiles
            ],
            "finish_s": dict(self.finish_s),
            "auction_rounds": self.auction_rounds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BlockPlan:
        start, end = (int(v) for v in data["segments"])
        tiles = tuple(TileSpec(str(t["device"]), Region.from_list(t["region"])) for t in data["tiles"])
        finish = {str(k): float(v) for k, v in data.get("finish_s", {}).items()}
        return cls(start, end, tiles, finish, int(data.get("auction_rounds", 0)))


@dataclass(frozen=True)
class HeadPlan:
    """Where the head runs. ``split``: each device holding a tile of the trunk output sends
    the head device its tile's part of the head's linear prefix (`meshci.trunk.head`);
    otherwise the trunk output is gathered on the head device. The head device sends the
    logits to the requester."""

    device: str
    split: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "split": self.split}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HeadPlan:
        return cls(str(data["device"]), bool(data.get("split", False)))


@dataclass(frozen=True)
class Plan:
    strategy: str
    model: str
    input_shape: tuple[int, int, int]
    requester: str
    blocks: tuple[BlockPlan, ...]
    routing: str
    predicted_latency_s: float
    planning_ms: float
    auction_rounds: int = 0
    head: HeadPlan | None = None  # None: the whole head on the requester

    @property
    def head_plan(self) -> HeadPlan:
        return self.head if self.head is not None else HeadPlan(self.requester)

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise PlanningError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if not self.blocks:
            raise PlanningError("a plan needs at least one block")
        if self.blocks[0].start != 0:
            raise PlanningError("the first block must start at segment 0")
        for a, b in zip(self.blocks, self.blocks[1:]):
            if a.end != b.start:
                raise PlanningError(f"blocks [{a.start},{a.end}) and [{b.start},{b.end}) do not meet")
        for block in self.blocks:
            if block.end <= block.start:
                raise PlanningError(f"empty block [{block.start},{block.end})")
            if not block.tiles:
                raise PlanningError(f"block [{block.start},{block.end}) has no tiles")

    @property
    def cuts(self) -> list[int]:
        """Segment indices where a block starts, the first (0) excluded."""
        return [b.start for b in self.blocks[1:]]

    @property
    def devices(self) -> tuple[str, ...]:
        """The requester, every device holding a tile, and the head device."""
        seen: dict[str, None] = {self.requester: None}
        for block in self.blocks:
            for name in block.devices:
                seen.setdefault(name)
        seen.setdefault(self.head_plan.device)
        return tuple(seen)

    def digest(self) -> str:
        """A short name of this plan's content (plans travel once, then by digest)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "requester": self.requester,
            "routing": self.routing,
            "predicted_latency_s": self.predicted_latency_s,
            "planning_ms": self.planning_ms,
            "auction_rounds": self.auction_rounds,
            "blocks": [b.to_json() for b in self.blocks],
            **({"head": self.head.to_json()} if self.head is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        try:
            return cls(
                strategy=str(data["strategy"]),
                model=str(data["model"]),
                input_shape=tuple(int(v) for v in data["input_shape"]),  # type: ignore[arg-type]
                requester=str(data["requester"]),
                blocks=tuple(BlockPlan.from_json(b) for b in data["blocks"]),
                routing=str(data["routing"]),
                predicted_latency_s=float(data["predicted_latency_s"]),
                planning_ms=float(data.get("planning_ms", 0.0)),
                auction_rounds=int(data.get("auction_rounds", 0)),
                head=HeadPlan.from_json(data["head"]) if data.get("head") is not None else None,
            )
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, IndexError) as exc:
            # malformed plan JSON (a peer's or a user's: not an object, a 400-digit or an
            # infinite number): one error naming what is wrong
            raise PlanningError(f"malformed plan: {str(exc)[:200]!r}") from exc
