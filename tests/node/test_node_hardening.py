"""Issue 11 against in-process nodes over real loopback sockets: an authenticated peer (or
client) that sends hostile frames gets a reason and its connection lives, cannot speak for
another node, cannot make the node hold unbounded state or build a model at any size, and
the node still answers exact requests."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from meshci.node.client import RequestError, infer
from meshci.node.connections import FIRST_MESSAGE_TIMEOUT_S, HANDSHAKES_PER_SOURCE
from meshci.node.fuzz import INF, FuzzClient
from meshci.node.membership import Address, Advert
from meshci.node.pieces import encode as encode_pieces
from meshci.node.runtime import Runtime
from meshci.node.server import MAX_PENDING_TILES, Node, NodeConfig
from meshci.planning.plan import BlockPlan, Plan, TileSpec
from meshci.trunk import Region
from meshci.wire import Message, MsgType

pytestmark = pytest.mark.timeout(120)

SECRET = os.urandom(32)
WAIT = 20.0  # safety net only: no assertion depends on it


async def _until(predicate: Any, what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"{what}: not after {WAIT} s")


@pytest.fixture
async def mesh() -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    for name in ("target", "peer"):
        join = (nodes[0].address,) if nodes else ()
        node = Node(NodeConfig(name, Address("127.0.0.1", 0), join=join, secret=SECRET),
                    Runtime(1, isolate_builds=False))
        await node.start()
        nodes.append(node)
    await _until(lambda: all(len(n.membership.alive()) == 1 for n in nodes), "mesh formed")
    yield nodes
    await asyncio.gather(*(n.close() for n in nodes))


async def _client(node: Node, name: str = "mallory") -> FuzzClient:
    return await FuzzClient.open(node.address, SECRET, name)


async def _answer(client: FuzzClient, kind: MsgType, request_id: int) -> Message:
    """The next reply of `kind` for `request_id` on the client's connection."""
    async with asyncio.timeout(WAIT):
        while True:
            for msg in client.received:
                if msg.kind is kind and msg.request_id == request_id:
                    client.received.remove(msg)
                    return msg
            assert not client.closed, f"the node dropped the connection; got {client.received}"
            await asyncio.sleep(0.02)


async def _still_served(client: FuzzClient) -> None:
    """The connection lives: the node answers a STATE request on it."""
    await client.send(Message(MsgType.STATE, 77, {"op": "stats"}))
    assert (await _answer(client, MsgType.STATE, 77)).meta["name"] == "target"


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def _plan(requester: str, side: int, device: str = "target") -> Plan:
    return Plan("local", "resnet18", (3, side, side), requester,
                (BlockPlan(0, 1, (TileSpec(device, Region(0, side, 0, side)),), {}),), "p2p", 0.1, 0.0)


# ---- item 5 and 9: a malformed frame of a known kind is answered, the connection lives ----

@pytest.mark.parametrize("meta", [
    {"name": "mallory", "host": "127.0.0.1", "port": 9, "incarnation": 1, "advert": [1, 2]},
    {"name": "mallory", "host": "127.0.0.1", "port": 9, "incarnation": 1, "advert": {"gflops": 1e300}},
    {"name": "mallory", "host": "127.0.0.1", "port": 9, "incarnation": 10 ** 400},
    {"name": "mallory", "host": "127.0.0.1", "port": 9, "incarnation": 1, "backlog_s": INF},
])
async def test_a_bad_heartbeat_is_dropped_and_the_connection_lives(
        mesh: list[Node], meta: dict, caplog: pytest.LogCaptureFixture) -> None:
    client = await _client(mesh[0])
    with caplog.at_level(logging.INFO):
        await client.send(Message(MsgType.GOSSIP, 0, meta))
        await _still_served(client)
    assert mesh[0].membership.peer("mallory") is None
    assert not _errors(caplog)
    await client.close()


