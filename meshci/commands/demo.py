"""`meshci demo`: a local mesh on this machine, end to end.

Starts N node processes on 127.0.0.1 with a generated secret, emulates heterogeneous
device speeds with CPU quotas when it can (root and a cgroup cpu controller): each node
starts inside its cgroup (short CFS period) and profiles its own speed there, as a real
device would. It waits for the mesh to form, times every device alone (`local`), sends
requests from two different nodes, and prints the plan, each device's share of the work,
the latency against the requester alone and against the fastest device alone (medians,
measured in the same run), and the exactness check. Everything is torn down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from meshci.errors import MeshciError

log = logging.getLogger(__name__)

# CPUs per node: together about half of a 2-core machine, leaving the rest to the demo
# client and the OS, so that each node really gets its quota; the slowest is clearly slow
DEFAULT_QUOTAS = (0.15, 0.25, 0.25, 0.35)
QUOTA_BUDGET_CPUS = 1.2  # the quotas are scaled to sum to at most this many CPUs ...
QUOTA_BUDGET_SHARE = 0.6  # ... and at most this share of the machine's cores
# a short CFS period: a 0.15-CPU node runs 1 ms of every 6.7 ms, steadily slower, instead
# of running at full speed for 15 ms and stalling 85 ms (the default 100 ms period). The
# shortest period that gives the smallest quota the kernel's 1 ms minimum, at least 5 ms.
MIN_PERIOD_US = 5_000
KERNEL_MIN_QUOTA_US = 1_000
MIN_QUOTA_CPUS = 0.05

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="start a local mesh and run requests through it",
                              description="Start a local mesh of node processes and run requests.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--devices", type=int, default=4, help="number of local nodes (default 4)")
    group.add_argument("--cluster", type=Path, metavar="FILE",
                       help="cluster file: one node per device, speeds relative to its gflops")
    p.add_argument("--model", default="vgg16",
                   help="model (default vgg16: enough compute per block boundary for the mesh to pay off "
                        "on a 2-core machine; resnet34 shows where it does not)")
    p.add_argument("--strategy", default="edgeci", help="a strategy or `all` (default edgeci)")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                   help="input size (default 224 224)")
    p.add_argument("--repeat", type=int, default=3,
                   help="requests per measurement; the median latency is reported (default 3)")
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


def quotas_for(relative: list[float], cores: int) -> list[float]:
    """CPUs per node for relative speeds (fastest 1.0): the default top quota, scaled down
    so that the sum stays within the budget, none below the kernel's minimum."""
    budget = min(QUOTA_BUDGET_CPUS, QUOTA_BUDGET_SHARE * cores)
    top = min(max(DEFAULT_QUOTAS), budget / sum(relative))
    return [max(MIN_QUOTA_CPUS, round(rel * top, 3)) for rel in relative]


def run(args: argparse.Namespace) -> int:
    from meshci.planning import STRATEGIES

    strategies = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    for s in strategies:
        if s not in STRATEGIES:
            raise MeshciError(f"unknown strategy {s!r} (known: {', '.join(STRATEGIES)}, all)")
    if not 1 <= args.repeat <= 20:
        raise MeshciError("--repeat must be between 1 and 20")
    specs = _device_specs(args)
    out = sys.stdout if not args.json else sys.stderr
    began = time.perf_counter()
    with ExitStack() as stack:
        summary = _run_mesh(stack, args, specs, strategies, out)
    summary["wall_s"] = time.perf_counter() - began
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"\ndemo finished in {summary['wall_s']:.1f} s; mesh torn down", file=out)
    exact = all(r["check_ok"] for r in summary["results"])
    return 1 if args.check and not exact else 0


def _run_mesh(stack: ExitStack, args: argparse.Namespace, specs: list[tuple[str, float]],
              strategies: list[str], out: Any) -> dict[str, Any]:
    mesh, nodes = start_quota_mesh(stack, specs, out)
    return asyncio.run(_requests(mesh, nodes, args, strategies, out))


