"""Failure paths of the node, in process over real loopback sockets: a failed request
leaves no state or commitment behind on any node, a bug in a task fails its request at once,
only a request's own devices can fail it, and a worker still loading its model for a PLAN
is not swept as an orphan."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshci.node import worker as worker_module
from meshci.node.membership import HEARTBEAT_INTERVAL_S
from meshci.node.client import RequestError, infer
from meshci.node.membership import Address
from meshci.node.runtime import Runtime
from meshci.node.server import Node, NodeConfig
from meshci.wire import Connection, Message, MsgType

pytestmark = pytest.mark.timeout(120)

SMALL = (32, 32)
MODEL = "resnet18"
SECRET = os.urandom(32)
WAIT = 30.0  # safety net only: no assertion depends on it


async def _until(predicate: Any, what: str, show: Any = None) -> None:
    """Wait for `predicate`; on the safety-net timeout, fail saying what was awaited and
    what `show()` returns then (e.g. the nodes' request state)."""
    try:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"{what}: not after {WAIT} s" + (f"; now {show()}" if show is not None else ""))


async def _start_mesh(speeds: dict[str, float]) -> list[Node]:
    nodes: list[Node] = []
    for name, gflops in speeds.items():
        join = (nodes[0].address,) if nodes else ()
        config = NodeConfig(name, Address("127.0.0.1", 0), join=join, secret=SECRET, gflops=gflops)
        node = Node(config, Runtime(1, isolate_builds=False))
        await node.start()
        nodes.append(node)
    await _until(lambda: all(len(n.membership.alive()) == len(nodes) - 1 for n in nodes), "mesh formed")
    return nodes


@pytest.fixture
async def mesh() -> AsyncIterator[list[Node]]:
    # a slow requester and fast workers: the auction gives the workers tiles
    nodes = await _start_mesh({"q": 0.05, "w1": 5.0, "w2": 5.0})
    yield nodes
    await asyncio.gather(*(n.close() for n in nodes))


def _request_state(node: Node) -> dict[str, Any]:
    """Everything a request leaves on a node until it ends; all zero/empty when idle."""
    return node.request_state()


IDLE = {"requests": 0, "work": 0, "auctions": 0, "bid_auctions": 0, "bidder_auctions": (),
        "bidder_backlog_s": 0.0, "queued_s": 0.0}


async def _exact_request(node: Node, **kwargs: Any) -> dict[str, Any]:
    meta, _ = await infer(node.address, model=MODEL, size=SMALL, secret=SECRET, check=True, **kwargs)
    assert meta["check_ok"], meta["max_abs_diff"]
    return meta


