"""The cluster a plan is made for: devices, links, medium, requester.

Offline (``meshci plan``/``simulate``, benchmarks) a cluster comes from a JSON cluster file::

    {"devices": [{"name": "pi4-a", "gflops": 6.0, "memory_mb": 2048, "backlog_s": 0.0}, ...],
     "links": {"default": {"mbps": 100, "latency_ms": 2},
               "pi4-a~pi3-b": {"mbps": 40, "latency_ms": 6}},
     "medium": "shared" | "switched",
     "requester": "pi4-a"}

``gflops`` is the device's effective speed on CNN convolutions (not its peak). A device
may also carry measured per-segment latency curves (``Device.curves``, see
`meshci.cost.profiling`): then the planner uses them for that model instead of ``gflops``.
``medium: shared`` means every transfer uses one channel (a WiFi cell); ``switched`` means
each pair of devices has its own link. A link named ``a~b`` is symmetric.

Emulated boards (the testbed, ``meshci demo --cluster``): a device may name a board
(``"profile": "rpi4"``, see `DEVICE_PROFILES`), which gives its nominal ``gflops`` and its
CPU quota on the emulating machine, or give its quota (``"cpu": 0.25``, nominal speed
``GFLOPS_PER_CPU`` per CPU). ``uplink_mbps``/``downlink_mbps`` cap a device's own traffic
(a NIC, a WiFi client); the planner sees each pair's link at the slowest of the pair's
rate and both ends' caps. Links may also give ``jitter_ms`` and ``loss_pct`` (used by the
testbed; the planner ignores them).

Online, the mesh node builds the same `Cluster` from gossiped peer state.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshci.errors import ClusterFileError

MEDIA = ("shared", "switched")
CLUSTER_DIR = Path(__file__).parent / "clusters"

SegmentCurve = tuple[tuple[float, float], ...]  # per segment (a_s, b_s_per_row): t = a + b * rows


@dataclass(frozen=True)
class Device:
    """A device as the planner sees it.

    ``backlog_s``: seconds of work it already holds (other requests). ``curves``: pairs
    (model name, per-segment (a, b) fits of time = a + b * output rows), measured by
    `meshci.cost.profiling`; used instead of ``gflops`` for that model.
    ``tile_overhead_s``: what each tile costs it beyond the compute (receiving, handing
    the tile to its compute thread and back, sending the result), measured by the node.
    """

    name: str
    gflops: float
    memory_mb: int = 1024
    backlog_s: float = 0.0
    curves: tuple[tuple[str, SegmentCurve], ...] = ()
    tile_overhead_s: float = 0.0

    def curve_for(self, model: str, n_segments: int) -> SegmentCurve | None:
        for name, curve in self.curves:
            if name == model and len(curve) == n_segments:
                return curve
        return None


@dataclass(frozen=True)
class LinkSpec:
    mbps: float
    latency_ms: float

    def transfer_s(self, n_bytes: float) -> float:
        """Seconds to move ``n_bytes`` over this link (0 for nothing to move)."""
        if n_bytes <= 0:
            return 0.0
        return self.latency_ms / 1000.0 + n_bytes * 8.0 / (self.mbps * 1e6)


@dataclass(frozen=True)
class Cluster:
    devices: tuple[Device, ...]
    default_link: LinkSpec
    links: Mapping[frozenset[str], LinkSpec] = field(default_factory=dict)
    medium: str = "switched"
    requester: str = ""

    def __post_init__(self) -> None:
        if not self.devices:
            raise ClusterFileError("devices: a cluster needs at least one device")
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ClusterFileError(f"devices: duplicate device name(s) {', '.join(dup)}")
        if self.medium not in MEDIA:
            raise ClusterFileError(f"medium: must be one of {', '.join(MEDIA)}, got {self.medium!r}")
        if not self.requester:
            object.__setattr__(self, "requester", names[0])
        if self.requester not in names:
            raise ClusterFileError(f"requester: {self.requester!r} is not one of the devices")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def link(self, a: str, b: str) -> LinkSpec:
        return self.links.get(frozenset((a, b)), self.default_link)

    def with_requester(self, name: str) -> Cluster:
        return Cluster(self.devices, self.default_link, self.links, self.medium, name)

    def to_json(self) -> dict[str, Any]:
        links: dict[str, Any] = {
            "default": {"mbps": self.default_link.mbps, "latency_ms": self.default_link.latency_ms}
        }
        for pair, spec in sorted(self.links.items(), key=lambda kv: sorted(kv[0])):
            links["~".join(sorted(pair))] = {"mbps": spec.mbps, "latency_ms": spec.latency_ms}
        devices = []
        for d in self.devices:
            entry: dict[str, Any] = {"name": d.name, "gflops": d.gflops, "memory_mb": d.memory_mb}
            if d.backlog_s:
                entry["backlog_s"] = d.backlog_s
            devices.append(entry)
        return {"devices": devices, "links": links, "medium": self.medium, "requester": self.requester}


def _number(value: Any, where: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ClusterFileError(f"{where}: must be a number, got {value!r}")
    if positive and value <= 0:
        raise ClusterFileError(f"{where}: must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ClusterFileError(f"{where}: must be >= 0, got {value!r}")
    return float(value)


def _link(entry: Any, where: str) -> LinkSpec:
    if not isinstance(entry, Mapping):
        raise ClusterFileError(f"{where}: must be an object with mbps and latency_ms")
    for key in ("mbps", "latency_ms"):
        if key not in entry:
            raise ClusterFileError(f"{where}.{key}: missing")
    _number(entry.get("jitter_ms", 0.0), f"{where}.jitter_ms", positive=False)
    if _number(entry.get("loss_pct", 0.0), f"{where}.loss_pct", positive=False) >= 100:
        raise ClusterFileError(f"{where}.loss_pct: must be below 100")
    return LinkSpec(
        mbps=_number(entry["mbps"], f"{where}.mbps"),
        latency_ms=_number(entry["latency_ms"], f"{where}.latency_ms", positive=False),
    )


@dataclass(frozen=True)
class DeviceProfile:
    """An emulated board: its nominal speed (for plans and simulations) and the CPU quota
    that stands for it on the emulating machine (cores of this machine, see the README)."""

    gflops: float
    cpu: float
    memory_mb: int


# Quotas at GFLOPS_PER_CPU nominal GFLOP/s per CPU of the emulating machine, so that the
# boards keep their ratios; 4 x rpi4 take 1.2 CPUs, the most a 2-core machine gives nodes.
GFLOPS_PER_CPU = 20.0
DEVICE_PROFILES = {
    "rpi3": DeviceProfile(gflops=2.5, cpu=0.125, memory_mb=1024),
    "rpi4": DeviceProfile(gflops=6.0, cpu=0.3, memory_mb=2048),
    "jetson-nano": DeviceProfile(gflops=8.0, cpu=0.4, memory_mb=4096),
}


def device_cpu(entry: Mapping[str, Any], where: str = "device") -> float | None:
    """The CPU quota a device entry asks for (``cpu``, else its ``profile``'s), or None."""
    if "cpu" in entry:
        cpu = _number(entry["cpu"], f"{where}.cpu")
        if cpu > 64:
            raise ClusterFileError(f"{where}.cpu: {cpu} CPUs is more than any machine here has")
        return cpu
    profile = _profile(entry, where)
    return profile.cpu if profile is not None else None


def _profile(entry: Mapping[str, Any], where: str) -> DeviceProfile | None:
    if "profile" not in entry:
        return None
    name = entry["profile"]
    if name not in DEVICE_PROFILES:
        raise ClusterFileError(f"{where}.profile: {name!r} is not one of {', '.join(DEVICE_PROFILES)}")
    return DEVICE_PROFILES[name]


def _device(entry: Any, i: int) -> Device:
    where = f"devices[{i}]"
    if not isinstance(entry, Mapping):
        raise ClusterFileError(f"{where}: must be an object")
    if "name" not in entry:
        raise ClusterFileError(f"{where}.name: missing")
    profile = _profile(entry, where)
    cpu = device_cpu(entry, where)
    if "gflops" in entry:
        gflops = _number(entry["gflops"], f"{where}.gflops")
    elif profile is not None:
        gflops = profile.gflops
    elif cpu is not None:
        gflops = cpu * GFLOPS_PER_CPU
    else:
        raise ClusterFileError(f"{where}.gflops: missing (give gflops, a profile or a cpu quota)")
    name = entry["name"]
    if not isinstance(name, str) or not name or "~" in name:
        raise ClusterFileError(f"{where}.name: must be a non-empty string without '~', got {name!r}")
    memory = entry.get("memory_mb", profile.memory_mb if profile is not None else 1024)
    _number(memory, f"{where}.memory_mb")
    for key in ("uplink_mbps", "downlink_mbps"):
        if key in entry:
            _number(entry[key], f"{where}.{key}")
    return Device(
        name=name,
        gflops=gflops,
        memory_mb=int(memory),
        backlog_s=_number(entry.get("backlog_s", 0.0), f"{where}.backlog_s", positive=False),
    )


def _with_device_caps(raw_devices: list[Any], default: LinkSpec,
                      links: dict[frozenset[str], LinkSpec]) -> dict[frozenset[str], LinkSpec]:
    """Every pair's link at the slowest of its own rate and both ends' uplink/downlink caps
    (symmetric, as the planner's links are); unchanged when no device has caps."""
    caps = {e["name"]: min(float(e.get("uplink_mbps", math.inf)), float(e.get("downlink_mbps", math.inf)))
            for e in raw_devices}
    if all(math.isinf(c) for c in caps.values()):
        return links
    names = list(caps)
    out = dict(links)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pair = frozenset((a, b))
            spec = links.get(pair, default)
            mbps = min(spec.mbps, caps[a], caps[b])
            if mbps < spec.mbps or pair in links:
                out[pair] = LinkSpec(mbps, spec.latency_ms)
    return out


def cluster_from_dict(data: Any) -> Cluster:
    """A `Cluster` from the parsed JSON of a cluster file; `ClusterFileError` names the field."""
    if not isinstance(data, Mapping):
        raise ClusterFileError("cluster file: top level must be a JSON object")
    for key in ("devices", "links", "medium", "requester"):
        if key not in data:
            raise ClusterFileError(f"{key}: missing")
    raw_devices = data["devices"]
    if not isinstance(raw_devices, list):
        raise ClusterFileError("devices: must be a list")
    if not raw_devices:
        raise ClusterFileError("devices: a cluster needs at least one device")
    devices = tuple(_device(entry, i) for i, entry in enumerate(raw_devices))
    seen: set[str] = set()
    for i, d in enumerate(devices):
        if d.name in seen:
            raise ClusterFileError(f"devices[{i}].name: duplicate device name {d.name!r}")
        seen.add(d.name)
    names = seen
    raw_links = data["links"]
    if not isinstance(raw_links, Mapping):
        raise ClusterFileError("links: must be an object")
    if "default" not in raw_links:
        raise ClusterFileError("links.default: missing")
    default = _link(raw_links["default"], "links.default")
    links: dict[frozenset[str], LinkSpec] = {}
    for key, entry in raw_links.items():
        if key == "default":
            continue
        parts = str(key).split("~")
        if len(parts) != 2 or parts[0] == parts[1]:
            raise ClusterFileError(f"links.{key}: a link is named 'a~b' with two different devices")
        for part in parts:
            if part not in names:
                raise ClusterFileError(f"links.{key}: unknown device {part!r}")
        links[frozenset(parts)] = _link(entry, f"links.{key}")
    links = _with_device_caps(raw_devices, default, links)
    medium = data["medium"]
    if medium not in MEDIA:
        raise ClusterFileError(f"medium: must be one of {', '.join(MEDIA)}, got {medium!r}")
    requester = data["requester"]
    if not isinstance(requester, str) or requester not in names:
        raise ClusterFileError(f"requester: {requester!r} is not one of the devices")
    return Cluster(devices, default, links, medium, requester)


def available_clusters() -> list[str]:
    """Bare names of the example cluster files shipped with meshci."""
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.json"))


def load_cluster(source: str | Path | Mapping[str, Any]) -> Cluster:
    """A cluster from a dict, a JSON file path, or the bare name of a shipped example
    (``mixed-4``) or a generated one (``pi-16-shared``, ``pi-64-switched-50``, see
    `generated_cluster`)."""
    if isinstance(source, Mapping):
        return cluster_from_dict(source)
    path = Path(source)
    if not path.exists():
        shipped = CLUSTER_DIR / f"{source}.json"
        if shipped.exists():
            path = shipped
        else:
            generated = generated_cluster(str(source))
            if generated is not None:
                return generated
            known = ", ".join(available_clusters())
            raise ClusterFileError(
                f"cluster: no file {str(source)!r} and no shipped cluster of that name "
                f"(shipped: {known}; generated: pi-N-shared|switched[-MBPS])"
            )
    return cluster_from_dict(read_cluster_file(path))


def read_cluster_file(path: Path) -> Any:
    """The parsed JSON of a cluster file; `ClusterFileError` with one clear line otherwise."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        # a syntax error in the user's file: report it as a cluster-file error with its position
        raise ClusterFileError(f"cluster file {path}: not valid JSON ({exc})") from exc
    except OSError as exc:
        # unreadable path (directory, permissions): one clear line instead of a trace
        raise ClusterFileError(f"cluster file {path}: {exc.strerror}") from exc


# Effective GFLOP/s of Pi-class boards on fp32 CNN inference with PyTorch (rough, for planning
# and simulation only; real nodes measure their own curves).
PI_CLASS_GFLOPS = {"pi5": 12.0, "pi4": 6.0, "pi3": 2.5, "zero2": 1.5}


def pi_cluster(
    n: int,
    *,
    mbps: float = 100.0,
    latency_ms: float = 2.0,
    medium: str = "switched",
    heterogeneous: bool = True,
) -> Cluster:
    """An N-device Pi-class cluster for benchmarks: a repeating mix pi4, pi3, pi5, pi4, ...
    (or all pi4 when not heterogeneous); the first device is the requester."""
    if n < 1:
        raise ClusterFileError("devices: a cluster needs at least one device")
    kinds = ["pi4", "pi3", "pi5", "pi4"] if heterogeneous else ["pi4"]
    devices = tuple(
        Device(f"{kinds[i % len(kinds)]}-{i:02d}", PI_CLASS_GFLOPS[kinds[i % len(kinds)]], 2048)
        for i in range(n)
    )
    return Cluster(devices, LinkSpec(mbps, latency_ms), {}, medium, devices[0].name)


def generated_cluster(name: str) -> Cluster | None:
    """``pi-N-MEDIUM[-MBPS]``, e.g. ``pi-16-shared`` or ``pi-64-switched-50`` (None if the name
    does not have that form)."""
    parts = name.split("-")
    if len(parts) not in (3, 4) or parts[0] != "pi" or not parts[1].isdigit() or parts[2] not in MEDIA:
        return None
    mbps = 100.0
    if len(parts) == 4:
        try:
            mbps = float(parts[3])
        except ValueError:
            # not a number: the name is not one of ours
            return None
    return pi_cluster(int(parts[1]), mbps=mbps, medium=parts[2])


def random_cluster(
    n: int,
    rng: random.Random,
    *,
    speed_spread: float = 8.0,
    link_spread: float = 10.0,
    medium: str | None = None,
    backlog: bool = True,
) -> Cluster:
    """A random heterogeneous cluster for tests: speeds spread up to ``speed_spread`` x,
    access bandwidths up to ``link_spread`` x (a pair's link is the slower access link),
    some devices busy with earlier work."""
    devices = []
    access = []
    for i in range(n):
        gflops = 1.0 * speed_spread ** rng.random()
        busy = rng.random() * 0.05 if backlog and rng.random() < 0.3 else 0.0
        devices.append(Device(f"d{i}", round(gflops, 3), 1024, round(busy, 4)))
        access.append((10.0 * link_spread ** rng.random(), 1.0 + 4.0 * rng.random()))
    links = {}
    for i in range(n):
        for j in range(i + 1, n):
            mbps = min(access[i][0], access[j][0])
            lat = max(access[i][1], access[j][1])
            links[frozenset((f"d{i}", f"d{j}"))] = LinkSpec(round(mbps, 3), round(lat, 3))
    chosen = medium if medium is not None else rng.choice(MEDIA)
    return Cluster(tuple(devices), LinkSpec(100.0, 2.0), links, chosen, f"d{rng.randrange(n)}")
