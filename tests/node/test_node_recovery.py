"""A request survives a device lost under it, in process over real loopback sockets: a
worker that dies (crash, no LEAVE) or is cut off (its connections aborted) while it holds
a tile is replaced by the survivors and the answer is exact; a request nobody can finish
fails with one clear line by its deadline; a client that goes away and a requester that
dies leave no request state on any node; a hostile deadline is refused."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from meshci.node.client import DEADLINE_GRACE_S, RequestError, infer
from meshci.node.server import Node
from meshci.wire import Connection, Message, MsgType
from tests.node.inprocess import crash, start_mesh, until

pytestmark = pytest.mark.timeout(180)

SMALL = (32, 32)
MODEL = "resnet18"
SECRET = os.urandom(32)
WAIT = 30.0  # safety net only: no assertion depends on it
IDLE = {"requests": 0, "work": 0, "auctions": 0, "bid_auctions": 0, "bidder_auctions": (),
        "bidder_backlog_s": 0.0, "queued_s": 0.0}


@pytest.fixture
async def mesh() -> AsyncIterator[list[Node]]:
    # a slow requester and fast workers: the workers get the tiles
    nodes = await start_mesh({"q": 0.05, "w1": 5.0, "w2": 5.0, "w3": 5.0}, SECRET)
    yield nodes
    await asyncio.gather(*(n.close() for n in nodes if not n.stopped))


def _states(nodes: list[Node]) -> dict[str, Any]:
    return {n.name: n.request_state() for n in nodes}


def _gate(nodes: list[Node], monkeypatch: pytest.MonkeyPatch, *, hang_all: bool = False) -> asyncio.Queue[Node]:
    """The first of `nodes` to start a tile hangs in it (all do with `hang_all`); the
    queue says who. The others compute as usual."""
    stuck: asyncio.Queue[Node] = asyncio.Queue()
    chosen: list[Node] = []

    for node in nodes:
        real = node.runtime.run_block

        def gated(node: Node = node, real: Any = real) -> Any:
            async def run_block(*args: Any, **kwargs: Any) -> Any:
                if hang_all or not chosen or chosen[0] is node:
                    if node not in chosen:
                        chosen.append(node)
                        stuck.put_nowait(node)
                    await asyncio.Event().wait()  # a tile that never finishes
                return await real(*args, **kwargs)
            return run_block

        monkeypatch.setattr(node.runtime, "run_block", gated())
    return stuck


def _cut(node: Node) -> None:
    """Cut `node` off: every connection it has, to peers and from them, aborted at once
    (the process lives on)."""
    node.connections.abort_all()


@pytest.mark.parametrize("how", ["crash", "cut"])
async def test_a_worker_lost_while_it_holds_a_tile_is_replaced_and_the_answer_is_exact(
        mesh: list[Node], monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    requester, workers = mesh[0], mesh[1:]
    await infer(requester.address, model=MODEL, size=SMALL, secret=SECRET, check=True)  # models built
    stuck = _gate(workers, monkeypatch)
    request = asyncio.create_task(infer(requester.address, model=MODEL, size=SMALL, secret=SECRET,
                                        check=True, deadline=60.0))
    victim = await asyncio.wait_for(stuck.get(), WAIT)
    assert victim.worker.contexts  # mid-request, holding a tile
    if how == "crash":
        await crash(victim)
    else:
        _cut(victim)
    meta, _ = await asyncio.wait_for(request, WAIT)
    assert meta["check_ok"], meta["max_abs_diff"]
    assert meta["attempts"] == 2 and meta["lost"] == [victim.name]
    assert victim.name not in meta["devices"]
    survivors = [n for n in mesh if n is not victim]
    await until(lambda: all(n.request_state() == IDLE for n in survivors), "state released",
                 lambda: _states(survivors))
    # the failure is counted (a second one soon would back the device off); the next
    # request is exact again, without the crashed device (it may try it once more while
    # membership still believes it up)
    assert requester.requester.backoff.failures(victim.name) >= 1
    monkeypatch.undo()  # the cut victim lives on (its link heals): its tiles compute again
    meta, _ = await infer(requester.address, model=MODEL, size=SMALL, secret=SECRET, check=True)
    assert meta["check_ok"]
    assert how == "cut" or victim.name not in meta["devices"]


async def test_a_request_nobody_can_finish_fails_with_a_clear_line_by_its_deadline(
        mesh: list[Node], monkeypatch: pytest.MonkeyPatch) -> None:
    requester, workers = mesh[0], mesh[1:]
    await infer(requester.address, model=MODEL, size=SMALL, secret=SECRET)
    stuck = _gate(mesh, monkeypatch, hang_all=True)  # the requester's own tiles hang too
    deadline = 6.0
    began = time.monotonic()
    request = asyncio.create_task(infer(requester.address, model=MODEL, size=SMALL, secret=SECRET,
                                        deadline=deadline))
    await asyncio.wait_for(stuck.get(), WAIT)
    for worker in workers:  # every worker dies
        await crash(worker)
    with pytest.raises(RequestError, match=r"deadline of 6 s passed .*lost") as failure:
        await request
    assert time.monotonic() - began < deadline + DEADLINE_GRACE_S  # answered, not timed out at the client
    assert "\n" not in str(failure.value)
    await until(lambda: requester.request_state() == IDLE, "requester state released",
                 lambda: requester.request_state())


async def test_a_client_that_goes_away_cancels_its_request_everywhere(
        mesh: list[Node], monkeypatch: pytest.MonkeyPatch) -> None:
    requester = mesh[0]
    await infer(requester.address, model=MODEL, size=SMALL, secret=SECRET)
    stuck = _gate(mesh, monkeypatch, hang_all=True)
    client = await Connection.open(requester.address.host, requester.address.port, secret=SECRET,
                                   name="client-gone")
    await client.send(Message(MsgType.INFER, 77, {"model": MODEL, "size": list(SMALL)}))
    await asyncio.wait_for(stuck.get(), WAIT)
    assert requester.requester.contexts and any(n.worker.contexts for n in mesh)
    await client.close()  # the client hangs up mid-request
    await until(lambda: all(n.request_state() == IDLE for n in mesh), "state released everywhere",
                 lambda: _states(mesh))


async def test_a_requester_that_dies_leaves_no_request_state_on_its_peers(
        mesh: list[Node], monkeypatch: pytest.MonkeyPatch) -> None:
    requester, workers = mesh[0], mesh[1:]
    await infer(requester.address, model=MODEL, size=SMALL, secret=SECRET)
    stuck = _gate(workers, monkeypatch, hang_all=True)
    request = asyncio.create_task(infer(requester.address, model=MODEL, size=SMALL, secret=SECRET))
    await asyncio.wait_for(stuck.get(), WAIT)
    assert any(w.worker.contexts for w in workers)
    await crash(requester)
    with pytest.raises(RequestError):
        await request
    await until(lambda: all(w.request_state() == IDLE for w in workers), "workers dropped the request",
                 lambda: _states(workers))


@pytest.mark.parametrize("deadline", [0, -3, 1e9, "soon", True, None])
async def test_a_hostile_deadline_is_refused_and_the_node_keeps_serving(mesh: list[Node], deadline: Any) -> None:
    requester = mesh[0]
    conn = await Connection.open(requester.address.host, requester.address.port, secret=SECRET, name="mallory")
    try:
        await conn.send(Message(MsgType.INFER, 5, {"model": MODEL, "size": list(SMALL), "deadline_s": deadline}))
        reply = await asyncio.wait_for(conn.recv(), WAIT)
    finally:
        await conn.close()
    assert reply.kind is MsgType.ERROR and "deadline_s" in reply.meta["reason"] and reply.meta.get("usage") is True
    meta, _ = await infer(requester.address, model=MODEL, size=SMALL, secret=SECRET, check=True)
    assert meta["check_ok"]
