"""What an emulated cluster should look like, read from a cluster file (pure, no IO but the read).

The same file `meshci plan`, `meshci simulate` and `meshci demo --cluster` take (see
`meshci.cost.cluster` and meshci/cost/clusters/README.md): each device's CPU quota comes
from ``cpu``, else its board ``profile``, else its ``gflops`` at `GFLOPS_PER_CPU`; derived
quotas are scaled down together so that the cluster fits the machine (`cpu_budget`), given
ones must fit as they are. Links: ``links.default`` and ``links."a~b"`` give rate, one-way
delay, jitter and loss per pair; ``uplink_mbps``/``downlink_mbps`` cap a device's own
traffic; ``medium: shared`` puts every transfer on one channel of ``links.default.mbps``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshci.cost.cluster import CLUSTER_DIR, GFLOPS_PER_CPU, device_cpu, load_cluster, read_cluster_file
from meshci.errors import ClusterFileError

QUOTA_BUDGET_CPUS = 1.2  # at most this many CPUs for all nodes together ...
QUOTA_BUDGET_SHARE = 0.6  # ... and at most this share of the machine's cores
MIN_CPU = 0.05
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,30}[A-Za-z0-9])?$")


def cpu_budget(cores: int) -> float:
    """CPUs the nodes of one emulated cluster may take on a machine with `cores` cores."""
    return min(QUOTA_BUDGET_CPUS, QUOTA_BUDGET_SHARE * cores)


@dataclass(frozen=True)
class PairShape:
    """One direction of one pair: rate (None: only the devices' caps), one-way delay, jitter, loss."""

    mbps: float | None
    delay_ms: float
    jitter_ms: float
    loss_pct: float


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    cpu: float
    cpu_given: bool  # from the file (cpu or profile), not derived from gflops
    gflops: float  # nominal, what plans and simulations use
    uplink_mbps: float | None
    downlink_mbps: float | None


@dataclass(frozen=True)
class ClusterSpec:
    devices: tuple[DeviceSpec, ...]
    pairs: Mapping[frozenset[str], PairShape]  # every unordered pair
    medium: str
    shared_mbps: float | None  # the one channel's rate when medium is shared
    requester: str
    source: str

    def pair(self, a: str, b: str) -> PairShape:
        return self.pairs[frozenset((a, b))]

    def device(self, name: str) -> DeviceSpec:
        for device in self.devices:
            if device.name == name:
                return device
        raise ClusterFileError(f"no device {name!r} (have {', '.join(d.name for d in self.devices)})")

    @property
    def total_cpu(self) -> float:
        return sum(d.cpu for d in self.devices)


def _shape(entry: Mapping[str, Any], mbps: float | None) -> PairShape:
    return PairShape(mbps=mbps, delay_ms=float(entry["latency_ms"]), jitter_ms=float(entry.get("jitter_ms", 0.0)),
                     loss_pct=float(entry.get("loss_pct", 0.0)))


def spec_from_dict(data: Mapping[str, Any], cores: int, source: str = "<dict>") -> ClusterSpec:
    """The emulated cluster a cluster file describes; `ClusterFileError` names what does not fit."""
    cluster = load_cluster(data)  # validates every field the planner reads
    raw = {str(e["name"]): e for e in data["devices"]}
    for name in raw:
        if not _HOSTNAME.match(name):
            raise ClusterFileError(f"devices: {name!r} cannot be emulated: a testbed device name is a hostname "
                                   "(letters, digits and '-', at most 32)")
    devices = []
    for i, device in enumerate(cluster.devices):
        entry = raw[device.name]
        given = device_cpu(entry, f"devices[{i}]")
        cpu = given if given is not None else device.gflops / GFLOPS_PER_CPU
        up, down = entry.get("uplink_mbps"), entry.get("downlink_mbps")
        devices.append(DeviceSpec(device.name, cpu, given is not None, device.gflops,
                                  float(up) if up is not None else None, float(down) if down is not None else None))
    budget = cpu_budget(cores)
    fixed = sum(d.cpu for d in devices if d.cpu_given)
    derived = sum(d.cpu for d in devices if not d.cpu_given)
    if fixed > budget + 1e-9:
        raise ClusterFileError(f"devices: the CPU quotas add up to {fixed:.2f} CPUs; this machine gives an emulated "
                               f"cluster at most {budget:.2f} ({cores} cores)")
    if derived and fixed + derived > budget:
        scale = (budget - fixed) / derived
        devices = [d if d.cpu_given else DeviceSpec(d.name, d.cpu * scale, False, d.gflops, d.uplink_mbps,
                                                    d.downlink_mbps) for d in devices]
    small = [d.name for d in devices if d.cpu < MIN_CPU]
    if small:
        raise ClusterFileError(f"devices: {', '.join(small)} would get under {MIN_CPU} CPU (too little to run a node)")
    links = data["links"]
    default_entry = links["default"]
    pairs = {}
    names = [d.name for d in devices]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            entry = links.get(f"{a}~{b}", links.get(f"{b}~{a}"))
            if entry is not None:
                pairs[frozenset((a, b))] = _shape(entry, float(entry["mbps"]))
            elif cluster.medium == "shared":
                pairs[frozenset((a, b))] = _shape(default_entry, None)
            else:
                pairs[frozenset((a, b))] = _shape(default_entry, float(default_entry["mbps"]))
    shared = float(default_entry["mbps"]) if cluster.medium == "shared" else None
    return ClusterSpec(tuple(devices), pairs, cluster.medium, shared, cluster.requester, source)


def load_spec(source: str | Path, cores: int) -> ClusterSpec:
    """`spec_from_dict` of a cluster file, a shipped example (``mixed-4``) or a generated
    cluster (``pi-4-switched``), named as `meshci plan --cluster` names them."""
    path = Path(source)
    if path.exists():
        return spec_from_dict(read_cluster_file(path), cores, str(path))
    shipped = CLUSTER_DIR / f"{source}.json"
    if shipped.exists():
        return spec_from_dict(read_cluster_file(shipped), cores, str(shipped))
    return spec_from_dict(load_cluster(str(source)).to_json(), cores, str(source))


def effective_mbps(spec: ClusterSpec, src: str, dst: str) -> float:
    """The rate src -> dst gets alone: the slowest of the pair's rate, src's uplink, dst's downlink
    and the shared channel."""
    rates = [spec.pair(src, dst).mbps, spec.device(src).uplink_mbps, spec.device(dst).downlink_mbps, spec.shared_mbps]
    known = [r for r in rates if r is not None]
    return min(known) if known else math.inf
