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

STAGES = frozenset({"tile", "gather", "output", "partial", "logits", "input", "sum"})
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


# Pieces that arrive before their request's PLAN (a neighbour is faster than the requester,
# or the model is still loading here) are held until it comes; a peer could send them for
# made-up request ids, so what is held is capped per sender and in total.
ORPHAN_BYTES_PER_PEER = 64 << 20
ORPHAN_BYTES_TOTAL = 256 << 20
ORPHAN_FRAMES_PER_PEER = 256


class OrphanBudget:
    """Bytes and frames of pieces held without a plan, per sender and in total (pure)."""

    def __init__(self, per_peer: int = ORPHAN_BYTES_PER_PEER, total: int = ORPHAN_BYTES_TOTAL,
                 frames_per_peer: int = ORPHAN_FRAMES_PER_PEER) -> None:
        self.per_peer, self.total, self.frames_per_peer = per_peer, total, frames_per_peer
        self._bytes: dict[str, int] = {}
        self._frames: dict[str, int] = {}
        self.held = 0

    def admit(self, sender: str, nbytes: int) -> str | None:
        """Take `nbytes` of `sender`'s pieces; the reason when they are over a cap."""
        mine = self._bytes.get(sender, 0)
        if self._frames.get(sender, 0) >= self.frames_per_peer:
            return f"{sender} already has {self.frames_per_peer} frames of pieces waiting for plans"
        if mine + nbytes > self.per_peer:
            return f"{sender} already has {mine} bytes of pieces waiting for plans (cap {self.per_peer})"
        if self.held + nbytes > self.total:
            return f"{self.held} bytes of pieces already wait for plans (cap {self.total})"
        self._bytes[sender] = mine + nbytes
        self._frames[sender] = self._frames.get(sender, 0) + 1
        self.held += nbytes
        return None

    def release(self, sender: str, nbytes: int) -> None:
        left = self._bytes.get(sender, 0) - nbytes
        frames = self._frames.get(sender, 0) - 1
        self.held -= nbytes
        if left <= 0 or frames <= 0:
            self._bytes.pop(sender, None)
            self._frames.pop(sender, None)
        else:
            self._bytes[sender], self._frames[sender] = left, frames

    def held_by(self, sender: str) -> int:
        return self._bytes.get(sender, 0)


def nbytes(pieces: Sequence[Piece]) -> int:
    return sum(p.tensor.element_size() * p.tensor.nelement() for p in pieces)
