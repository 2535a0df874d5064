#!/usr/bin/env python
"""Benchmark of the mesh node on loopback (figures measured in one run, printed as ratios).

1. Framework overhead on a 4-node mesh: latency minus the critical path's compute and
   transfer time (measured by the nodes along the request's dependency chain, head
   included), as a share of latency. Target: under 5%. Reported for the whole request and
   for its execution phase alone (without planning and the auction). That difference also
   holds the time a node waits to be scheduled when the nodes outnumber the cores, so the
   CPU the nodes' event loops spend (the framework's own work) is reported beside it.
2. The latency AWAS adds to a request: the auction's network rounds, and the whole
   auction step (items, rounds, levelling the strips into the plan), against the measured
   round-trip time between the nodes. Target: at most 3 round trips + 2 ms.
3. Peak resident memory of a node serving VGG-16 and one serving ResNet-34, as a worker
   and as the requester (which holds the head). Target: under 600 MB for VGG-16.
4. The requester's CPU for AWAS per request, in-process (no sockets): the auctioneer's
   rounds, encoding its messages to the remote bidders and decoding their answers (JSON,
   as on the wire), its own bidder, and levelling the strips into the plan
   (`awarded_plan`); the remote bidders' CPU is not counted. ResNet-34 at 224x224 on the
   DPFL plan of 4 devices at 1.5/2.5/2.5/3.5 GFLOP/s, as in the demo.

Usage: tools/bench_node.py [--model resnet34] [--size 224] [--requests 7] [--nodes 4]
                           [--skip-memory] [--awas-only]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshci.node.client import infer, stats  # noqa: E402
from meshci.node.local import LocalMesh, wait_formed  # noqa: E402
from meshci.planning import STRATEGIES  # noqa: E402


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def overhead_and_auction(mesh: LocalMesh, model: str, size: tuple[int, int], n: int) -> None:
    secret = mesh.secret()
    via = mesh.nodes[0].address
    for strategy in ("edgeci", "local", "modnn", "edgeci"):  # warm-up: every node builds the model
        await infer(via, model=model, strategy=strategy, size=size, secret=secret)
    rows = []
    loop_before = [(await stats(node.address, secret=secret))["loop_cpu_s"] for node in mesh.nodes]
    for i in range(n):
        meta, _ = await infer(via, model=model, strategy="edgeci", size=size, secret=secret, input_seed=i)
        rows.append(meta)
    loop_after = [(await stats(node.address, secret=secret))["loop_cpu_s"] for node in mesh.nodes]
    loop_cpu = sum(a - b for a, b in zip(loop_after, loop_before)) / n
    latency = [m["latency_s"] for m in rows]
    path = [m["critical_path_s"] for m in rows]
    share = [(m["latency_s"] - m["critical_path_s"]) / m["latency_s"] for m in rows]
    exec_share = [(m["execution_s"] + m["head_s"] - m["critical_path_s"]) / (m["execution_s"] + m["head_s"])
                  for m in rows]
    print(f"[1] framework overhead, {model} {size[0]}x{size[1]}, edgeci on {len(mesh.nodes)} loopback "
          f"nodes, {n} requests")
    print(f"    latency median {median(latency) * 1e3:.1f} ms, critical path (compute+transfer) "
          f"median {median(path) * 1e3:.1f} ms")
    print(f"    overhead share of latency: median {median(share) * 100:.1f}% "
          f"(min {min(share) * 100:.1f}%, max {max(share) * 100:.1f}%)   target < 5%")
    print(f"    execution phase only (no planning/auction): median {median(exec_share) * 100:.1f}%")
    print(f"    framework CPU (event-loop threads of all {len(mesh.nodes)} nodes, heartbeats included): "
          f"{loop_cpu * 1e3:.1f} ms per request = {loop_cpu / median(latency) * 100:.1f}% of the median latency")
    print(f"    planning (DPFL, cached per device set): median {median([m['planning_s'] for m in rows]) * 1e3:.2f} ms; "
          f"devices used: {sorted({d for m in rows for d in m['devices']})}")

    print("    per strategy (3 requests each): overhead share median, blocks, devices")
    for strategy in STRATEGIES:
        metas = [(await infer(via, model=model, strategy=strategy, size=size, secret=secret, input_seed=i))[0]
                 for i in range(3)]
        shares = [(m["latency_s"] - m["critical_path_s"]) / m["latency_s"] for m in metas]
        print(f"      {strategy:10s} {median(shares) * 100:5.1f}%  latency {median([m['latency_s'] for m in metas]) * 1e3:6.1f} ms"
              f"  blocks {metas[0]['blocks']:2d}  devices {len(metas[0]['devices'])}")

    rtts = []
    for node in mesh.nodes:
        view = await stats(node.address, secret=secret)
        rtts += [2.0 * spec["latency_ms"] for spec in view["links"].values()]
    rtt_ms = median(rtts)
    planned = [spec["latency_ms"] for node in mesh.nodes
               for spec in (await stats(node.address, secret=secret))["planned_links"].values()]
    handling = [(await stats(node.address, secret=secret))["tile_handling_ms"] for node in mesh.nodes]
    print(f"    per-message latency the planner sees (measured delivery + per-tile handling): "
          f"median {median(planned):.2f} ms (min {min(planned):.2f}, max {max(planned):.2f}); "
          f"per-tile handling median {median(handling):.2f} ms")
    rounds = [m["auction_rounds"] for m in rows]
    rounds_ms = [m["auction_rounds_s"] * 1e3 for m in rows]
    step_ms = [m["auction_s"] * 1e3 for m in rows]
    budget = 3 * rtt_ms + 2.0
    print(f"[2] AWAS over the network: {median(rounds):.0f} round trips per request; "
          f"measured RTT between nodes (heartbeat echo, median) {rtt_ms:.2f} ms")
    print(f"    auction rounds: median {median(rounds_ms):.2f} ms; whole auction step (items, rounds, "
          f"levelling into the plan): median {median(step_ms):.2f} ms")
    print(f"    target 3 RTT + 2 ms = {budget:.2f} ms: rounds {median(rounds_ms) / budget:.2f}x of it, "
          f"whole step {median(step_ms) / budget:.2f}x of it")


async def memory(model: str, size: tuple[int, int]) -> None:
    with LocalMesh.create() as mesh:
        mesh.add_many([("req", 1.0), ("work", 1.0)])
        secret = mesh.secret()
        await wait_formed([n.address for n in mesh.nodes], secret)
        idle = (await stats(mesh.nodes[1].address, secret=secret))["peak_rss_mb"]
        meta, _ = await infer(mesh.nodes[0].address, model=model, strategy="modnn", size=size, secret=secret)
        assert "work" in meta["devices"], meta["devices"]
        req = await stats(mesh.nodes[0].address, secret=secret)
        work = await stats(mesh.nodes[1].address, secret=secret)
        print(f"[3] {model} {size[0]}x{size[1]}: peak RSS worker {work['peak_rss_mb']:.0f} MB "
              f"(now {work['rss_mb']:.0f} MB; idle node {idle:.0f} MB), requester with head "
              f"{req['peak_rss_mb']:.0f} MB (now {req['rss_mb']:.0f} MB)")


def requester_awas_cpu(model: str, size: tuple[int, int], requests: int) -> None:
    import json

    from meshci.auction import Bidder
    from meshci.auction.messages import AwardReply, BidBundle
    from meshci.cost import Cluster, Device
    from meshci.cost.links import LinkSpec
    from meshci.models.registry import build_model
    from meshci.node.auction import NetworkAuction, auction_items, awarded_plan, from_message, to_message
    from meshci.node.runtime import LoadedModel
    from meshci.planning import make_plan
    from meshci.trunk import extract_trunk
    from meshci.wire import Message

    net = build_model(model, seed=0).eval()
    trunk = extract_trunk(net, input_shape=(3, *size), name=model)
    names = ["dev0", "dev1", "dev2", "dev3"]
    speeds = [1.5, 2.5, 2.5, 3.5]
    cluster = Cluster(tuple(Device(n, g) for n, g in zip(names, speeds)), LinkSpec(1000, 0.5), {},
                      "switched", "dev0")
    plan = make_plan(trunk, cluster, "edgeci")
    loaded = LoadedModel((model, 0, *size), trunk, True)
    items = auction_items(trunk, plan)
    bidders = {n: Bidder.from_rates(n, g * 1e9, 1e9) for n, g in zip(names, speeds)}

    def one(rid: int) -> float:
        """One auction; returns the requester's CPU seconds."""
        cpu = 0.0
        t0 = time.thread_time()
        auction = NetworkAuction(rid, "dev0", items, names)
        queue = list(auction.start(0.0))
        cpu += time.thread_time() - t0
        while queue:
            out = queue.pop(0)
            t0 = time.thread_time()
            if isinstance(out.message, (BidBundle, AwardReply)):  # to the auctioneer
                message = out.message
                if message.sender != "dev0":  # decoded from the wire
                    wire = json.loads(json.dumps(to_message(rid, message).meta))
                    t0 = time.thread_time()
                    message = from_message(Message(to_message(rid, message).kind, rid, wire), message.sender)
                queue += auction.receive(message, 0.0)
                cpu += time.thread_time() - t0
            elif out.to == "dev0":  # the requester's own bidder
                queue += bidders["dev0"].receive(out.message, 0.0)
                cpu += time.thread_time() - t0
            else:  # encoded for the wire here, decoded and answered by a remote bidder
                msg = to_message(rid, out.message)
                wire = json.dumps(msg.meta)
                cpu += time.thread_time() - t0
                queue += bidders[out.to].receive(from_message(Message(msg.kind, rid, json.loads(wire)), "dev0"))
        t0 = time.thread_time()
        awarded_plan(trunk, plan, auction, flops=loaded.flops)
        cpu += time.thread_time() - t0
        for bidder in bidders.values():
            bidder.release(str(rid))
        return cpu

    one(0)  # warm-up (memoised geometry)
    cpus = [one(k + 1) for k in range(max(1, requests))]
    print(f"[4] requester AWAS CPU per request, {model} {size[0]}x{size[1]}, {len(plan.blocks)} blocks, "
          f"{len(items)} items, 4 bidders: median {median(cpus) * 1000:.2f} ms, "
          f"min {min(cpus) * 1000:.2f} ms over {len(cpus)} auctions")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=7)
    parser.add_argument("--nodes", type=int, default=4, help="mesh size for [1] and [2] (default 4)")
    parser.add_argument("--skip-memory", action="store_true", help="leave out [3]")
    parser.add_argument("--awas-only", action="store_true", help="only [4] (in-process, seconds)")
    args = parser.parse_args()
    size = (args.size, args.size)
    began = time.perf_counter()
    if args.awas_only:
        requester_awas_cpu(args.model, size, max(args.requests, 30))
        return
    from meshci.node.runtime import measure_gflops

    # every node shares this machine: each states the speed of one core, measured here once
    gflops = measure_gflops(threads=1)
    print(f"(one core of this machine: {gflops:.1f} GFLOP/s effective, measured)")
    with LocalMesh.create() as mesh:
        mesh.add_many([(f"n{i + 1}", gflops) for i in range(args.nodes)])
        await wait_formed([n.address for n in mesh.nodes], mesh.secret())
        await overhead_and_auction(mesh, args.model, size, args.requests)
    for model in () if args.skip_memory else ("vgg16", "resnet34"):
        await memory(model, size)
    requester_awas_cpu(args.model, size, max(args.requests, 30))
    print(f"(benchmark wall time {time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    asyncio.run(main())