def start_quota_mesh(stack: ExitStack, specs: list[tuple[str, float]], out: Any) -> tuple[Any, list[Any]]:
    """A local mesh of one node per (name, relative speed), each started inside a CPU quota
    scaled from its relative speed where cgroups allow (else unthrottled, said on `out`);
    torn down by `stack`. Returns the mesh and its nodes in the order of `specs`."""
    from meshci.node.local import LocalMesh, NodeSpec
    from meshci.testbed.cpu import CpuQuota, cgroup_support

    mesh = stack.enter_context(LocalMesh.create())
    reason = cgroup_support()
    cores = os.cpu_count() or 1
    quotas = quotas_for([rel for _, rel in specs], cores)
    period_us = max(MIN_PERIOD_US, math.ceil(KERNEL_MIN_QUOTA_US / min(quotas)))
    node_specs = []
    if reason is None:
        print(f"CPU quotas ({cores} cores here, {period_us / 1000:.1f} ms period): "
              + ", ".join(f"{n} {q:.2f} CPU" for (n, _), q in zip(specs, quotas))
              + f" = {sum(quotas):.2f} CPU; each node starts inside its cgroup and profiles its own speed",
              file=out)
        for (name, _), cpus in zip(specs, quotas):
            quota = stack.enter_context(CpuQuota(name, cpus, period_us=period_us))
            assert quota.path is not None
            node_specs.append(NodeSpec(name, None, cgroup_procs=quota.path / "cgroup.procs"))
    else:
        print(f"CPU quotas not available ({reason}): device speeds are NOT emulated; every node "
              f"shares this machine's {cores} cores and profiles its own speed", file=out)
        node_specs = [NodeSpec(name, None) for name, _ in specs]
    # the fastest node first: the others join through it
    order = sorted(range(len(specs)), key=lambda i: -specs[i][1])
    print(f"starting {len(specs)} nodes (each profiles its speed first)...", file=out)
    started = mesh.start_together([node_specs[i] for i in order])
    by_name = {node.name: node for node in started}
    nodes = [by_name[name] for name, _ in specs]
    for node in nodes:
        print(f"  node {node.name} at {node.address} (pid {node.pid})", file=out)
    return mesh, nodes


