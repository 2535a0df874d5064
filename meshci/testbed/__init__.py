"""The emulation testbed: hosts as network namespaces on a bridge, shaped links, CPU quotas,
and probes to measure what was built (root only; every part says by trying whether it works).

- `netns`: `topology(n)` builds N hosts on one bridge and always tears them down.
- `shaping`: `Shaper.shape(a, b, LinkShape(rate_mbit, delay_ms, loss_pct)) -> ShapingReport`:
  htb for rate, netem for delay/loss where the kernel has it, else a delay relay (`relay`)
  and random drop by a classic-BPF classifier (`bpf_loss`).
- `cpu`: `CpuQuota(name, cpus)` (cgroup v1 or v2), `cgroup_support()`.
- `probe`: TCP round-trip time, bulk throughput and UDP loss without ping (import it from
  `meshci.testbed.probe`; it also runs as `python -m meshci.testbed.probe`).
"""

from meshci.testbed.cpu import CpuQuota, cgroup_support
from meshci.testbed.errors import TestbedError
from meshci.testbed.netns import Host, Topology, netns_support, topology
from meshci.testbed.shaping import LinkShape, Shaper, ShapingReport

__all__ = [
    "CpuQuota",
    "Host",
    "LinkShape",
    "Shaper",
    "ShapingReport",
    "TestbedError",
    "Topology",
    "cgroup_support",
    "netns_support",
    "topology",
]
