"""A small emulated network: N hosts (network namespaces) on one bridge.

    with topology(3) as net:
        server = net.popen(net.hosts[1], [sys.executable, "-m", "meshci.testbed.probe", ...])
        net.run(net.hosts[0], ["ip", "addr"])

Each host is a namespace with loopback up and one veth whose other end is a port of a
bridge that lives in a namespace of its own. Addresses come from a private test subnet
that exists only inside these namespaces: nothing is added to the root namespace, so
no route leads anywhere else. Names carry the creating pid and a sequence number, so
parallel runs never collide, and a run that died without cleaning up can be recognised
(its pid is gone) and removed by `remove_stale()`. Leaving the context manager always
kills the processes started in the hosts and deletes every namespace, also when the
body raised.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import logging
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from meshci.testbed import commands
from meshci.testbed.errors import TestbedError

log = logging.getLogger(__name__)

DEFAULT_SUBNET = "10.213.0.0/24"
NAME_PREFIX = "mc"
_IFNAMSIZ = 15  # the kernel's limit on interface name length
_NAME_RE = re.compile(rf"^{NAME_PREFIX}(\d+)t(\d+)")
_sequence = itertools.count()


@dataclass(frozen=True)
class Host:
    """One emulated device: a network namespace with one interface on the bridge."""

    name: str  # logical name: h0, h1, ...
    netns: str  # namespace name
    ifname: str  # its veth end, inside `netns`
    bridge_port: str  # the other veth end, a port of the bridge
    ip: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped so that it runs inside this host's namespace."""
        return [commands.tool("ip"), "netns", "exec", self.netns, *argv]


@dataclass
class Topology:
    """A live topology; built and torn down by `topology()`."""

    prefix: str
    subnet: ipaddress.IPv4Network
    bridge_netns: str
    bridge: str
    hosts: tuple[Host, ...] = ()
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise TestbedError(f"no host {name!r} in this topology (have {', '.join(h.name for h in self.hosts)})")

    def popen(self, host: Host, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside `host`; it is killed when the topology is torn down."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(host.exec_argv(argv), **kwargs)  # type: ignore[call-overload]
        self._processes.append(proc)
        return proc

    def run(
        self, host: Host, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside `host` to completion and return its captured output."""
        proc = subprocess.run(host.exec_argv(argv), capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise TestbedError(
                f"`{' '.join(argv)}` in {host.name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        return proc

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def close(self) -> None:
        """Kill the processes started in the hosts, then delete every namespace. Idempotent."""
        for proc in self._processes:
            stop_process(proc)
        self._processes.clear()
        problems = []
        for netns in reversed(self._namespaces):
            done = commands.run(["ip", "netns", "delete", netns], check=False)
            if done.returncode != 0 and netns in list_namespaces():
                problems.append(f"{netns}: {done.stderr.strip()}")
        self._namespaces.clear()
        if problems:
            raise TestbedError("could not delete namespaces: " + "; ".join(problems))


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; waits for it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        # it ignored SIGTERM within the grace period: force it
        proc.kill()
        proc.wait(timeout=grace_s)


def new_prefix() -> str:
    """A name prefix unique to this process and call: mc<pid>t<seq>."""
    return f"{NAME_PREFIX}{os.getpid()}t{next(_sequence)}"


@contextmanager
def topology(n_hosts: int, *, subnet: str = DEFAULT_SUBNET, prefix: str | None = None) -> Iterator[Topology]:
    """Build N hosts on one bridge; always torn down on exit."""
    if n_hosts < 1:
        raise TestbedError(f"a topology needs at least one host, got {n_hosts}")
    network = ipaddress.IPv4Network(subnet)
    addresses = list(itertools.islice(network.hosts(), n_hosts))
    if len(addresses) < n_hosts:
        raise TestbedError(f"subnet {subnet} has room for {len(addresses)} hosts, not {n_hosts}")
    prefix = prefix or new_prefix()
    longest = f"{prefix}h{n_hosts - 1}"
    if len(longest) > _IFNAMSIZ:
        raise TestbedError(f"interface name {longest!r} is longer than {_IFNAMSIZ} characters")
    net = Topology(prefix=prefix, subnet=network, bridge_netns=f"{prefix}br", bridge=f"{prefix}br")
    try:
        _build(net, addresses)
        yield net
    finally:
        net.close()


def _build(net: Topology, addresses: list[ipaddress.IPv4Address]) -> None:
    ip = commands.run
    ip(["ip", "netns", "add", net.bridge_netns])
    net._namespaces.append(net.bridge_netns)
    ip(["ip", "-n", net.bridge_netns, "link", "set", "lo", "up"])
    ip(["ip", "-n", net.bridge_netns, "link", "add", "name", net.bridge, "type", "bridge"])
    ip(["ip", "-n", net.bridge_netns, "link", "set", net.bridge, "up"])
    hosts = []
    for index, address in enumerate(addresses):
        host = Host(
            name=f"h{index}",
            netns=f"{net.prefix}h{index}",
            ifname=f"{net.prefix}h{index}",
            bridge_port=f"{net.prefix}p{index}",
            ip=str(address),
        )
        ip(["ip", "netns", "add", host.netns])
        net._namespaces.append(host.netns)
        # both ends are created directly inside their namespaces: nothing touches the root namespace
        ip(["ip", "link", "add", "name", host.ifname, "netns", host.netns,
            "type", "veth", "peer", "name", host.bridge_port, "netns", net.bridge_netns])  # fmt: skip
        ip(["ip", "-n", net.bridge_netns, "link", "set", host.bridge_port, "master", net.bridge, "up"])
        ip(["ip", "-n", host.netns, "link", "set", "lo", "up"])
        ip(["ip", "-n", host.netns, "addr", "add", f"{address}/{net.subnet.prefixlen}", "dev", host.ifname])
        ip(["ip", "-n", host.netns, "link", "set", host.ifname, "up"])
        hosts.append(host)
    net.hosts = tuple(hosts)


def list_namespaces() -> list[str]:
    """Names of all network namespaces (`ip netns list`)."""
    done = commands.run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def leftovers(prefix: str = NAME_PREFIX) -> list[str]:
    """Namespaces and root-namespace links whose names start with `prefix` (should be none)."""
    found = [name for name in list_namespaces() if name.startswith(prefix)]
    links = commands.run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(prefix):
                found.append(f"link {name}")
    return found


def remove_stale() -> list[str]:
    """Delete testbed namespaces left by processes that no longer exist; returns their names."""
    removed = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            commands.run(["ip", "netns", "delete", name], check=False)
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        # no such process: its namespaces are orphans
        return False
    except PermissionError:
        # exists but belongs to someone else
        return True
    return True


@functools.lru_cache(maxsize=1)
def netns_support() -> str | None:
    """None when namespaces, veth pairs and a bridge can be made here, else the reason (found by trying)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root (network namespaces need CAP_NET_ADMIN)"
    if commands.find_tool("ip") is None:
        return "the 'ip' tool (iproute2) is not installed"
    try:
        with topology(2, prefix=new_prefix()):
            pass
    except (TestbedError, OSError, subprocess.SubprocessError) as exc:
        # any failure to build the smallest topology means the tests cannot run here
        return f"cannot build a network namespace topology: {exc}"
    return None
