#!/usr/bin/env python
"""Planning time of ``edgeci`` (DPFL + AWAS) and ``aofl`` (recursive DP), side by side.

ResNet-34 and VGG-16 at 224 x 224 on heterogeneous Pi-class clusters (pi_cluster: a mix of
Pi 4, Pi 3, Pi 5 on a 100 Mbit/s switch) of 4, 16 and 64 devices. Each figure is the
median of --repeats full ``make_plan`` calls after one warm-up (the per-model strip tables
are built once per trunk and cached, as in a node). Targets: edgeci <= 50 ms at 16
devices and <= 500 ms at 64.

    .venv/bin/python tools/bench_planning.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from meshci.cost import Cluster, CostModel, pi_cluster
from meshci.models import build_model
from meshci.planning import make_plan
from meshci.trunk import Trunk, extract_trunk

TARGET_MS = {16: 50.0, 64: 500.0}


def timed(trunk: Trunk, cluster: Cluster, strategy: str, repeats: int) -> tuple[float, float, float]:
    """(median wall ms, median CPU ms of this process, predicted latency s)."""
    make_plan(trunk, cluster, strategy)  # warm-up
    wall, cpu = [], []
    latency = 0.0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = make_plan(trunk, cluster, strategy, CostModel(trunk, cluster))
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
        latency = plan.predicted_latency_s
    return statistics.median(wall), statistics.median(cpu), latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    print("wall ms: median wall-clock time of make_plan; cpu ms: this process's CPU time (steadier on a shared host)")
    print("load average (1, 5, 15 min) at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"{'model':<9} {'devices':>7} {'edgeci wall':>11} {'edgeci cpu':>10} {'aofl wall':>9} {'aofl cpu':>8}"
          f" {'edgeci/aofl':>11} {'target':>7} {'edgeci pred s':>13} {'aofl pred s':>11}")
    for name in ("resnet34", "vgg16"):
        trunk = extract_trunk(build_model(name), (3, 224, 224), name)
        for n in args.devices:
            cluster = pi_cluster(n)
            e_ms, e_cpu, e_lat = timed(trunk, cluster, "edgeci", args.repeats)
            a_ms, a_cpu, a_lat = timed(trunk, cluster, "aofl", args.repeats)
            target = TARGET_MS.get(n)
            verdict = "-" if target is None else ("ok" if e_ms <= target else "MISS")
            print(f"{name:<9} {n:>7} {e_ms:>11.1f} {e_cpu:>10.1f} {a_ms:>9.1f} {a_cpu:>8.1f}"
                  f" {e_ms / a_ms:>11.2f} {verdict:>7} {e_lat:>13.3f} {a_lat:>11.3f}")
    print("load average (1, 5, 15 min) at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