async def test_a_worker_that_dies_mid_request_leaves_no_state_anywhere(mesh: list[Node],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    requester = mesh[0]
    await _exact_request(requester)  # models built, plans cached
    stuck: asyncio.Queue[Node] = asyncio.Queue()

    def hang_on(worker: Node) -> Any:
        async def hang(*args: Any, **kwargs: Any) -> Any:
            stuck.put_nowait(worker)
            await asyncio.Event().wait()  # a tile that never finishes
        return hang

    for worker in mesh[1:]:
        monkeypatch.setattr(worker.runtime, "run_block", hang_on(worker))
    # every worker is stuck: the attempt without the dead one cannot complete either, and
    # the request fails at its deadline
    request = asyncio.create_task(infer(requester.address, model=MODEL, size=SMALL, secret=SECRET,
                                        deadline=8.0))
    dead = await asyncio.wait_for(stuck.get(), WAIT)
    survivor = next(n for n in mesh[1:] if n is not dead)
    assert dead.worker.contexts  # mid-request, holding tiles
    await dead.close()  # ... and dies
    with pytest.raises(RequestError, match=dead.name):
        await request
    # the requester cancelled the request on every participant: nothing is left behind
    await _until(lambda: all(_request_state(n) == IDLE for n in (requester, survivor)), "state released",
                 lambda: {n.name: _request_state(n) for n in mesh})
    monkeypatch.setattr(survivor.runtime, "run_block", Runtime.run_block.__get__(survivor.runtime))
    meta = await _exact_request(requester, strategy="edgeci")
    assert set(meta["devices"]) <= {requester.name, survivor.name}
    assert all(_request_state(n) == IDLE for n in (requester, survivor))


async def test_an_unexpected_error_in_a_tile_fails_the_request_at_once(mesh: list[Node],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    requester, w1, w2 = mesh
    await _exact_request(requester)
    real = w1.runtime.run_block

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug in model code")  # not one of the expected kinds

    for worker in (w1, w2):
        monkeypatch.setattr(worker.runtime, "run_block", broken)
    with pytest.raises(RequestError, match="ZeroDivisionError: a bug in model code"):
        await infer(requester.address, model=MODEL, size=SMALL, secret=SECRET, timeout=WAIT)
    await _until(lambda: all(_request_state(n) == IDLE for n in mesh), "state released",
                 lambda: {n.name: _request_state(n) for n in mesh})
    for worker in (w1, w2):
        monkeypatch.setattr(worker.runtime, "run_block", real)
    await _exact_request(requester)
    await _until(lambda: all(_request_state(n) == IDLE for n in mesh), "state released after success")


async def test_only_a_device_of_the_request_can_fail_it(mesh: list[Node],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    requester = mesh[0]
    await _exact_request(requester)
    entered, release = asyncio.Event(), asyncio.Event()

    def held_on(worker: Node) -> Any:
        real = worker.runtime.run_block

        async def held(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            await release.wait()
            return await real(*args, **kwargs)
        return held

    for worker in mesh[1:]:
        monkeypatch.setattr(worker.runtime, "run_block", held_on(worker))
    request = asyncio.create_task(infer(requester.address, model=MODEL, size=SMALL, secret=SECRET,
                                        check=True))
    await asyncio.wait_for(entered.wait(), WAIT)
    (rid,) = requester.requester.contexts
    intruder = await Connection.open(requester.address.host, requester.address.port, secret=SECRET,
                                     name="mallory")
    try:
        await intruder.send(Message(MsgType.ERROR, rid, {"reason": "forged failure"}))
        await intruder.send(Message(MsgType.ERROR, rid, {"op": "cancel", "reason": "forged cancel"}))
        # the node reads its connections in order: a stats answer means both were handled
        await intruder.send(Message(MsgType.STATE, 1, {"op": "stats"}))
        assert (await intruder.recv()).kind is MsgType.STATE
    finally:
        await intruder.close()
    assert not requester.requester.contexts[rid].done.done()
    release.set()
    meta, _ = await request
    assert meta["check_ok"]


async def test_a_worker_loading_its_model_is_not_an_orphan(mesh: list[Node],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    requester, w1, _ = mesh
    loaded, release = asyncio.Event(), asyncio.Event()
    real = w1.runtime.load

    async def slow_load(*args: Any, **kwargs: Any) -> Any:
        loaded.set()
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(w1.runtime, "load", slow_load)
    monkeypatch.setattr(worker_module, "ORPHAN_PIECE_TTL_S", 0.0)
    request = asyncio.create_task(infer(requester.address, model=MODEL, size=SMALL, secret=SECRET,
                                        strategy="modnn", check=True))
    await asyncio.wait_for(loaded.wait(), WAIT)
    (rid,) = w1.worker.contexts
    w1.sweep(time.monotonic() + 3600.0)
    assert rid in w1.worker.contexts  # plan pending: kept, though older than the orphan TTL
    release.set()
    meta, _ = await request
    assert meta["check_ok"] and "w1" in meta["devices"]


# ---- liveness and shutdown ---------------------------------------------------------------

async def test_any_frame_from_a_peer_proves_it_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await _start_mesh({"a": 1.0, "b": 1.0})
    try:
        real_send = b.send_quietly

        async def no_heartbeats(conn: Any, msg: Message) -> None:
            if msg.kind is not MsgType.GOSSIP:  # b's heartbeats are stuck (behind a big tile)
                await real_send(conn, msg)

        monkeypatch.setattr(b, "send_quietly", no_heartbeats)
        a.membership.dead_after = 1.0
        chatter = Message(MsgType.ERROR, 12345, {"op": "cancel", "reason": "nothing"})
        for _ in range(30):  # 3 s of other frames from b: b stays alive
            await b.send_to("a", chatter)
            await asyncio.sleep(0.1)
            assert a.membership.is_alive("b")
        # silence (no frame at all) is still death
        await _until(lambda: not a.membership.is_alive("b"), "b declared dead")
    finally:
        await asyncio.gather(*(n.close() for n in (a, b)))


async def test_a_stalled_peer_piles_up_no_heartbeats_and_does_not_hold_shutdown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await _start_mesh({"a": 1.0, "b": 1.0})
    stuck: list[Message] = []

    async def blocked(conn: Any, msg: Message) -> None:
        stuck.append(msg)
        await asyncio.Event().wait()  # the send lock of a stalled connection never frees

    try:
        monkeypatch.setattr(a, "send_quietly", blocked)
        await asyncio.sleep(5 * HEARTBEAT_INTERVAL_S)
        assert sum(m.kind is MsgType.GOSSIP and "echo" not in m.meta for m in stuck) == 1
        await asyncio.wait_for(a.close(), WAIT)  # LEAVE cannot be sent: close() still ends
        assert any(m.kind is MsgType.LEAVE for m in stuck)
    finally:
        await asyncio.gather(*(n.close() for n in (a, b)))
