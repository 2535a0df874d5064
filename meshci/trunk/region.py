"""A rectangular region of one feature map: half-open rows [r0, r1) x cols [c0, c1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Region:
    """Half-open rows [r0, r1) and columns [c0, c1) of a feature map.

    Coordinates may be negative or run past the map while a computation is in
    progress (the unclipped need of a window); regions handed between parts are
    always clipped to their map.
    """

    r0: int
    r1: int
    c0: int
    c1: int

    def __post_init__(self) -> None:
        if self.r1 < self.r0 or self.c1 < self.c0:
            raise ValueError(f"region with negative extent: {self.to_list()}")

    @classmethod
    def full(cls, height: int, width: int) -> Region:
        return cls(0, height, 0, width)

    @classmethod
    def from_list(cls, seq: Sequence[int]) -> Region:
        if len(seq) != 4:
            raise ValueError(f"a region is [r0, r1, c0, c1], got {list(seq)!r}")
        r0, r1, c0, c1 = (int(v) for v in seq)
        return cls(r0, r1, c0, c1)

    def to_list(self) -> list[int]:
        return [self.r0, self.r1, self.c0, self.c1]

    @property
    def height(self) -> int:
        return self.r1 - self.r0

    @property
    def width(self) -> int:
        return self.c1 - self.c0

    @property
    def area(self) -> int:
        return self.height * self.width

    @property
    def empty(self) -> bool:
        return self.area == 0

    def intersect(self, other: Region) -> Region | None:
        """The overlap of two regions, or None when they share no cell."""
        r0, r1 = max(self.r0, other.r0), min(self.r1, other.r1)
        c0, c1 = max(self.c0, other.c0), min(self.c1, other.c1)
        if r0 >= r1 or c0 >= c1:
            return None
        return Region(r0, r1, c0, c1)

    def contains(self, other: Region) -> bool:
        return (
            self.r0 <= other.r0
            and other.r1 <= self.r1
            and self.c0 <= other.c0
            and other.c1 <= self.c1
        )

    def union(self, other: Region) -> Region:
        """The smallest region holding both (their bounding box)."""
        return Region(
            min(self.r0, other.r0), max(self.r1, other.r1), min(self.c0, other.c0), max(self.c1, other.c1)
        )

    def shift(self, dr: int, dc: int) -> Region:
        return Region(self.r0 + dr, self.r1 + dr, self.c0 + dc, self.c1 + dc)

    def __str__(self) -> str:
        return f"[{self.r0}:{self.r1}, {self.c0}:{self.c1}]"
