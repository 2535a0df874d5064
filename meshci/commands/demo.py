"""`meshci demo`: a local mesh on this machine, end to end.

Starts N node processes on 127.0.0.1 with a generated secret, emulates heterogeneous
device speeds with CPU quotas when it can (root and a cgroup cpu controller), waits for
the mesh to form, sends requests from two different nodes, and prints the plan, each
device's share of the work, the latency against the same request on one device
(`local`), and the exactness check. Everything is torn down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from meshci.errors import MeshciError

log = logging.getLogger(__name__)

DEFAULT_QUOTAS = (0.3, 0.5, 0.5, 0.7)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="start a local mesh and run requests through it",
                              description="Start a local mesh of node processes and run requests.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--devices", type=int, default=4, help="number of local nodes (default 4)")
    group.add_argument("--cluster", type=Path, metavar="FILE",
                       help="cluster file: one node per device, speeds relative to its gflops")
    p.add_argument("--model", default="resnet34", help="model (default resnet34)")
    p.add_argument("--strategy", default="edgeci", help="a strategy or `all` (default edgeci)")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                   help="input size (default 224 224)")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when a distributed result differs from one device's "
                        "(the check itself always runs and is printed)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _device_specs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(name, relative speed in (0, 1]) per node."""
    if args.cluster is not None:
        from meshci.cost import load_cluster

        cluster = load_cluster(args.cluster)
        fastest = max(d.gflops for d in cluster.devices)
        return [(d.name, d.gflops / fastest) for d in cluster.devices]
    if not 2 <= args.devices <= 16:
        raise MeshciError("--devices must be between 2 and 16")
    top = max(DEFAULT_QUOTAS)
    return [(f"dev{i + 1}", DEFAULT_QUOTAS[i % len(DEFAULT_QUOTAS)] / top) for i in range(args.devices)]


def run(args: argparse.Namespace) -> int:
    from meshci.planning import STRATEGIES

    strategies = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    for s in strategies:
        if s not in STRATEGIES:
            raise MeshciError(f"unknown strategy {s!r} (known: {', '.join(STRATEGIES)}, all)")
    specs = _device_specs(args)
    out = sys.stdout if not args.json else sys.stderr
    began = time.perf_counter()
    with ExitStack() as stack:
        results = _run_mesh(stack, args, specs, strategies, out)
    summary = {"results": results, "wall_s": time.perf_counter() - began}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"\ndemo finished in {summary['wall_s']:.1f} s; mesh torn down", file=out)
    exact = all(r["check_ok"] for r in results)
    return 1 if args.check and not exact else 0


def _run_mesh(stack: ExitStack, args: argparse.Namespace, specs: list[tuple[str, float]],
              strategies: list[str], out: Any) -> list[dict[str, Any]]:
    from meshci.node.local import LocalMesh
    from meshci.testbed.cpu import CpuQuota, cgroup_support

    mesh = stack.enter_context(LocalMesh.create())
    reason = cgroup_support()
    top_quota = max(DEFAULT_QUOTAS)
    if reason is None:
        print("CPU quotas: " + ", ".join(f"{n} {rel * top_quota:.2f} CPU" for n, rel in specs)
              + " (heterogeneous speeds emulated with cgroups)", file=out)
    else:
        print(f"CPU quotas not available ({reason}): device speeds are NOT emulated; every node "
              "shares this machine's cores and states its speed as given", file=out)
    base = _base_gflops(out)
    nodes = mesh.add_many([(name, base * rel * top_quota) for name, rel in specs])
    if reason is None:
        for node, (_, rel) in zip(nodes, specs):
            quota = stack.enter_context(CpuQuota(node.name, rel * top_quota))
            quota.add(node.pid)
    for node in nodes:
        print(f"  node {node.name} at {node.address} (pid {node.pid})", file=out)
    return asyncio.run(_requests(mesh, nodes, args, strategies, out))


def _base_gflops(out: Any) -> float:
    """One core's effective GFLOP/s (profiled once, cached by the planner's profiling)."""
    from meshci.cost.profiling import default_data_dir
    from meshci.node.runtime import measure_gflops

    print("profiling this machine (cached after the first run)...", file=out)
    return measure_gflops(default_data_dir(), threads=1)


async def _requests(mesh: Any, nodes: list[Any], args: argparse.Namespace, strategies: list[str],
                    out: Any) -> list[dict[str, Any]]:
    from meshci.node.client import infer, stats
    from meshci.node.local import wait_formed

    secret = mesh.secret()
    await wait_formed([n.address for n in nodes], secret)
    print(f"mesh of {len(nodes)} nodes formed", file=out)
    size = (int(args.size[0]), int(args.size[1]))
    requesters = [nodes[0], nodes[len(nodes) // 2]]
    # warm-up: every node builds the model once (not timed)
    for via in requesters:
        await infer(via.address, model=args.model, strategy="edgeci", size=size, secret=secret)
    results = []
    for via in requesters:
        single, _ = await infer(via.address, model=args.model, strategy="local", size=size, secret=secret,
                                input_seed=1)
        for strategy in strategies:
            meta, _ = await infer(via.address, model=args.model, strategy=strategy, size=size,
                                  secret=secret, input_seed=1, check=True)
            meta["local_latency_s"] = single["latency_s"]
            meta["speedup"] = single["latency_s"] / meta["latency_s"]
            meta["relayed_boundary_bytes"] = (await stats(via.address, secret=secret))["relayed_boundary_bytes"]
            results.append(meta)
            _print_result(meta, out)
    return results


def _print_result(meta: dict[str, Any], out: Any) -> None:
    print(f"\n== {meta['model']} {meta['plan']['input_shape'][1]}x{meta['plan']['input_shape'][2]} "
          f"via {meta['requester']}, strategy {meta['strategy']} ({meta['routing']} routing)", file=out)
    for i, block in enumerate(meta["plan"]["blocks"]):
        tiles = ", ".join(f"{t['device']} rows {t['rows'][0]}-{t['rows'][1]}"
                          + (f" cols {t['cols'][0]}-{t['cols'][1]}" if "cols" in t else "")
                          for t in block["tiles"])
        print(f"  block {i} segments {block['segments'][0]}-{block['segments'][1]}: {tiles}", file=out)
    shares = ", ".join(f"{d} {s * 100:.0f}%" for d, s in meta["shares"].items())
    print(f"  share of the work: {shares}", file=out)
    print(f"  latency {meta['latency_s'] * 1000:.0f} ms vs one device {meta['local_latency_s'] * 1000:.0f} ms "
          f"(x{meta['speedup']:.2f}); auction rounds {meta['auction_rounds']}", file=out)
    verdict = "exact" if meta["check_ok"] else "MISMATCH"
    print(f"  check: max |mesh - one device| = {meta['max_abs_diff']:.2e} ({verdict})", file=out)
