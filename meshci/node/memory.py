"""This process's resident memory, as a node reports it (`stats`) and the fuzz run measures it."""

from __future__ import annotations

import gc
import os


def rss_mb() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        # no procfs (not Linux): report the peak instead
        return peak_rss_mb()


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def trimmed_rss_mb() -> float | None:
    """Resident memory once freed heap pages went back to the system: what is still held
    (glibc keeps freed memory, e.g. of model builds, mapped); None without glibc."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        # not glibc (macOS, musl): no figure
        return None
    return rss_mb()


__all__ = ["peak_rss_mb", "rss_mb", "trimmed_rss_mb"]
