#!/usr/bin/env python
"""Simulated speedup over ``local`` for every strategy, 2..64 devices.

VGG-16 and ResNet-34 at 224 x 224 on heterogeneous Pi-class clusters (`pi_cluster`:
Pi 4 / Pi 3 / Pi 5 mix, the first device is the requester) at 50 and 100 Mbit/s, shared
(one WiFi-like channel) and switched medium. Each plan is replayed by the event-driven
simulator; the speedup is local's simulated latency over the strategy's, in the same run.

    .venv/bin/python tools/bench_simulate.py [--devices 2 4 8 16 32 64] [--strategies ...]
"""

from __future__ import annotations

import argparse

from meshci.cost import CostModel, pi_cluster
from meshci.models import build_model
from meshci.planning import STRATEGIES, make_plan
from meshci.simulate import simulate_plan
from meshci.trunk import extract_trunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--strategies", nargs="+", default=[s for s in STRATEGIES if s != "local"])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet34"])
    args = parser.parse_args()
    header = f"{'model':<9} {'medium':<8} {'Mbit/s':>6} {'devices':>7} {'local s':>8} " + " ".join(
        f"{s:>10}" for s in args.strategies
    )
    print("speedup over local (simulated)")
    print(header)
    for name in args.models:
        trunk = extract_trunk(build_model(name), (3, 224, 224), name)
        for medium in ("switched", "shared"):
            for mbps in (100.0, 50.0):
                for n in args.devices:
                    cluster = pi_cluster(n, mbps=mbps, medium=medium)
                    model = CostModel(trunk, cluster)
                    local = simulate_plan(trunk, cluster, make_plan(trunk, cluster, "local", model), model).latency_s
                    cells = []
                    for strategy in args.strategies:
                        plan = make_plan(trunk, cluster, strategy, model)
                        latency = simulate_plan(trunk, cluster, plan, model).latency_s
                        cells.append(f"{local / latency:>10.2f}")
                    print(f"{name:<9} {medium:<8} {mbps:>6.0f} {n:>7} {local:>8.3f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
