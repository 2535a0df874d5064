"""Namespaces on a bridge: reachability, isolation from the root namespace, and teardown."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshci.testbed import commands
from meshci.testbed.errors import TestbedError
from meshci.testbed.netns import leftovers, list_namespaces, new_prefix, remove_stale, topology
from meshci.testbed.probe import ProbeServer, measure_rtt

pytestmark = pytest.mark.testbed


def test_hosts_reach_each_other_over_the_bridge(needs_netns: None) -> None:
    with topology(3) as net:
        server = ProbeServer.start(net, net.hosts[2], port=5301)
        for client in net.hosts[:2]:
            rtt = measure_rtt(net, client, server.address, count=3)
            assert rtt["count"] == 3
        addresses = net.run(net.hosts[0], ["ip", "-o", "-4", "addr", "show"]).stdout
        assert "127.0.0.1" in addresses and net.hosts[0].ip in addresses


def test_test_subnet_never_reaches_the_root_namespace(needs_netns: None) -> None:
    with topology(2) as net:
        root_addresses = commands.run(["ip", "-o", "-4", "addr", "show"]).stdout
        root_routes = commands.run(["ip", "route", "show", "table", "all"]).stdout
        for host in net.hosts:
            assert host.ip not in root_addresses
        assert str(net.subnet.network_address) not in root_routes
        # and a host has no route out of the test subnet
        routes = net.run(net.hosts[0], ["ip", "route", "show"]).stdout
        assert "default" not in routes


def test_teardown_removes_everything_even_when_the_body_raises(needs_netns: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), topology(2) as net:
        sleeper = net.popen(net.hosts[0], [sys.executable, "-c", "import time; time.sleep(60)"])
        names = net.namespaces()
        assert set(names) <= set(list_namespaces())
        raise RuntimeError("boom")
    assert not set(names) & set(list_namespaces())
    assert sleeper.poll() is not None  # the process started in the host was stopped
    assert leftovers(net.prefix) == []


def test_two_topologies_at_once_do_not_collide(needs_netns: None) -> None:
    with topology(2) as first, topology(2) as second:
        assert first.prefix != second.prefix
        assert not set(first.namespaces()) & set(second.namespaces())
        # same addresses, separate bridges: each pair talks inside its own topology
        server = ProbeServer.start(second, second.hosts[1], port=5302)
        assert measure_rtt(second, second.hosts[0], server.address, count=2)["count"] == 2


def test_a_failed_build_leaves_nothing_behind(needs_netns: None) -> None:
    prefix = new_prefix()
    # a namespace already holding the second host's name makes the build fail half-way
    commands.run(["ip", "netns", "add", f"{prefix}h1"])
    try:
        with pytest.raises(TestbedError, match="h1"), topology(2, prefix=prefix):
            pass
        assert leftovers(prefix) == [f"{prefix}h1"]
    finally:
        commands.run(["ip", "netns", "delete", f"{prefix}h1"])


def test_bad_requests_are_user_errors() -> None:
    with pytest.raises(TestbedError, match="at least one host"), topology(0):
        pass
    with pytest.raises(TestbedError, match="room for"), topology(5, subnet="10.213.0.0/30"):
        pass


def test_support_checks_name_the_missing_privilege(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshci.testbed import cpu, netns

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "not root" in (netns.netns_support.__wrapped__() or "")
    assert "not root" in (cpu.cgroup_support.__wrapped__() or "")


def test_remove_stale_deletes_only_orphans_of_dead_processes(needs_netns: None) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)  # fmt: skip
    dead_pid = int(finished.stdout)  # exited and reaped: no process has this pid now (barring reuse)
    orphan = f"mc{dead_pid}t0h0"
    commands.run(["ip", "netns", "add", orphan])
    try:
        with topology(1) as live:
            removed = remove_stale()
            assert orphan in removed
            assert not set(live.namespaces()) & set(removed)
            assert set(live.namespaces()) <= set(list_namespaces())
    finally:
        commands.run(["ip", "netns", "delete", orphan], check=False)
    assert orphan not in list_namespaces()
