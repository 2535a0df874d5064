"""Errors that reach a user as one clear line (exit status 2), never a stack trace."""

from __future__ import annotations


class MeshciError(Exception):
    """A user-facing error: bad input, unknown model, bad flags, bad cluster file."""

    exit_status = 2


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
