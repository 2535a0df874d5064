"""`meshci simulate`: replay plans event by event on a (possibly large) simulated cluster."""

from __future__ import annotations

import argparse
import json
from typing import Any

from meshci.commands.plan import add_common, load_inputs, strategies
from meshci.cost.model import CostModel
from meshci.planning import make_plan
from meshci.simulate import SimulationResult, simulate_plan


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="replay a strategy's plan event by event (device queues, link or shared-medium contention)",
        description=(
            "Plan the model on the cluster with one strategy (or all) and replay the plan event by event: "
            "compute queues per device, per-link or shared-medium contention, no barrier between blocks. "
            "Prints the simulated latency next to the planner's prediction and the speedup over local."
        ),
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trunk, cluster = load_inputs(args)
    model = CostModel(trunk, cluster)
    names = strategies(args)
    local = simulate_plan(trunk, cluster, make_plan(trunk, cluster, "local", model), model)
    results: list[tuple[SimulationResult, float]] = []
    for name in names:
        plan = make_plan(trunk, cluster, name, model)
        results.append((simulate_plan(trunk, cluster, plan, model), plan.planning_ms))
    if args.json:
        out: list[dict[str, Any]] = []
        for result, planning_ms in results:
            entry = result.to_json()
            entry["planning_ms"] = planning_ms
            entry["speedup_over_local"] = local.latency_s / result.latency_s
            out.append(entry)
        print(json.dumps(out if args.strategy == "all" else out[0], indent=1))
        return 0
    print(
        f"{trunk.name} {trunk.input_shape[1]}x{trunk.input_shape[2]} on {len(cluster.devices)} devices, "
        f"{cluster.medium} medium, requester {cluster.requester}"
    )
    print(f"{'strategy':<13} {'simulated ms':>12} {'predicted ms':>12} {'speedup':>8} {'messages':>8} {'MB moved':>9}")
    for result, _ in results:
        print(
            f"{result.strategy:<13} {result.latency_s * 1e3:>12.1f} {result.predicted_latency_s * 1e3:>12.1f} "
            f"{local.latency_s / result.latency_s:>8.2f} {result.messages:>8} {result.bytes_moved / 1e6:>9.2f}"
        )
    return 0
