"""Where each node's event-loop CPU goes during requests (cProfile, per node).

Starts the demo's local mesh (each node in its CPU quota when run as root), warms it up,
then profiles every node's event-loop thread (everything but tile compute on the compute
thread) while `--requests` requests of one strategy go through one node, and prints, per
node, the profiled CPU per request and the functions that spend most of it.

    python tools/profile_node.py --model resnet34 --strategy edgeci --requests 10
    python tools/profile_node.py --model vgg16 --via 3 --top 25 --out /tmp/prof

The node processes profile themselves on signals (`meshci node` with MESHCI_PROFILE_DIR
set: SIGUSR1 starts cProfile, SIGUSR2 writes the statistics). cProfile slows Python code
down, so the per-request figures are upper bounds; the shares are what matters.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from meshci.commands.demo import DEFAULT_QUOTAS, start_quota_mesh
from meshci.node.client import infer
from meshci.node.local import wait_formed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--strategy", default="edgeci")
    parser.add_argument("--via", type=int, default=1, help="requester: node number (1 = dev1, the slowest)")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224))
    parser.add_argument("--top", type=int, default=15, help="functions listed per node")
    parser.add_argument("--out", type=Path, help="keep the .prof files here (default: a temporary folder)")
    args = parser.parse_args()
    top = max(DEFAULT_QUOTAS)
    specs = [(f"dev{i + 1}", q / top) for i, q in enumerate(DEFAULT_QUOTAS)]
    with ExitStack() as stack:
        out_dir = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshci-prof-")))
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*.prof"):
            old.unlink()
        os.environ["MESHCI_PROFILE_DIR"] = str(out_dir)
        mesh, nodes = start_quota_mesh(stack, specs, sys.stderr)
        latencies = asyncio.run(_drive(mesh, nodes, args))
        for node in nodes:
            node.process.send_signal(signal.SIGUSR2)
        files = [out_dir / f"{n.name}.prof" for n in nodes]
        deadline = time.monotonic() + 30
        while not all(f.exists() for f in files) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # let the last write finish
        _report(nodes, files, latencies, args)
    return 0


async def _drive(mesh, nodes, args) -> list[float]:  # type: ignore[no-untyped-def]
    secret = mesh.secret()
    await wait_formed([n.address for n in nodes], secret, timeout=120.0)
    size = (int(args.size[0]), int(args.size[1]))
    via = nodes[args.via - 1]
    await asyncio.gather(*(infer(n.address, model=args.model, strategy="local", size=size, secret=secret)
                           for n in nodes))
    for _ in range(3):  # warm: plans cached, links measured
        await infer(via.address, model=args.model, strategy=args.strategy, size=size, secret=secret)
    for node in nodes:
        node.process.send_signal(signal.SIGUSR1)
    await asyncio.sleep(0.3)
    latencies = []
    for i in range(args.requests):
        began = time.perf_counter()
        meta, _ = await infer(via.address, model=args.model, strategy=args.strategy, size=size,
                              secret=secret, input_seed=i)
        latencies.append(time.perf_counter() - began)
    return latencies


def _report(nodes, files, latencies, args) -> None:  # type: ignore[no-untyped-def]
    n = len(latencies)
    latencies = sorted(latencies)
    print(f"{args.model} {args.strategy} via dev{args.via}: {n} requests, client latency median "
          f"{latencies[n // 2] * 1000:.0f} ms (min {latencies[0] * 1000:.0f}, max {latencies[-1] * 1000:.0f})")
    for node, path in zip(nodes, files):
        if not path.exists():
            print(f"\n{node.name}: no profile written")
            continue
        stats = pstats.Stats(str(path))
        total = stats.total_tt  # type: ignore[attr-defined]
        print(f"\n== {node.name}: {total / n * 1000:.1f} ms profiled event-loop CPU per request "
              f"(incl. inline tiles and idle heartbeats)")
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
        print(f"   {'tottime/req':>11} {'cum/req':>9} {'calls/req':>9}  function")
        for (file, line, func), (_cc, calls, tt, ct, _callers) in rows[: args.top]:
            where = f"{Path(file).name}:{line}({func})" if line else func
            print(f"   {tt / n * 1000:9.2f}ms {ct / n * 1000:7.2f}ms {calls / n:9.1f}  {where}")


if __name__ == "__main__":
    sys.exit(main())
