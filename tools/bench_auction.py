#!/usr/bin/env python3
"""Benchmark of AWAS (meshci.auction): speed of the auction and quality of its splits.

1. Rounds and wall time of one in-process auction (`run_local_auction`: every message goes
   through its JSON form, as on the network) for 4, 16 and 64 bidders, and of the numpy
   core `assign` alone on the same bid matrices.
2. Predicted block makespan of AWAS (auction, then `balance_strips`) versus
   speed-proportional splitting (AOFL's rule) on heterogeneous clusters (speeds spread up
   to 8x, links up to 10x) where one device is also busy with another request (backlog).

All figures come from one run on this machine; ratios are what to compare.

3. With ``--mesh``: the latency the auction adds to a request on a 4-node loopback mesh
   (real node processes; ``auction_s`` as the requester reports it, next to the loopback
   round trip time of a small request), VGG-16 on a small input, strategy ``edgeci``.

    .venv/bin/python tools/bench_auction.py [--repeats 5] [--clusters 30] [--seed 0] [--mesh]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np

from meshci.auction import Bidder, Item, assign, balance_strips, run_local_auction


@dataclass(frozen=True)
class Block:
    """A fused block's output rows and what each row costs (halo rows cost the same)."""

    height: int = 56
    halo: int = 4
    flops_per_row: float = 2.0e8
    in_bytes_per_row: int = 56 * 64 * 4
    out_bytes_per_row: int = 56 * 128 * 4

    def in_rows(self, a: int, b: int) -> int:
        return min(self.height, b + self.halo) - max(0, a - self.halo)

    def item(self, item_id: str, a: int, b: int) -> Item:
        rows = self.in_rows(a, b)
        return Item(item_id, 0, (a, b), rows * self.flops_per_row,
                    rows * self.in_bytes_per_row, (b - a) * self.out_bytes_per_row)


@dataclass(frozen=True)
class Device:
    name: str
    gflops: float
    mbps: float
    latency_ms: float
    backlog_s: float

    def bidder(self) -> Bidder:
        return Bidder.from_rates(self.name, self.gflops, self.mbps, self.latency_ms, backlog_s=self.backlog_s)

    def strip_time(self, block: Block, a: int, b: int) -> float:
        """Predicted finish of rows [a, b): backlog, input, compute, output."""
        item = block.item("x", a, b)
        return self.backlog_s + self.cost_s(item)

    def cost_s(self, item: Item) -> float:
        transfer = 2 * self.latency_ms / 1e3 + (item.recv_bytes + item.send_bytes) * 8 / (self.mbps * 1e6)
        return item.flops / (self.gflops * 1e9) + transfer


def cluster(rng: np.random.Generator, n: int, busy: float, block: Block) -> list[Device]:
    """n devices, speeds 1..8 GFLOP/s, links 100..1000 Mbit/s; the fastest is also busy with
    another request for `busy` times the block's ideal time (its FLOPs over the total speed)."""
    gflops = rng.uniform(1.0, 8.0, n)
    mbps = rng.uniform(100.0, 1000.0, n)
    ideal_s = block.height * block.flops_per_row / (gflops.sum() * 1e9)
    devices = [Device(f"d{k}", float(g), float(m), 0.5, 0.0) for k, (g, m) in enumerate(zip(gflops, mbps))]
    k = int(np.argmax(gflops))
    devices[k] = Device(devices[k].name, devices[k].gflops, devices[k].mbps, 0.5, busy * ideal_s)
    return devices


def proportional_split(block: Block, devices: list[Device]) -> list[tuple[Device, int, int]]:
    """AOFL's rule: rows in proportion to speed (largest remainder), blind to load and links."""
    speeds = np.array([d.gflops for d in devices])
    share = speeds / speeds.sum() * block.height
    rows = np.floor(share).astype(int)
    for k in np.argsort(-(share - rows))[: block.height - rows.sum()]:
        rows[k] += 1
    bounds = np.concatenate([[0], np.cumsum(rows)])
    return [(d, int(a), int(b)) for d, a, b in zip(devices, bounds[:-1], bounds[1:]) if b > a]


def awas_split(block: Block, devices: list[Device], tile_rows: int) -> tuple[float, float, int, int]:
    """Auction tiles of `tile_rows` rows, then balance the winners' strips (in the order of
    their first tile).

    Returns (makespan of the auction's tiles, makespan after balancing, rounds, devices used)."""
    items = [block.item(f"t{a}", a, min(block.height, a + tile_rows)) for a in range(0, block.height, tile_rows)]
    result = run_local_auction(items, [d.bidder() for d in devices], auctioneer="requester")
    by_name = {d.name: d for d in devices}
    first_row = {}
    for item in items:
        owner = result.owner[item.item_id]
        first_row.setdefault(owner, item.rows[0])
    order = sorted(first_row, key=first_row.__getitem__)
    strips = balance_strips(block.height, order, lambda name, a, b: by_name[name].strip_time(block, a, b))
    balanced = max(by_name[name].strip_time(block, a, b) for name, a, b in strips)
    return result.makespan_s[0], balanced, result.rounds, len(strips)


