"""`meshci plan`: the plan of one or every strategy for a model on a cluster file."""

from __future__ import annotations

import argparse
import json
from typing import Any

from meshci.cost import Cluster, load_cluster
from meshci.cost.model import CostModel
from meshci.models import build_model
from meshci.planning import STRATEGIES, Plan, make_plan
from meshci.trunk import Trunk, extract_trunk


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in model name or package.module:callable")
    p.add_argument(
        "--cluster",
        required=True,
        help="cluster file (JSON), a shipped example by name (mixed-4, mixed-4-wifi, pi4-homogeneous-4) "
        "or a generated one (pi-N-shared|switched[-MBPS])",
    )
    p.add_argument(
        "--strategy", default="edgeci", choices=[*STRATEGIES, "all"], help="planning strategy, or all (edgeci)"
    )
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), default=[224, 224], help="input size (224 224)")
    p.add_argument("--json", action="store_true", help="print JSON (a list with --strategy all)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="plan a model on a cluster: blocks, tiles, predicted finish times and latency",
        description=(
            "Cut the model's trunk into fused blocks and assign each block's tiles to the cluster's devices "
            "with one strategy (or all), and print the plan: per block the segments, per tile the device and rows, "
            "each device's predicted finish time, the predicted latency and the planning time."
        ),
    )
    add_common(p)
    p.set_defaults(func=run)


def load_inputs(args: argparse.Namespace) -> tuple[Trunk, Cluster]:
    cluster = load_cluster(args.cluster)
    h, w = args.size
    trunk = extract_trunk(build_model(args.model), (3, h, w), args.model)
    return trunk, cluster


def strategies(args: argparse.Namespace) -> list[str]:
    return list(STRATEGIES) if args.strategy == "all" else [args.strategy]


def format_plan(plan: Plan) -> str:
    lines = [
        f"{plan.strategy}: {plan.model} {plan.input_shape[1]}x{plan.input_shape[2]}, requester {plan.requester}, "
        f"routing {plan.routing}",
        f"  predicted latency {plan.predicted_latency_s * 1e3:.1f} ms, planning {plan.planning_ms:.1f} ms"
        + (f", auction rounds {plan.auction_rounds} (bidders simulated from the cluster file)"
           if plan.auction_rounds else ""),
    ]
    for i, block in enumerate(plan.blocks):
        lines.append(f"  block {i}: segments [{block.start}, {block.end})")
        for tile in block.tiles:
            r = tile.region
            cols = "" if r.c0 == 0 and plan.strategy != "deepthings" else f" cols {r.c0}:{r.c1}"
            lines.append(f"    {tile.device:<14} rows {r.r0}:{r.r1}{cols}")
        finish = ", ".join(f"{d} {t * 1e3:.1f}" for d, t in sorted(block.finish_s.items(), key=lambda kv: kv[1]))
        lines.append(f"    finish (ms): {finish}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    trunk, cluster = load_inputs(args)
    model = CostModel(trunk, cluster)
    plans = [make_plan(trunk, cluster, s, model) for s in strategies(args)]
    if args.json:
        out: Any = [p.to_json() for p in plans]
        print(json.dumps(out if args.strategy == "all" else out[0], indent=1))
    else:
        print("\n\n".join(format_plan(p) for p in plans))
    return 0
