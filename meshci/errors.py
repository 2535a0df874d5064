"""Errors that reach a user as one clear line, never a stack trace.

Exit statuses: 2 for a usage error (bad flags, unknown model, bad input file: the command
as given cannot work), 1 for a runtime failure (a peer unreachable, a port taken, a device
out of memory: the same command may work later or elsewhere). Each message says what to
do about it.
"""

from __future__ import annotations


class MeshciError(Exception):
    """A user-facing usage error: bad input, unknown model, bad flags, bad cluster file."""

    exit_status = 2


class RuntimeFailure(MeshciError):
    """A user-facing runtime failure (exit status 1): the request was fine, the world was not."""

    exit_status = 1


class UnknownModelError(MeshciError):
    pass


class TraceError(MeshciError):
    """A model that torch.fx cannot trace, or whose trunk cannot be extracted."""


class TilingError(MeshciError):
    """An impossible tiling: more tiles than rows, empty regions, bad cuts."""


class ClusterFileError(MeshciError):
    """A cluster file with a missing or invalid field (the message names the field)."""


class PlanningError(MeshciError):
    pass
