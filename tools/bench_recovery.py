#!/usr/bin/env python3
"""Benchmark of recovery: the extra client latency of a request that loses one of 4 peers
half way, against one that does not.

A 4-node loopback mesh of real node processes (a requester and three workers, every one
computing), VGG-16, strategy ``edgeci`` by default. First ``--runs`` undisturbed requests
give the baseline median client latency; then ``--runs`` requests each lose a worker
(SIGKILL) half that median after they were sent; each lost worker is replaced by a fresh
one, warmed by one request that is not counted, so every measured request starts on 4
nodes. Every answer is checked against a single-device forward pass (``--check``).

    .venv/bin/python tools/bench_recovery.py [--size 128] [--runs 5] [--strategy edgeci] [--json]

The figures are this machine's (loopback, the nodes sharing its cores): compare the two
medians, not the absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
from typing import Any

from meshci.node.client import infer
from meshci.node.local import LocalMesh, NodeProcess, start_node, wait_formed


async def _request(node: NodeProcess, secret: bytes, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    meta, _ = await infer(node.address, model=args.model, size=(args.size, args.size), secret=secret,
                          strategy=args.strategy, input_seed=seed, check=True, deadline=args.deadline)
    if not meta.get("check_ok"):
        raise SystemExit(f"request {seed}: not exact (max |diff| {meta.get('max_abs_diff')})")
    return meta


async def _bench(mesh: LocalMesh, args: argparse.Namespace) -> dict[str, Any]:
    secret = mesh.secret()
    requester, workers = mesh.nodes[0], mesh.nodes[1:]
    await wait_formed([n.address for n in mesh.nodes], secret)
    for seed in range(2):  # models built, plans and awards standing
        await _request(requester, secret, args, seed)
    base = [await _request(requester, secret, args, 100 + i) for i in range(args.runs)]
    base_s = statistics.median(m["client_latency_s"] for m in base)
    lost: list[dict[str, Any]] = []
    for i in range(args.runs):
        victim = workers[i % len(workers)]
        task = asyncio.create_task(_request(requester, secret, args, 200 + i))
        await asyncio.sleep(base_s / 2)
        os.kill(victim.pid, signal.SIGKILL)
        lost.append(await task)
        name = f"r{i}"
        fresh = start_node(mesh.node_args(name, gflops=args.gflops, join=requester.address),
                           log_path=mesh.directory / f"{name}.log")
        mesh.nodes.append(fresh)
        workers[workers.index(victim)] = fresh
        await wait_formed([requester.address] + [w.address for w in workers], secret, timeout=60.0)
        await _request(requester, secret, args, 300 + i)  # the fresh node builds its model: not counted
    lost_s = statistics.median(m["client_latency_s"] for m in lost)
    recovered = [m for m in lost if m["attempts"] > 1]
    return {
        "model": args.model, "size": args.size, "strategy": args.strategy, "runs": args.runs,
        "baseline_median_s": base_s,
        "lost_one_median_s": lost_s,
        "extra_s": lost_s - base_s,
        "recovered": len(recovered),  # of the lossy runs, those the kill hit mid-request
        "recovered_median_s": statistics.median(m["client_latency_s"] for m in recovered) if recovered else None,
        "baseline_s": [m["client_latency_s"] for m in base],
        "lost_one_s": [m["client_latency_s"] for m in lost],
        "attempts": [m["attempts"] for m in lost],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--strategy", default="edgeci")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gflops", type=float, default=1.0, help="every node's declared speed")
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.runs < 1 or args.size < 32:
        parser.error("--runs must be at least 1 and --size at least 32")
    with LocalMesh.create() as mesh:
        mesh.add("q", gflops=args.gflops)
        for i in range(3):
            mesh.add(f"w{i}", gflops=args.gflops)
        try:
            result = asyncio.run(_bench(mesh, args))
        except BaseException:
            for node in mesh.nodes:
                sys.stderr.write(f"--- {node.name} ---\n{node.log_text()[-2000:]}\n")
            raise
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{args.model} {args.size}x{args.size} {args.strategy}, 4 nodes, {args.runs} runs each:")
        print(f"  undisturbed:         median {result['baseline_median_s'] * 1e3:8.1f} ms")
        print(f"  one peer lost half way: median {result['lost_one_median_s'] * 1e3:8.1f} ms "
              f"({result['recovered']} of {args.runs} re-run on the survivors)")
        print(f"  extra latency:       {result['extra_s'] * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