@pytest.mark.parametrize("kind, meta, tensors, said", [
    (MsgType.TILE, {"pieces": [[0, 0, 1, 0, 1, "tile"]], "sent_at": 10 ** 400, "path_s": 0.0},
     (torch.ones(1, 3, 1, 1),), "sent_at"),
    (MsgType.TILE, {"pieces": [[0, 0, 1, 0, 1, "tile"]], "sent_at": 1.0, "path_s": INF},
     (torch.ones(1, 3, 1, 1),), "path_s"),
    (MsgType.INFER, {"model": "resnet18", "size": [32, 32], "seed": INF}, (), "seed"),
    (MsgType.INFER, {"model": "resnet18", "size": [32, 32], "input_seed": 10 ** 400}, (), "input_seed"),
    (MsgType.INFER, {"model": "resnet18", "size": [32, 10 ** 30]}, (), "size"),
    (MsgType.INFER, {"model": ["x"], "size": [32, 32]}, (), "model"),
    (MsgType.CALL_FOR_BIDS, {"type": "call_for_bids", "auction_id": "a", "round": 10 ** 400,
                             "sender": "mallory", "items": [], "reply_within_s": 1.0}, (), None),
    (MsgType.PLAN, {"digest": "d", "plan": {"blocks": 10 ** 400}}, (), None),
    (MsgType.PLAN, {"digest": "d", "plan": _plan("mallory", 32, device="x\nERROR forged").to_json()}, (), None),
])
async def test_a_malformed_frame_gets_a_reason_not_a_traceback(
        mesh: list[Node], kind: MsgType, meta: dict, tensors: tuple, said: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    client = await _client(mesh[0])
    with caplog.at_level(logging.INFO):
        await client.send(Message(kind, 5, meta, tensors))
        if said is not None:
            reply = await _answer(client, MsgType.ERROR, 5)
            assert said in reply.meta["reason"] and "internal error" not in reply.meta["reason"]
        await _still_served(client)
    assert not _errors(caplog), _errors(caplog)
    await client.close()


async def test_a_reason_from_a_peer_is_logged_escaped_and_cut(mesh: list[Node],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    client = await _client(mesh[0])
    with caplog.at_level(logging.INFO):
        await client.send(Message(MsgType.ERROR, 9, {"reason": "boom\nERROR forged line " + "x" * 100_000}))
        await _still_served(client)
    lines = [r.getMessage() for r in caplog.records if "boom" in r.getMessage()]
    assert lines and all("\n" not in line and len(line) < 1000 for line in lines)
    await client.close()


async def test_a_forged_echo_cannot_make_the_nodes_links_infinite(mesh: list[Node]) -> None:
    target = mesh[0]
    await _until(lambda: target.link_view(), "a measured link to the peer")
    client = await _client(target)
    for echo in (0.0, -1e308, 10 ** 400):
        await client.send(Message(MsgType.GOSSIP, 0, {"op": "echo", "echo": echo, "wall": -1e308}))
        await client.send(Message(MsgType.GOSSIP, 0, {"op": "echo", "echo": {"a": -1e308}, "wall": INF}))
    await _still_served(client)
    # its own advert is still one every peer accepts (it was refused everywhere: "inf")
    links = Advert.from_json(target.advert().to_json()).links
    assert [name for name, _, _ in links] == ["peer"]
    assert all(math.isfinite(mbps) and math.isfinite(ms) for _, mbps, ms in links)
    await asyncio.sleep(1.5)
    assert target.membership.is_alive("peer") and mesh[1].membership.is_alive("target")
    await client.close()


async def test_tiles_from_clients_add_no_links_to_the_nodes_advert(mesh: list[Node]) -> None:
    target = mesh[0]
    listed, tensors = encode_pieces([(1, Region(0, 64, 0, 64), "tile", torch.zeros(1, 64, 64, 64))])
    for i in range(5):  # each connection under a new name, each frame large enough to time
        client = await _client(target, f"client-{i}")
        await client.send(Message(MsgType.TILE, 300 + i, {"pieces": listed, "sent_at": 1.0}, tensors))
        await _still_served(client)
        await client.close()
    names = {name for name, _, _ in target.link_view()} | set(target.links.known())
    assert names <= {"peer"}


async def test_a_result_that_cannot_be_encoded_becomes_an_error_reply(
        mesh: list[Node], monkeypatch: pytest.MonkeyPatch) -> None:
    real = mesh[0].requester.infer

    async def overflowing(msg: Message) -> Any:
        meta, logits, learn = await real(msg)
        return {**meta, "predicted_latency_s": float("inf")}, logits, learn

    monkeypatch.setattr(mesh[0].requester, "infer", overflowing)
    with pytest.raises(RequestError, match="unencodable result"):
        await infer(mesh[0].address, model="resnet18", size=(32, 32), secret=SECRET, timeout=WAIT)


# ---- item 2: a node's own facts only from its own connection -------------------------

async def test_a_client_cannot_keep_a_dead_node_alive(mesh: list[Node]) -> None:
    target, peer = mesh
    digest = {**peer.membership.self_digest(), "advert": {"gflops": 1000.0}}
    await peer.close()
    client = await _client(target)
    for _ in range(8):  # forging for 2 s (its LEAVE made it dead at once; a forgery revived it)
        await client.send(Message(MsgType.GOSSIP, 0, {**digest, "incarnation": 2 ** 63 - 1}))
        await client.send(Message(MsgType.JOIN, 0, digest))
        await asyncio.sleep(0.25)
        if client.closed:  # the JOIN is refused (with a reason): dial again
            assert client.received[-1].kind is MsgType.ERROR
            client = await _client(target)
    assert not target.membership.is_alive("peer")
    assert all(p.advert.gflops < 1000.0 for p in target.membership.peers())
    await client.close()


async def test_pieces_from_a_device_the_plan_does_not_name_are_ignored(mesh: list[Node]) -> None:
    target = mesh[0]
    meta, _ = await infer(target.address, model="resnet18", size=(32, 32), secret=SECRET,
                          strategy="modnn", check=True, timeout=WAIT)  # warm: plans stand
    assert meta["check_ok"]
    client = await _client(target, "peer-not")
    stop = asyncio.Event()

    async def inject() -> None:
        # gather pieces and logits for every request id the requester has in flight
        while not stop.is_set():
            for rid in list(target.requester.contexts):
                listed, tensors = encode_pieces([(1, Region(0, 1, 0, 1), "gather", torch.zeros(1, 64, 1, 1)),
                                                 (0, Region(0, 1, 0, 1), "logits", torch.zeros(1, 1000))])
                await client.send(Message(MsgType.TILE, rid, {"pieces": listed}, tensors))
            await asyncio.sleep(0)

    injecting = asyncio.get_running_loop().create_task(inject())
    try:
        for _ in range(3):
            meta, _ = await infer(target.address, model="resnet18", size=(32, 32), secret=SECRET,
                                  strategy="modnn", check=True, timeout=WAIT)
            assert meta["check_ok"]
    finally:
        stop.set()
        await injecting
        await client.close()


# ---- item 4 and 6: a PLAN is checked before any model is built; an early cancel holds --

async def test_a_plan_of_any_size_is_refused_before_the_model_is_built(
        mesh: list[Node], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    target = mesh[0]
    loads: list[tuple[int, int]] = []
    real = target.runtime.load

    async def recording(name: str, seed: int, size: tuple[int, int]) -> Any:
        loads.append(size)
        return await real(name, seed, size)

    monkeypatch.setattr(target.runtime, "load", recording)
    client = await _client(target)
    plan = _plan("mallory", 20000)
    with caplog.at_level(logging.INFO):
        await client.send(Message(MsgType.PLAN, 11, {"digest": plan.digest(), "plan": plan.to_json(),
                                                     "model": "resnet18", "size": [20000, 20000], "seed": 0,
                                                     "pieces": []}))
        await _until(lambda: any("cannot serve the plan" in r.getMessage() for r in caplog.records),
                     "the PLAN refused")
    assert loads == [] and 11 not in target.worker.contexts
    assert any("size" in r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage())
    await _still_served(client)
    await client.close()


async def test_a_cancel_that_overtakes_its_plan_is_kept(mesh: list[Node], monkeypatch: pytest.MonkeyPatch) -> None:
    target = mesh[0]
    loads: list[tuple[int, int]] = []

    async def recording(name: str, seed: int, size: tuple[int, int]) -> Any:
        loads.append(size)
        raise AssertionError("the PLAN of a cancelled request must not load its model")

    monkeypatch.setattr(target.runtime, "load", recording)
    client = await _client(target)
    plan = _plan("mallory", 32)
    await client.send(Message(MsgType.ERROR, 12, {"op": "cancel", "reason": "client gave up"}))
    await client.send(Message(MsgType.PLAN, 12, {"digest": plan.digest(), "plan": plan.to_json(),
                                                 "model": "resnet18", "size": [32, 32], "seed": 0,
                                                 "pieces": []}))
    await _still_served(client)
    await asyncio.sleep(0.2)
    assert loads == [] and 12 not in target.worker.contexts and 12 in target.worker.cancelled
    # another sender's cancel of a request id does not stop that id's PLAN from its requester
    other = await _client(target, "other")
    await other.send(Message(MsgType.ERROR, 13, {"op": "cancel", "reason": "not yours"}))
    await _still_served(other)
    await client.send(Message(MsgType.PLAN, 13, {"digest": plan.digest(), "plan": plan.to_json(), "model": "resnet18",
                                                 "size": [32, 32], "seed": 0, "pieces": []}))
    await _until(lambda: loads, "the PLAN of request 13 loads its model")
    await client.close()
    await other.close()


# ---- item 3: what peers can make a node hold is bounded ------------------------------

async def test_orphan_pieces_are_capped_per_peer(mesh: list[Node], caplog: pytest.LogCaptureFixture) -> None:
    target = mesh[0]
    budget = target.worker.orphans
    budget.per_peer, budget.total = 4 << 20, 6 << 20  # small caps: the same code, fewer bytes
    client = await _client(target)
    piece = torch.zeros(1, 64, 64, 64)  # 1 MiB
    listed, tensors = encode_pieces([(1, Region(0, 64, 0, 64), "tile", piece)])
    with caplog.at_level(logging.WARNING):
        for rid in range(100, 110):
            await client.send(Message(MsgType.TILE, rid, {"pieces": listed}, tensors))
        await _still_served(client)
        await _until(lambda: sum(1 for r in caplog.records if "no plan here" in r.getMessage()) >= 6,
                     "pieces over the cap dropped")
    assert budget.held_by("mallory") <= 4 << 20 and len(target.worker.contexts) == 4
    other = await _client(target, "other")
    for rid in range(200, 204):
        await other.send(Message(MsgType.TILE, rid, {"pieces": listed}, tensors))
    await _still_served(other)
    assert budget.held <= 6 << 20
    target.worker.sweep(10 ** 6)  # the orphans' TTL passed: all of it is released
    assert budget.held == 0 and not target.worker.contexts
    await client.close()
    await other.close()


async def test_a_client_cannot_hold_bidder_commitments(mesh: list[Node]) -> None:
    target = mesh[0]
    client = await _client(target)
    for i in range(20):
        await client.send(Message(MsgType.CALL_FOR_BIDS, 400 + i, {
            "type": "call_for_bids", "auction_id": str(400 + i), "round": 0, "sender": "mallory",
            "items": [], "reply_within_s": 1.0}))
    await _still_served(client)
    await asyncio.sleep(0.1)
    assert target.worker.bid_auctions == {} and target.worker.bidder.auctions() == ()
    await client.close()


async def test_requests_held_by_a_worker_are_capped(mesh: list[Node], monkeypatch: pytest.MonkeyPatch) -> None:
    from meshci.node import worker as worker_module

    monkeypatch.setattr(worker_module, "MAX_CONTEXTS", 3)  # the same code, a small cap
    target = mesh[0]
    client = await _client(target)
    listed, tensors = encode_pieces([(1, Region(0, 1, 0, 1), "tile", torch.zeros(1, 1, 1, 1))])
    for rid in range(500, 505):
        await client.send(Message(MsgType.TILE, rid, {"pieces": listed}, tensors))
    plan = _plan("mallory", 32)
    await client.send(Message(MsgType.PLAN, 600, {"digest": plan.digest(), "plan": plan.to_json(),
                                                  "model": "resnet18", "size": [32, 32], "seed": 0,
                                                  "pieces": []}))
    await _still_served(client)
    await asyncio.sleep(0.2)
    assert sorted(target.worker.contexts) == [500, 501, 502]
    await client.close()


async def test_one_gossip_frame_cannot_add_hundreds_of_peers(mesh: list[Node]) -> None:
    target = mesh[0]
    client = await _client(target)
    entries = [{"name": f"ghost{i}", "host": "127.0.0.1", "port": 1 + i, "incarnation": 1} for i in range(500)]
    await client.send(Message(MsgType.GOSSIP, 0, {"name": "mallory", "host": "127.0.0.1", "port": 9,
                                                  "incarnation": 1, "gossip": entries}))
    for chunk in range(0, 500, 100):
        await client.send(Message(MsgType.GOSSIP, 0, {"name": "x", "host": "h", "port": 1, "incarnation": 1,
                                                      "gossip": entries[chunk:chunk + 100]}))
    await _still_served(client)
    assert len(target.membership.peers()) <= 2 + 64
    await _until(lambda: not target.connections._dialing, "dial locks freed")
    await client.close()


async def test_tile_frames_past_the_pending_cap_stop_reading_that_connection(
        mesh: list[Node], monkeypatch: pytest.MonkeyPatch) -> None:
    target = mesh[0]
    release = asyncio.Event()
    started: list[int] = []

    async def stuck(rid: int, *_: Any) -> None:
        started.append(rid)
        await release.wait()

    monkeypatch.setattr(target, "take_pieces", stuck)
    client = await _client(target)
    listed, tensors = encode_pieces([(1, Region(0, 1, 0, 1), "tile", torch.zeros(1, 1, 1, 1))])
    for rid in range(MAX_PENDING_TILES + 10):
        await client.send(Message(MsgType.TILE, 1000 + rid, {"pieces": listed}, tensors))
    await client.send(Message(MsgType.STATE, 77, {"op": "stats"}))
    await _until(lambda: len(started) == MAX_PENDING_TILES, "the first frames taken")
    await asyncio.sleep(0.3)
    # back-pressure: nothing more is read from that connection while its work is stuck
    assert len(started) == MAX_PENDING_TILES and not client.received
    release.set()
    assert (await _answer(client, MsgType.STATE, 77)).meta["name"] == "target"
    assert len(started) == MAX_PENDING_TILES + 10
    await client.close()


# ---- item 1: idle sockets from one address cannot lock others out --------------------

async def test_a_flood_of_idle_sockets_from_one_address_does_not_lock_others_out(mesh: list[Node]) -> None:
    target = mesh[0]
    limiter = target.connections.handshakes
    idle: list[asyncio.StreamWriter] = []
    try:
        began = asyncio.get_running_loop().time()
        for _ in range(300):  # never say a word, from 127.0.0.2
            _, writer = await asyncio.open_connection(target.address.host, target.address.port,
                                                      local_addr=("127.0.0.2", 0))
            idle.append(writer)
        await asyncio.sleep(0.1)
        meta, _ = await infer(target.address, model="resnet18", size=(32, 32), secret=SECRET, check=True,
                              timeout=WAIT)  # a client from 127.0.0.1 is served meanwhile
        assert meta["check_ok"]
        assert limiter.pending_from("127.0.0.2") <= HANDSHAKES_PER_SOURCE
        await _until(lambda: limiter.pending == 0, "the idle sockets closed")
        assert asyncio.get_running_loop().time() - began < FIRST_MESSAGE_TIMEOUT_S + 5.0
        assert target.membership.is_alive("peer")
    finally:
        for writer in idle:
            writer.close()


async def test_a_plan_naming_devices_that_are_not_node_names_is_refused(mesh: list[Node]) -> None:
    plan = _plan("mallory", 32, device="x\nERROR forged")
    with pytest.raises(ValueError, match="not node names"):
        mesh[0].worker._plan_of("mallory", {"digest": plan.digest(), "plan": plan.to_json()})
    good = _plan("mallory", 32)
    assert mesh[0].worker._plan_of("mallory", {"digest": good.digest(), "plan": good.to_json()}) == good


async def test_no_tile_runs_while_a_model_is_traced_in_the_process() -> None:
    """torch.fx tracing patches every module's call, process-wide: a tile computed meanwhile
    (here: while another node of this process builds a model) failed with NameError. A tile
    now waits for the build, on the compute thread: the event loop stays free."""
    from meshci.node.model_cache import _BUILD_LOCK

    runtime = Runtime(1, isolate_builds=False)
    try:
        loaded = await runtime.load("resnet18", 0, (32, 32))
        trunk = loaded.trunk
        out = Region(0, 4, 0, 4)
        have = Region(0, 32, 0, 32)
        x = torch.randn(1, 3, 32, 32)
        _BUILD_LOCK.acquire()  # as a build on another thread holds it
        try:
            tile = asyncio.get_running_loop().create_task(
                runtime.run_block(trunk, 0, 1, x, have, out, inline=True))
            began = asyncio.get_running_loop().time()
            await asyncio.sleep(0.2)  # the loop is not held by the waiting tile
            assert asyncio.get_running_loop().time() - began < 1.0 and not tile.done()
        finally:
            _BUILD_LOCK.release()
        y, _, _ = await asyncio.wait_for(tile, WAIT)
        assert torch.equal(y, trunk.segments[0].run(x, have, out).contiguous())
    finally:
        runtime.close()
