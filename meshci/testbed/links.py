"""Shaping an emulated cluster's links in the kernel (htb), loss by classic BPF, and the
shared medium by one shaped channel on the bridge.

- A device's egress (its own veth): htb root class at its ``uplink_mbps`` (or unlimited),
  one child class per peer with that pair's rate, so a pair never exceeds its rate and all
  of a device's traffic together never exceeds its uplink.
- The bridge's port towards a device (egress = what the device receives): htb at its
  ``downlink_mbps``; lossy pairs get a `bpf_loss` filter there into a dropping class, so the
  packet is lost in the network and the sender's TCP recovers as on a real lossy link.
- ``medium: shared``: every frame entering the bridge from a device is redirected (tc
  mirred, on the port's ingress) to one veth whose egress is shaped at the channel's rate
  and whose other end is a bridge port, so all transfers share one queue and one rate (a
  WiFi cell). That port does not learn addresses; each device's address is a static entry.

Delay and jitter are not here (this kernel has no netem): see `meshci.testbed.bed`, which
puts a delay relay in front of each node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshci.testbed import bpf_loss, commands
from meshci.testbed.netns import Host, Topology
from meshci.testbed.shaping import htb_burst_bytes
from meshci.testbed.spec import ClusterSpec

UNLIMITED = "100gbit"


def _tc(netns: str, argv: list[str]) -> None:
    commands.run(["ip", "netns", "exec", netns, commands.tool("tc"), *argv])


def _rate(mbps: float | None) -> tuple[str, str]:
    rate = f"{mbps}mbit" if mbps is not None else UNLIMITED
    return rate, str(htb_burst_bytes(mbps if mbps is not None else 100_000))


def _htb_class(netns: str, dev: str, parent: str, classid: str, mbps: float | None, ceil: float | None = None) -> None:
    rate, burst = _rate(mbps)
    ceil_rate, _ = _rate(ceil if ceil is not None else mbps)
    _tc(netns, ["class", "add", "dev", dev, "parent", parent, "classid", classid, "htb", "rate", rate,
                "ceil", ceil_rate, "burst", burst, "cburst", burst, "quantum", "65536"])  # fmt: skip


def shape_cluster(spec: ClusterSpec, net: Topology, hosts: Mapping[str, Host]) -> dict[str, dict[str, Any]]:
    """Apply the spec's rates and losses; returns, per device, what shapes its traffic and how."""
    report: dict[str, dict[str, Any]] = {}
    for device in spec.devices:
        host = hosts[device.name]
        _shape_uplink(spec, device.name, host, hosts)
        loss = _shape_downlink(spec, device.name, net, host, hosts)
        report[device.name] = {
            "uplink_mbps": device.uplink_mbps, "downlink_mbps": device.downlink_mbps,
            "rate": "htb", "loss": "bpf" if loss else None,
            "pairs": {peer: {"mbps": spec.pair(device.name, peer).mbps,
                             "loss_pct": spec.pair(device.name, peer).loss_pct}
                      for peer in hosts if peer != device.name},
        }
    if spec.medium == "shared":
        _shared_channel(spec, net, hosts)
    return report


def _shape_uplink(spec: ClusterSpec, name: str, host: Host, hosts: Mapping[str, Host]) -> None:
    device = spec.device(name)
    _tc(host.netns, ["qdisc", "add", "dev", host.ifname, "root", "handle", "1:", "htb", "default", "1"])
    _htb_class(host.netns, host.ifname, "1:", "1:1", device.uplink_mbps)
    minor = 10
    for peer, peer_host in hosts.items():
        if peer == name:
            continue
        pair = spec.pair(name, peer).mbps
        limits = [r for r in (pair, device.uplink_mbps) if r is not None]
        ceil = min(limits) if limits else None
        _htb_class(host.netns, host.ifname, "1:1", f"1:{minor}", ceil)
        _tc(host.netns, ["filter", "add", "dev", host.ifname, "parent", "1:", "protocol", "ip", "prio", "1",
                         "u32", "match", "ip", "dst", f"{peer_host.ip}/32", "flowid", f"1:{minor}"])  # fmt: skip
        minor += 1


def _shape_downlink(spec: ClusterSpec, name: str, net: Topology, host: Host, hosts: Mapping[str, Host]) -> bool:
    """htb on the bridge port towards `name` (its downlink) and the loss filters of its pairs."""
    netns, port = net.bridge_netns, host.bridge_port
    _tc(netns, ["qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "1"])
    _htb_class(netns, port, "1:", "1:1", spec.device(name).downlink_mbps)
    lossy = False
    for peer, peer_host in hosts.items():
        loss = spec.pair(name, peer).loss_pct if peer != name else 0.0
        if loss <= 0:
            continue
        if not lossy:
            _htb_class(netns, port, "1:", "1:2", None)
            _tc(netns, ["qdisc", "add", "dev", port, "parent", "1:2", "handle", "2:", "pfifo", "limit", "0"])
            lossy = True
        program = bpf_loss.bytecode(bpf_loss.loss_program(peer_host.ip, host.ip, loss / 100.0))
        _tc(netns, ["filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1",
                    "bpf", "bytecode", program, "classid", "1:2"])  # fmt: skip
        # one packet per skb from the sender: a drop loses one segment, not a 64 KB GSO burst
        commands.run(["ip", "-n", peer_host.netns, "link", "set", peer_host.ifname, "gso_max_segs", "1"])
    return lossy


def air_names(net: Topology) -> tuple[str, str]:
    return f"{net.prefix}a0", f"{net.prefix}a1"


def _shared_channel(spec: ClusterSpec, net: Topology, hosts: Mapping[str, Host]) -> None:
    netns = net.bridge_netns
    air_in, air_out = air_names(net)
    ip = commands.run
    ip(["ip", "-n", netns, "link", "add", "name", air_in, "type", "veth", "peer", "name", air_out])
    ip(["ip", "-n", netns, "link", "set", air_in, "up"])
    ip(["ip", "-n", netns, "link", "set", air_out, "master", net.bridge, "up"])
    ip(["bridge", "-n", netns, "link", "set", "dev", air_out, "learning", "off"])
    _tc(netns, ["qdisc", "add", "dev", air_in, "root", "handle", "1:", "htb", "default", "1"])
    _htb_class(netns, air_in, "1:", "1:1", spec.shared_mbps)
    for host in hosts.values():
        mac = _mac(host)
        ip(["bridge", "-n", netns, "fdb", "replace", mac, "dev", host.bridge_port, "master", "static"])
        _tc(netns, ["qdisc", "add", "dev", host.bridge_port, "handle", "ffff:", "ingress"])
        _tc(netns, ["filter", "add", "dev", host.bridge_port, "parent", "ffff:", "protocol", "all", "prio", "1",
                    "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", air_in])  # fmt: skip


def _mac(host: Host) -> str:
    out = commands.run(["ip", "-n", host.netns, "-o", "link", "show", "dev", host.ifname]).stdout
    words = out.split()
    return words[words.index("link/ether") + 1]


def qdisc_stats(netns: str, dev: str) -> str:
    """`tc -s qdisc show` of one interface (for status and debugging)."""
    return commands.run(["ip", "netns", "exec", netns, commands.tool("tc"), "-s", "qdisc", "show", "dev", dev],
                        check=False).stdout
