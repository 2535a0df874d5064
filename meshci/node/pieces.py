"""Pieces of feature maps as they travel: several per frame (sans-IO, pure).

At a block boundary a device usually owes its neighbour more than one rectangle (its
strip's halo for each of the neighbour's tiles, a tile's output and the head's part...).
They travel as one frame per destination: the frame's meta lists each piece's block,
region and stage, and its tensors are the pieces' tensors, raw, in the same order.

    meta["pieces"] = [[block, r0, r1, c0, c1, stage], ...]

`decode` treats every field as hostile: counts, types, ranges and the stage are checked
here; whether a piece fits the plan is the request state machine's to say.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from meshci.trunk import Region

STAGES = frozenset({"tile", "gather", "output", "partial", "logits", "input"})
MAX_PIECES = 256  # per frame
MAX_INDEX = 1 << 20  # blocks and map coordinates are far below this


class PieceFormatError(ValueError):
    """A frame whose pieces do not parse: a peer's mistake."""


@dataclass(frozen=True)
class Piece:
    block: int
    region: Region
    stage: str
    tensor: torch.Tensor


def encode(pieces: Sequence[tuple[int, Region, str, torch.Tensor]]) -> tuple[list[list[Any]], tuple[torch.Tensor, ...]]:
    """The meta list and the tensors of a frame carrying `pieces`."""
    return ([[b, r.r0, r.r1, r.c0, r.c1, stage] for b, r, stage, _ in pieces],
            tuple(t for _, _, _, t in pieces))


def decode(meta: dict[str, Any], tensors: Sequence[torch.Tensor]) -> list[Piece]:
    """The pieces of a frame; PieceFormatError when they do not parse."""
    listed = meta.get("pieces")
    if not isinstance(listed, list) or len(listed) > MAX_PIECES:
        raise PieceFormatError(f"pieces must be a list of at most {MAX_PIECES}")
    if len(listed) != len(tensors):
        raise PieceFormatError(f"{len(listed)} pieces listed, {len(tensors)} tensors sent")
    out = []
    for entry, tensor in zip(listed, tensors):
        if not isinstance(entry, list) or len(entry) != 6:
            raise PieceFormatError("a piece is [block, r0, r1, c0, c1, stage]")
        *numbers, stage = entry
        if not all(type(v) is int and 0 <= v < MAX_INDEX for v in numbers):
            raise PieceFormatError(f"piece block and region must be integers in 0..{MAX_INDEX}")
        if stage not in STAGES:
            raise PieceFormatError(f"unknown piece stage {str(stage)[:32]!r}")
        block, r0, r1, c0, c1 = numbers
        if not (r0 < r1 and c0 < c1):
            raise PieceFormatError(f"empty piece region {[r0, r1, c0, c1]}")
        out.append(Piece(block, Region(r0, r1, c0, c1), stage, tensor))
    return out
