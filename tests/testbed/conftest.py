"""Fixtures for the testbed tests: skip with the reason found by trying, never assumed."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from meshci.testbed import commands
from meshci.testbed.cpu import cgroup_support, list_groups
from meshci.testbed.netns import NAME_PREFIX, leftovers, netns_support


@pytest.fixture
def needs_netns() -> Iterator[None]:
    reason = netns_support()
    if reason:
        pytest.skip(reason)
    # only this process's names: other runs may build their own topologies meanwhile
    mine = f"{NAME_PREFIX}{os.getpid()}t"
    yield
    # every test leaves the machine as it found it
    assert leftovers(mine) == []


@pytest.fixture
def needs_tc(needs_netns: None) -> None:
    if commands.find_tool("tc") is None:
        pytest.skip("the 'tc' tool is not installed")


@pytest.fixture
def needs_cgroups() -> Iterator[None]:
    reason = cgroup_support()
    if reason:
        pytest.skip(reason)
    yield
    assert [group for group in list_groups() if f"-{os.getpid()}-" in group.name] == []
