"""A device out of memory, said so the user knows what to do.

A tile's allocation that fails (Python's MemoryError, torch's CPU allocator "can't allocate
memory", CUDA "out of memory") fails the request with one line naming the device, the
tile, about how much memory the tile needs and what to do; the client prints it as is
(`meshci.node.client.failure_hint` adds nothing to a line that already says what to do)
and exits 1.
"""

from __future__ import annotations

from meshci.node.client import OUT_OF_MEMORY_WORDS
from meshci.tiling import block_regions
from meshci.trunk import Region, Trunk

WHAT_TO_DO = "use a smaller --size, or more devices (the edgeci strategy spreads the work over them)"
BYTES_PER_VALUE = 4  # float32 maps


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(words in text for words in OUT_OF_MEMORY_WORDS)


def tile_bytes(trunk: Trunk, start: int, end: int, out: Region) -> int:
    """About the memory a tile of segments [start, end) producing `out` needs at its peak:
    the largest input plus output of one of its segments (float32), halo included."""
    regions = block_regions(trunk, start, end, out)
    maps = [r.area * trunk.boundary_shape(start + k)[0] * BYTES_PER_VALUE for k, r in enumerate(regions)]
    return max(a + b for a, b in zip(maps, maps[1:]))


def tile_out_of_memory(device: str, block: int, out: Region, needed: int) -> str:
    """The failure reason of a tile that ran out of memory on `device` (one line)."""
    return (f"device {device} ran out of memory computing a tile of block {block} (output rows "
            f"{out.r0}-{out.r1}): it needs about {_mib(needed)}; {WHAT_TO_DO}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


__all__ = ["WHAT_TO_DO", "is_out_of_memory", "tile_bytes", "tile_out_of_memory"]
