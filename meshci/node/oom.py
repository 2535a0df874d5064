"""A device out of memory, said so the user knows what to do.

A tile's allocation that fails (Python's MemoryError, torch's CPU allocator "can't allocate
memory", CUDA "out of memory") fails the request with one line naming the device, the
tile, about how much memory the tile needs and what to do; the client prints it as is
(`meshci.node.client.failure_hint` adds nothing to a line that already says what to do)
and exits 1.
"""

from __future__ import annotations

from meshci.node.client import OUT_OF_MEMORY_WORDS
from meshci.trunk import Region

WHAT_TO_DO = "use a smaller --size, or more devices (the edgeci strategy spreads the work over them)"


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(words in text for words in OUT_OF_MEMORY_WORDS)


def tile_out_of_memory(device: str, block: int, out: Region, needed: int) -> str:
    """The failure reason of a tile that ran out of memory on `device` (one line)."""
    return (f"device {device} ran out of memory computing a tile of block {block} (output rows "
            f"{out.r0}-{out.r1}): it needs about {_mib(needed)}; {WHAT_TO_DO}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


__all__ = ["WHAT_TO_DO", "is_out_of_memory", "tile_out_of_memory"]
