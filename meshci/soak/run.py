"""`tools/soak`: many requests from several requesters on a local mesh while peers restart.

    tools/soak [--requests 1000] [--requesters 2] [--restart-every 100] [--devices 4]
               [--model vgg16] [--size H W] [--strategy edgeci] [--in-flight 2] [--warm-up 10]
               [--sample-every 50] [--retry]
               [--seed S] [--json FILE] [--keep DIR]

A local mesh of `--devices` node processes on loopback (`meshci.node.local.LocalMesh`,
each node with its own data dir) serves `--requests` requests, sent by clients through
`--requesters` of its nodes (one connection each, `--in-flight` requests at once per
requester). After every `--restart-every` answered or failed requests one random node that
is not a requester is killed (SIGKILL) and started again on the same port with the same
data dir; requests keep flowing meanwhile.

Every answer is compared with the model run here on the same input (the seed's input,
built the way a node builds it): equal (within float tolerance) is ``ok``, else ``wrong``.
A request that ends in an error is ``lost``; it is never retried silently: with
``--retry`` it is sent once more and that outcome is reported apart. Each node's resident
memory is read (``/proc``) after a warm-up (`--warm-up` requests per requester, not
counted), after every `--sample-every` requests (growth that levels off is warm-up, growth
that keeps on is a leak) and at the end. See `meshci.soak.tally` for what is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from meshci.errors import MeshciError, RuntimeFailure
from meshci.soak.tally import Tally, format_summary, restarts_due

log = logging.getLogger(__name__)

INPUTS = 8  # distinct inputs (seeds) the requests cycle through; their reference logits computed once
RTOL, ATOL = 1e-4, 1e-5  # the node's --check tolerance
WARM_UP_TIMEOUT_S = 600.0  # the first request builds the model and measures speeds everywhere


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None  # gone, or no procfs: no figure


def _references(model: str, size: tuple[int, int], count: int) -> list[Any]:
    """The logits of the model run here on the inputs of seeds 0..count-1 (as a node makes
    an input from `input_seed`: `meshci.node.inputs.request_input`)."""
    import torch

    from meshci.models.registry import build_model
    from meshci.node.inputs import request_input

    net = build_model(model, seed=0)
    out = []
    with torch.inference_mode():
        for k in range(count):
            x = request_input({"size": list(size), "input_seed": k}, ())
            out.append(net(x).reshape(1, -1))
    return out


class Soak:
    """One soak run over a started, formed mesh."""

    def __init__(self, mesh: Any, args: argparse.Namespace) -> None:
        self.mesh = mesh
        self.args = args
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.requesters = [n.name for n in mesh.nodes[:args.requesters]]
        self.others = [n.name for n in mesh.nodes[args.requesters:]]
        self.completed = 0
        self.restarted: set[str] = set()
        self.memory_start: dict[str, float] = {}
        self._restart_lock = asyncio.Lock()
        self.references: list[Any] = []

    async def _tiles(self) -> dict[str, int]:
        """Tiles each node has computed since it started (its `stats`); a node that does not
        answer is left out."""
        from meshci.node.client import RequestError, stats

        out: dict[str, int] = {}
        for node in list(self.mesh.nodes):
            try:
                out[node.name] = int((await stats(node.address, secret=self.mesh.secret()))["tiles_computed"])
            except (RequestError, KeyError, TypeError, ValueError) as exc:
                log.info("no stats from %s: %s", node.name, exc)
        return out

    def _memory(self) -> dict[str, float]:
        figures = {n.name: _rss_mb(n.pid) for n in self.mesh.nodes}
        return {name: mb for name, mb in figures.items() if mb is not None}

    async def run(self) -> dict[str, Any]:
        from meshci.node.session import Session

        args = self.args
        self.references = await asyncio.to_thread(_references, args.model, tuple(args.size), INPUTS)
        secret = self.mesh.secret()
        sessions = {name: await Session.open(self.mesh.node(name).address, secret=secret)
                    for name in self.requesters}
        try:
            # warm-up (not counted): models built, speeds measured, plans made, caches filled
            for k in range(max(1, args.warm_up)):
                for name in self.requesters:
                    await sessions[name].infer(model=args.model, strategy=args.strategy, size=tuple(args.size),
                                               input_seed=k % INPUTS, timeout=max(args.timeout, WARM_UP_TIMEOUT_S))
            self.memory_start = self._memory()
            tiles_start = await self._tiles()
            queue: asyncio.Queue[int] = asyncio.Queue()
            for k in range(args.requests):
                queue.put_nowait(k)
            restarts: list[asyncio.Task[None]] = []
            workers = [self._worker(sessions[name], name, queue, restarts)
                       for name in self.requesters for _ in range(args.in_flight)]
            await asyncio.gather(*workers)
            await asyncio.gather(*restarts)
        finally:
            for session in sessions.values():
                await session.close()
        summary = self.tally.summary(self.memory_start, self._memory(), self.restarted)
        tiles_end = await self._tiles()
        for name, row in summary["memory"].items():
            # a restarted node counts from 0 again: its tiles since its last start
            before = 0 if name in self.restarted else tiles_start.get(name)
            end = tiles_end.get(name)
            row["tiles"] = end - before if end is not None and before is not None else None
        return summary

    async def _worker(self, session: Any, requester: str, queue: asyncio.Queue[int],
                      restarts: list[asyncio.Task[None]]) -> None:
        import torch

        from meshci.node.client import RequestError

        args = self.args
        while not queue.empty():
            k = queue.get_nowait()
            seed = k % INPUTS
            attempts = 2 if args.retry else 1
            for attempt in range(attempts):
                try:
                    meta, logits = await session.infer(model=args.model, strategy=args.strategy,
                                                       size=tuple(args.size), input_seed=seed, timeout=args.timeout)
                except RequestError as exc:
                    if attempt == 0:
                        self.tally.failed(str(exc))
                        log.info("request %d via %s lost: %s", k, requester, exc)
                    else:
                        self.tally.retried(False)
                    continue
                expected = self.references[seed]
                got = torch.as_tensor(logits).reshape(1, -1)
                diff = float((got - expected).abs().max())
                exact = bool(torch.allclose(got, expected, rtol=RTOL, atol=ATOL))
                if attempt == 0:
                    self.tally.answered(requester, float(meta["client_latency_s"]), diff, exact)
                else:
                    self.tally.retried(exact)
                break
            self.completed += 1
            if self.completed % max(1, args.sample_every) == 0:
                self.tally.memory_samples.append((self.completed, self._memory()))
            # a restart once no request is left would disturb nothing: none then
            due = restarts_due(self.completed, args.restart_every, len(restarts)) if not queue.empty() else 0
            for _ in range(due):
                restarts.append(asyncio.get_running_loop().create_task(self._restart(self.completed)))

    async def _restart(self, after: int) -> None:
        """SIGKILL a random non-requester node and start it again (same port, same data dir)."""
        if not self.others:
            return
        async with self._restart_lock:
            name = self.rng.choice(self.others)
            began = time.monotonic()
            await asyncio.to_thread(self.mesh.restart, name, signal.SIGKILL)
            seconds = time.monotonic() - began
            self.restarted.add(name)
            self.tally.restarts.append({"node": name, "after": after, "seconds": seconds})
            mb = _rss_mb(self.mesh.node(name).pid)
            if mb is not None:
                self.memory_start[name] = mb
            log.info("restarted %s after %d requests (%.1f s)", name, after, seconds)



def start_mesh(args: argparse.Namespace) -> Any:
    """A formed local mesh of `args.devices` nodes started together, each with its own data
    dir and a fixed port (a restarted node comes back at the same address and reads what
    it cached there)."""
    from meshci.node.local import LocalMesh, NodeSpec, wait_formed

    directory = Path(args.keep) if args.keep else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    mesh = LocalMesh.create(directory)
    try:
        mesh.start_together([NodeSpec(f"s{i + 1}", gflops=args.gflops, own_data_dir=True)
                             for i in range(args.devices)])
        asyncio.run(wait_formed([n.address for n in mesh.nodes], mesh.secret(), timeout=60.0))
    except BaseException:
        mesh.close()
        raise
    return mesh


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests in all (default 1000)")
    parser.add_argument("--requesters", type=int, default=2, help="nodes the clients send through (default 2)")
    parser.add_argument("--restart-every", type=int, default=100,
                        help="SIGKILL and restart a random non-requester node after every K requests "
                             "(default 100; 0: never)")
    parser.add_argument("--devices", type=int, default=4, help="nodes in the local mesh (default 4)")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    parser.add_argument("--strategy", default="edgeci")
    parser.add_argument("--gflops", type=float, default=None,
                        help="declare every node's speed (default: each node measures its own, cached in its data dir)")
    parser.add_argument("--in-flight", type=int, default=2, help="requests in flight per requester (default 2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (default 120)")
    parser.add_argument("--warm-up", type=int, default=10,
                        help="requests per requester before the run, not counted; memory is read after them "
                             "(default 10)")
    parser.add_argument("--sample-every", type=int, default=50,
                        help="read every node's resident memory after every N requests (default 50)")
    parser.add_argument("--retry", action="store_true",
                        help="send a lost request once more (reported apart; the first attempt stays lost)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of nodes to restart")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", metavar="DIR", help="run the mesh in DIR and keep it (logs, data dirs)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.in_flight < 1 or args.restart_every < 0:
        parser.error("--requests and --in-flight must be at least 1, --restart-every at least 0")
    if not 1 <= args.requesters <= args.devices:
        parser.error(f"--requesters must be between 1 and --devices ({args.devices})")
    if args.restart_every and args.requesters == args.devices:
        parser.error("restarts need a node that is not a requester: use more --devices than --requesters")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        from meshci.models.registry import build_model

        build_model(args.model)  # an unknown model: a usage error before any node starts
    except MeshciError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    try:
        mesh = start_mesh(args)
    except RuntimeFailure as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 1
    try:
        summary = asyncio.run(Soak(mesh, args).run())
    except RuntimeFailure as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 1
    finally:
        mesh.close()
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "keep")}
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["lost"] == 0 and summary["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
