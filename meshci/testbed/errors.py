"""Errors of the emulation testbed."""

from __future__ import annotations

from meshci.errors import MeshciError


class TestbedError(MeshciError):
    """A testbed command failed (namespace, link, qdisc, cgroup), with the command's own words."""

    __test__ = False  # a name starting with "Test" that pytest must not collect
