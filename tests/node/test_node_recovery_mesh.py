"""A request survives a peer lost under it, on a 4-node mesh running VGG-16: node processes
on loopback SIGKILLed at random moments of a request (20 times), and in-process nodes whose
connections are all cut at random moments (20 times). Every request completes, exact; a
requester that dies leaves no request state on its peers (`STATE op=request`)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from typing import Any

import pytest

from meshci.node.client import RequestError, ask, infer
from meshci.node.local import LocalMesh, start_node, wait_formed
from meshci.node.membership import Address
from meshci.node.runtime import Runtime
from meshci.node.server import Node, NodeConfig
from meshci.wire import Message, MsgType
from tests.node.inprocess import start_mesh, until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

MODEL = "vgg16"
SIZE = (64, 64)
ROUNDS = int(os.environ.get("MESHCI_RECOVERY_ROUNDS", "20"))  # the issue asks 20 of 20
SECRET = os.urandom(32)


async def _request_state(address: Address, secret: bytes) -> dict[str, Any]:
    msg = Message(MsgType.STATE, random.getrandbits(62) | 1, {"op": "request"})
    return (await ask(address, msg, secret=secret, timeout=30.0)).meta


def _dump(mesh: LocalMesh) -> None:
    for node in mesh.nodes:
        sys.stderr.write(f"--- {node.name} log ---\n{node.log_text()[-4000:]}\n")


async def _holding(workers: list[Any], secret: bytes) -> list[Any]:
    """The workers that hold work of a request now (`STATE op=request`)."""
    states = await asyncio.gather(*(_request_state(w.address, secret) for w in workers), return_exceptions=True)
    return [w for w, s in zip(workers, states) if isinstance(s, dict) and s["work"]]


def test_sigkill_a_peer_at_random_moments_of_vgg16_requests_all_complete_exact() -> None:
    rng = random.Random(10)
    mesh = LocalMesh.create()
    try:
        # a slow requester: the three workers hold the tiles
        requester = mesh.add("q", gflops=0.2)
        workers = [mesh.add(f"w{i}", gflops=1.0) for i in range(3)]
        secret = mesh.secret()

        async def run() -> list[dict[str, Any]]:
            await wait_formed([requester.address] + [w.address for w in workers], secret)
            warm, _ = await infer(requester.address, model=MODEL, size=SIZE, secret=secret, check=True)
            assert warm["check_ok"]
            results = []
            for i in range(ROUNDS):
                request = asyncio.create_task(infer(requester.address, model=MODEL, size=SIZE, secret=secret,
                                                    input_seed=i, check=True, deadline=120.0))
                # a random moment while a worker holds tiles of the request (a random worker
                # if the request ends before one is seen holding any)
                holding: list[Any] = []
                while not holding and not request.done():
                    holding = await _holding(workers, secret)
                victim = rng.choice(holding or workers)
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                os.kill(victim.pid, signal.SIGKILL)
                meta, logits = await request
                sys.stderr.write(f"round {i}: killed {victim.name} (held tiles: {bool(holding)}); "
                                 f"{meta['client_latency_s']:.2f} s, attempts {meta['attempts']}, "
                                 f"lost {meta['lost']}\n")
                assert meta["check_ok"], (i, victim.name, meta["max_abs_diff"])
                assert tuple(logits.shape) == (1, 1000)
                results.append(meta)
                # a fresh worker takes the dead one's place (under a new name), its model built
                workers.remove(victim)
                name = f"w{3 + i}"
                fresh = start_node(mesh.node_args(name, gflops=1.0, join=requester.address),
                                   log_path=mesh.directory / f"{name}.log")
                mesh.nodes.append(fresh)
                workers.append(fresh)
                await infer(fresh.address, model=MODEL, size=SIZE, secret=secret, strategy="local")
                await wait_formed([requester.address] + [w.address for w in workers], secret, timeout=60.0)
            return results

        results = asyncio.run(run())
    except BaseException:
        _dump(mesh)
        raise
    finally:
        mesh.close()
    recovered = sum(1 for m in results if m["attempts"] > 1)
    sys.stderr.write(f"{len(results)} of {ROUNDS} complete and exact; {recovered} re-run after losing a device\n")
    assert len(results) == ROUNDS and all(m["check_ok"] for m in results)
    assert recovered >= ROUNDS // 2  # most kills did land mid-request


async def test_cut_a_peer_at_random_moments_of_vgg16_requests_all_complete_exact() -> None:
    rng = random.Random(11)
    nodes = await start_mesh({"q": 0.2, "w1": 1.0, "w2": 1.0, "w3": 1.0}, SECRET)
    try:
        requester, workers = nodes[0], nodes[1:]
        await infer(requester.address, model=MODEL, size=SIZE, secret=SECRET, check=True)
        results = []
        for i in range(ROUNDS):
            request = asyncio.create_task(infer(requester.address, model=MODEL, size=SIZE, secret=SECRET,
                                                input_seed=i, check=True, deadline=120.0))
            # a random moment while a worker holds tiles of the request (a random worker if
            # the request ends before one is seen holding any)
            holding: list[Node] = []
            while not holding and not request.done():
                await asyncio.sleep(0.001)
                holding = [w for w in workers if w.worker.contexts]
            victim = rng.choice(holding or workers)
            await asyncio.sleep(rng.uniform(0.0, 0.02))
            victim.connections.abort_all()  # cut off: every connection to and from it reset
            meta, _ = await request
            sys.stderr.write(f"round {i}: cut {victim.name} (held tiles: {bool(holding)}); "
                             f"attempts {meta['attempts']}, lost {meta['lost']}\n")
            assert meta["check_ok"], (i, victim.name, meta["max_abs_diff"])
            results.append(meta)
            # links that heal are another part's work: the cut node leaves, a fresh one (its
            # model built) takes its place, so every round starts on 4 nodes
            await victim.close()
            workers.remove(victim)
            fresh = Node(NodeConfig(f"w{4 + i}", Address("127.0.0.1", 0), join=(requester.address,),
                                    secret=SECRET, gflops=1.0), Runtime(1, isolate_builds=False))
            await fresh.start()
            nodes.append(fresh)
            workers.append(fresh)
            await infer(fresh.address, model=MODEL, size=SIZE, secret=SECRET, strategy="local")
            await until(lambda: all(len(n.membership.alive()) >= 3 for n in [requester, *workers]), "mesh of 4")
        recovered = sum(1 for m in results if m["attempts"] > 1)
        sys.stderr.write(f"{len(results)} of {ROUNDS} complete and exact; {recovered} re-run after a cut\n")
        assert recovered >= ROUNDS // 2  # most cuts did land mid-request
    finally:
        await asyncio.gather(*(n.close() for n in nodes if not n.stopped))


def test_a_requester_killed_mid_request_leaves_no_request_state_on_its_peers() -> None:
    mesh = LocalMesh.create()
    try:
        requester = mesh.add("q", gflops=0.2)
        workers = [mesh.add(f"w{i}", gflops=1.0) for i in range(3)]
        secret = mesh.secret()

        async def run() -> dict[str, Any]:
            await wait_formed([requester.address] + [w.address for w in workers], secret)
            # a large input: the workers hold its tiles for a while
            request = asyncio.create_task(infer(requester.address, model=MODEL, size=(224, 224), secret=secret))
            began = time.monotonic()
            while not any([(await _request_state(w.address, secret))["work"] for w in workers]):
                assert time.monotonic() - began < 120, "the workers never got the request"
                await asyncio.sleep(0.02)
            os.kill(requester.pid, signal.SIGKILL)
            with pytest.raises(RequestError):
                await request
            began = time.monotonic()
            while True:
                states = {w.name: await _request_state(w.address, secret) for w in workers}
                if all(s["work"] == 0 and s["bid_auctions"] == 0 and not s["bidder_auctions"]
                       for s in states.values()):
                    return states
                assert time.monotonic() - began < 30, states  # safety net only
                await asyncio.sleep(0.2)

        asyncio.run(run())
    except BaseException:
        _dump(mesh)
        raise
    finally:
        mesh.close()