async def _median_request(via: Any, args: argparse.Namespace, strategy: str,
                          secret: bytes) -> dict[str, Any]:
    """`args.repeat` timed requests (no check: the check runs the whole model again on the
    requester) and their median, by latency measured at the client."""
    from meshci.node.client import infer

    size = (int(args.size[0]), int(args.size[1]))
    metas = []
    for _ in range(args.repeat):
        meta, _ = await infer(via.address, model=args.model, strategy=strategy, size=size,
                              secret=secret, input_seed=1)
        metas.append(meta)
    metas.sort(key=lambda m: m["client_latency_s"])
    best = dict(metas[len(metas) // 2])
    best["latencies_s"] = [m["client_latency_s"] for m in metas]
    best["node_latencies_s"] = [m["latency_s"] for m in metas]
    return best


async def _requests(mesh: Any, nodes: list[Any], args: argparse.Namespace, strategies: list[str],
                    out: Any) -> dict[str, Any]:
    from meshci.node.client import infer, stats
    from meshci.node.local import wait_formed

    secret = mesh.secret()
    await wait_formed([n.address for n in nodes], secret, timeout=60.0)
    speeds = {n.name: (await stats(n.address, secret=secret))["gflops"] for n in nodes}
    print(f"mesh of {len(nodes)} nodes formed; measured speeds: "
          + ", ".join(f"{name} {g:.1f} GFLOP/s" for name, g in speeds.items()), file=out)
    size = (int(args.size[0]), int(args.size[1]))
    # warm-up, not timed: every node builds the model (with its head) at once, so that no
    # timed request pays a device's cold build
    await asyncio.gather(*(infer(n.address, model=args.model, strategy="local", size=size, secret=secret)
                           for n in nodes))
    alone = {}
    for n in nodes:
        alone[n.name] = (await _median_request(n, args, "local", secret))["client_latency_s"]
    fastest = min(alone, key=alone.__getitem__)
    print("each device alone (median of {}): ".format(args.repeat)
          + ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in alone.items())
          + f"; fastest {fastest}", file=out)
    requesters = [nodes[0], nodes[len(nodes) // 2]]
    results = []
    for via in requesters:
        for strategy in strategies:
            # not timed: plans once per device set, and the exactness check with the plan
            checked, _ = await infer(via.address, model=args.model, strategy=strategy, size=size,
                                     secret=secret, input_seed=1, check=True, details=True)
            before = [(await stats(n.address, secret=secret))["loop_cpu_s"] for n in nodes]
            meta = await _median_request(via, args, strategy, secret)
            after = [(await stats(n.address, secret=secret))["loop_cpu_s"] for n in nodes]
            meta["plan"] = checked["plan"]
            meta["check_ok"] = checked.get("check_ok", False)
            meta["max_abs_diff"] = checked.get("max_abs_diff", float("nan"))
            # event-loop CPU (framework work: messages, bookkeeping; not tile compute) per request
            meta["framework_cpu_s"] = {n.name: (a - b) / args.repeat for n, a, b in zip(nodes, after, before)}
            meta["local_latency_s"] = alone[via.name]
            meta["fastest_device"] = fastest
            meta["fastest_latency_s"] = alone[fastest]
            meta["speedup"] = alone[via.name] / meta["client_latency_s"]
            meta["speedup_vs_fastest"] = alone[fastest] / meta["client_latency_s"]
            meta["relayed_boundary_bytes"] = (await stats(via.address, secret=secret))["relayed_boundary_bytes"]
            results.append(meta)
            _print_result(meta, out)
    _print_summary(results, strategies, out)
    links: dict[str, dict[str, float]] = {}
    peak_rss: dict[str, float] = {}
    for n in nodes:
        view = await stats(n.address, secret=secret)
        peak_rss[n.name] = view["peak_rss_mb"]
        links[n.name] = {peer: spec["latency_ms"] for peer, spec in view["planned_links"].items()}
        print(f"  {n.name} measured links (per-message delivery, bandwidth as received; "
              f"tile overhead {view['advert'].get('tile_ms', 0.0):.1f} ms): "
              + ", ".join(f"{peer} {spec['latency_ms']:.1f} ms "
                          + (f"{spec['mbps']:.0f} Mbit/s" if spec["mbps"] > 0 else "(rate not measured)")
                          for peer, spec in sorted(view["planned_links"].items())), file=out)
    print("  peak resident memory: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in peak_rss.items()), file=out)
    return {"results": results, "alone_s": alone, "gflops": speeds, "fastest_device": fastest,
            "planned_link_ms": links, "peak_rss_mb": peak_rss}


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
    print(f"  latency at the client {meta['client_latency_s'] * 1000:.0f} ms (median of {len(meta['latencies_s'])}; "
          f"predicted {meta.get('predicted_latency_s', float('nan')) * 1000:.0f} ms) vs "
          f"requester alone {meta['local_latency_s'] * 1000:.0f} ms (x{meta['speedup']:.2f}), vs fastest "
          f"device alone ({meta['fastest_device']}) {meta['fastest_latency_s'] * 1000:.0f} ms "
          f"(x{meta['speedup_vs_fastest']:.2f}); auction rounds {meta['auction_rounds']}", file=out)
    print("  framework CPU per request (event loops, not tile compute): "
          + ", ".join(f"{d} {s * 1000:.1f} ms" for d, s in meta["framework_cpu_s"].items()), file=out)
    verdict = "exact" if meta["check_ok"] else "MISMATCH"
    print(f"  check: max |mesh - one device| = {meta['max_abs_diff']:.2e} ({verdict})", file=out)


def _print_summary(results: list[dict[str, Any]], strategies: list[str], out: Any) -> None:
    print("\nsummary (median latency at the client; speed-up against the requester alone / the fastest device alone):",
          file=out)
    for meta in results:
        print(f"  via {meta['requester']:8s} {meta['strategy']:10s} {meta['client_latency_s'] * 1000:7.0f} ms  "
              f"x{meta['speedup']:.2f} / x{meta['speedup_vs_fastest']:.2f}  "
              f"{'exact' if meta['check_ok'] else 'MISMATCH'}", file=out)