def bench_speed(repeats: int, rng: np.random.Generator) -> None:
    print("== auction speed (in-process, JSON round trip of every message; best of --repeats) ==")
    print(f"{'bidders':>7} {'items':>5} {'rounds':>6} {'auction ms':>10} {'assign ms':>9} {'iters':>5}")
    block = Block(height=224, halo=2)
    for n in (4, 16, 64):
        devices = cluster(rng, n, 0.5, block)
        n_items = min(block.height, 2 * n)
        edges = np.linspace(0, block.height, n_items + 1).round().astype(int)
        items = [block.item(f"t{k}", int(a), int(b)) for k, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]
        auction_ms, assign_ms, rounds, iters = [], [], set(), 0
        cost = np.array([[d.cost_s(i) for i in items] for d in devices])
        backlog = np.array([d.backlog_s for d in devices])
        for _ in range(repeats):
            bidders = [d.bidder() for d in devices]
            t0 = time.perf_counter()
            result = run_local_auction(items, bidders)
            auction_ms.append((time.perf_counter() - t0) * 1e3)
            rounds.add(result.rounds)
            t0 = time.perf_counter()
            core = assign(cost, backlog)
            assign_ms.append((time.perf_counter() - t0) * 1e3)
            iters = core.iterations
        print(f"{n:>7} {n_items:>5} {','.join(map(str, sorted(rounds))):>6} "
              f"{min(auction_ms):>10.2f} {min(assign_ms):>9.3f} {iters:>5}")


def bench_quality(clusters: int, rng: np.random.Generator) -> None:
    print("\n== predicted block makespan: speed-proportional (AOFL) / AWAS, fastest device busy ==")
    print("busy: the busy device's backlog in units of the block's ideal time; ratios are geometric")
    print("means over random clusters (>1: AWAS is faster); tiles: the auction's tiles before balancing")
    print("balance-only: balance_strips over every device in index order, without the auction")
    print(f"{'devices':>7} {'busy':>5} {'prop/awas':>9} {'min':>5} {'max':>5} {'prop/tiles':>10} "
          f"{'prop/balance-only':>17} {'used':>5} {'rounds':>6}")
    block = Block()
    for n in (4, 8, 16):
        for busy in (0.0, 0.5, 1.0, 2.0):
            ratios, tile_ratios, plain_ratios, used, rounds = [], [], [], [], set()
            for _ in range(clusters):
                devices = cluster(rng, n, busy, block)
                prop = max(d.strip_time(block, a, b) for d, a, b in proportional_split(block, devices))
                tiles_only, balanced, r, k = awas_split(block, devices, tile_rows=max(1, block.height // (2 * n)))
                ratios.append(prop / balanced)
                by_name = {d.name: d for d in devices}
                plain = balance_strips(block.height, list(by_name),
                                       lambda name, a, b: by_name[name].strip_time(block, a, b))
                plain_ratios.append(prop / max(by_name[nm].strip_time(block, a, b) for nm, a, b in plain))
                tile_ratios.append(prop / tiles_only)
                used.append(k)
                rounds.add(r)
            print(f"{n:>7} {busy:>5.1f} {statistics.geometric_mean(ratios):>9.3f} {min(ratios):>5.2f} "
                  f"{max(ratios):>5.2f} {statistics.geometric_mean(tile_ratios):>10.3f} "
                  f"{statistics.geometric_mean(plain_ratios):>17.3f} "
                  f"{statistics.mean(used):>5.1f} {','.join(map(str, sorted(rounds))):>6}")


def bench_mesh(repeats: int) -> None:
    import asyncio

    from meshci.node.client import infer, stats
    from meshci.node.local import LocalMesh, wait_formed

    print("\n== latency the auction adds to a request: 4-node loopback mesh, vgg16 64x64, edgeci ==")
    with LocalMesh.create() as mesh:
        mesh.add_many([("n1", 1.0), ("n2", 2.0), ("n3", 4.0), ("n4", 8.0)])
        secret = mesh.secret()
        address = mesh.nodes[0].address

        async def measure() -> tuple[list[float], list[float], set[int]]:
            await wait_formed([n.address for n in mesh.nodes], secret)
            await infer(address, model="vgg16", size=(64, 64), secret=secret)  # warm-up: load the model
            rtts, auctions, rounds = [], [], set()
            for _ in range(repeats):
                t0 = time.perf_counter()
                await stats(address, secret=secret)
                rtts.append(time.perf_counter() - t0)
                meta, _ = await infer(address, model="vgg16", size=(64, 64), secret=secret)
                auctions.append(meta["auction_s"])
                rounds.add(int(meta["auction_rounds"]))
            return rtts, auctions, rounds

        rtts, auctions, rounds = asyncio.run(measure())
    rtt_ms = statistics.median(rtts) * 1e3
    auction_ms = statistics.median(auctions) * 1e3
    print("(the round trip is a whole client request: connect, handshake, ask, answer — an upper")
    print(" bound on one message round trip between connected nodes)")
    print(f"auction: median {auction_ms:.2f} ms over {repeats} requests, rounds {sorted(rounds)}; "
          f"client round trip median {rtt_ms:.2f} ms; auction / round trip = {auction_ms / rtt_ms:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clusters", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", action="store_true", help="also measure on a 4-node loopback mesh")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    bench_speed(args.repeats, rng)
    bench_quality(args.clusters, rng)
    if args.mesh:
        bench_mesh(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
