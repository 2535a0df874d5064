"""Links that heal and liveness that load cannot fool, in process over real loopback
sockets: an aborted connection heals, a partition heals by itself, and a frame that takes
longer on the wire than the fixed failure-detection time does not get its sender declared
dead."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from meshci.node.client import RequestError, infer
from meshci.node.membership import Address
from meshci.node.runtime import Runtime
from meshci.node.server import Node, NodeConfig
from meshci.wire import Message, MsgType
from meshci.wire.errors import ConnectionClosed

pytestmark = pytest.mark.timeout(180)

SECRET = os.urandom(32)
SMALL = (32, 32)
HEAL_S = 10.0  # the bound: both see each other alive again within this
WAIT = 60.0  # safety net only


async def _until(predicate: Callable[[], bool], what: str, within: float = WAIT) -> float:
    """Wait for `predicate`; returns how long it took (fails after `within` seconds)."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(within):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"{what}: not within {within} s")
    return time.monotonic() - began


async def _node(name: str, join: tuple[Address, ...] = ()) -> Node:
    node = Node(NodeConfig(name, Address("127.0.0.1", 0), join=join, secret=SECRET),
                Runtime(1, isolate_builds=False))
    await node.start()
    return node


async def _pair() -> tuple[Node, Node]:
    a = await _node("a")
    b = await _node("b", (a.address,))
    await _until(lambda: a.membership.is_alive("b") and b.membership.is_alive("a"), "mesh formed")
    return a, b


def _cut(x: Node, y: Node) -> int:
    """Abort every connection between `x` and `y`, on both sides; returns how many."""
    cut = 0
    for node, other in ((x, y), (y, x)):
        for conn in node.connections.peer_connections():
            if conn.peer_name == other.name:
                conn.abort()
                cut += 1
    return cut


def _healed(x: Node, y: Node) -> bool:
    return (x.membership.is_alive(y.name) and y.membership.is_alive(x.name)
            and x.connections.is_open(y.name) and y.connections.is_open(x.name))


async def _exact_on_both(via: Node) -> None:
    meta, _ = await infer(via.address, model="resnet18", strategy="modnn", size=SMALL, secret=SECRET,
                          check=True)
    assert meta["check_ok"] and sorted(meta["devices"]) == ["a", "b"]


async def test_an_aborted_connection_between_live_nodes_heals_and_the_next_request_uses_both() -> None:
    a, b = await _pair()
    try:
        await _until(lambda: a.connections.control.get("b") is not None
                     and b.connections.control.get("a") is not None, "control lanes up")
        assert _cut(a, b) >= 4  # both lanes, both directions
        took = await _until(lambda: _healed(a, b), "healed", within=HEAL_S)
        print(f"healed after an abort in {took:.2f} s")
        assert a.keeper.redials >= 1 and b.keeper.redials >= 1
        await _exact_on_both(a)
        await _exact_on_both(b)
    finally:
        await asyncio.gather(*(n.close() for n in (a, b)))


async def test_a_partition_heals_by_itself_once_it_ends() -> None:
    a, b = await _pair()
    partitioned = True
    refused = {"a": 0, "b": 0}

    def refusing(node: Node) -> Callable[[Address], Awaitable[Any]]:
        real_open = node.connections.open

        async def open_unless_partitioned(address: Address) -> Any:
            if partitioned:
                refused[node.name] += 1
                raise ConnectionClosed("partitioned")
            return await real_open(address)
        return open_unless_partitioned

    try:
        a.connections.open = refusing(a)  # type: ignore[method-assign]
        b.connections.open = refusing(b)  # type: ignore[method-assign]
        _cut(a, b)
        await _until(lambda: not a.membership.is_alive("b") and not b.membership.is_alive("a"),
                     "both declared each other dead")
        assert a.stats()["peers"]["b"] == "dead" and b.stats()["peers"]["a"] == "dead"
        assert refused["a"] and refused["b"]  # both kept trying ...
        failures = a.keeper.redialer.failures("b")
        await asyncio.sleep(5.0)  # 2.5 capped back-offs (each 1-2 s): at least one retry however loaded
        assert 0 < a.keeper.redialer.failures("b") - failures <= 8  # ... backing off, not in a loop
        partitioned = False
        took = await _until(lambda: _healed(a, b), "rejoined", within=HEAL_S)
        print(f"rejoined {took:.2f} s after the partition ended")
        await _exact_on_both(b)
    finally:
        await asyncio.gather(*(n.close() for n in (a, b)))


async def test_a_request_whose_frames_were_lost_with_a_cut_link_ends_at_once_not_at_its_timeout() -> None:
    """A connection that breaks may take frames with it. The link heals in half a second, so
    the peer is never declared dead: the request must hear of the loss itself."""
    a, b = await _pair()
    real_plan = b._handlers[MsgType.PLAN]
    lost: list[int] = []

    async def plan_lost_in_the_cut(conn: Any, msg: Message) -> None:
        if not lost:
            lost.append(msg.request_id)
            _cut(a, b)  # the PLAN (and the link) are gone
            return
        await real_plan(conn, msg)

    b._handlers[MsgType.PLAN] = plan_lost_in_the_cut
    try:
        try:
            meta, _ = await infer(a.address, model="resnet18", strategy="modnn", size=SMALL, secret=SECRET,
                                  check=True, timeout=WAIT)
        except RequestError as exc:  # failed with the reason, long before any timeout ...
            assert "connection to b was lost" in str(exc)
        else:  # ... or recovered: then exact
            assert meta["check_ok"]
        assert lost
        await _until(lambda: _healed(a, b), "healed", within=HEAL_S)
        await _exact_on_both(a)
    finally:
        await asyncio.gather(*(n.close() for n in (a, b)))


async def test_a_worker_whose_link_to_the_requester_broke_tells_the_requester_at_once() -> None:
    """Only the worker's own lanes to the requester break, with the pieces it had just
    written: the requester's lanes are fine, so only the worker knows what may be lost."""
    a, b = await _pair()
    real_send_to = b.connections.send_to
    lost: list[int] = []

    async def tile_lost_in_the_cut(name: str, msg: Message) -> None:
        if msg.kind is MsgType.TILE and name == "a" and not lost:
            lost.append(msg.request_id)
            for lane in (b.connections.outbound, b.connections.control):
                lane["a"].abort()  # written, then the link died under it
            return
        await real_send_to(name, msg)

    b.connections.send_to = tile_lost_in_the_cut  # type: ignore[method-assign]
    try:
        try:
            meta, _ = await infer(a.address, model="resnet18", strategy="modnn", size=SMALL, secret=SECRET,
                                  check=True, timeout=WAIT)
        except RequestError as exc:
            assert "connection to a was lost" in str(exc)
        else:
            assert meta["check_ok"]
        assert lost
        await _until(lambda: _healed(a, b), "healed", within=HEAL_S)
    finally:
        await asyncio.gather(*(n.close() for n in (a, b)))


class ThrottledProxy:
    """A loopback TCP proxy in front of one node: what clients send through it reaches the
    node at `rate` bytes per second per connection; the way back is not throttled."""

    def __init__(self, target: Address, rate: float) -> None:
        self.target = target
        self.rate = rate
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> Address:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return Address("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        for task in (self._pump(reader, up_writer, self.rate), self._pump(up_reader, writer, None)):
            t = asyncio.get_running_loop().create_task(task)
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
        try:
            while data := await reader.read(16 << 10):
                writer.write(data)
                await writer.drain()
                if rate is not None:
                    await asyncio.sleep(len(data) / rate)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_frame_slower_than_the_failure_timeout_does_not_get_its_sender_declared_dead() -> None:
    b = await _node("b")
    proxy = ThrottledProxy(b.address, rate=256 << 10)  # 2 Mbit/s from a to b
    b.membership.address = await proxy.start()  # b is known (and dialled) at the proxy
    a = await _node("a", (b.membership.address,))
    arrived: list[float] = []
    real_state = b._handlers[MsgType.STATE]

    async def on_state(conn: Any, msg: Message) -> None:
        if msg.tensors:
            arrived.append(time.monotonic())
            assert msg.tensors[0].numel() == 512 << 10
        await real_state(conn, msg)

    b._handlers[MsgType.STATE] = on_state
    try:
        await _until(lambda: a.membership.is_alive("b") and b.membership.is_alive("a"), "mesh formed")
        await _until(lambda: a.connections.control.get("b") is not None, "a's control lane up")
        began = time.monotonic()
        bulk = Message(MsgType.STATE, 1, {"op": "stats"}, (torch.ones(512 << 10),))  # 2 MiB
        await a.send_to("b", bulk)
        await _until(lambda: bool(arrived), "the big frame arrived")
        took = arrived[0] - began
        print(f"a 2 MiB frame took {took:.1f} s on the wire (dead after {b.membership.dead_after} s)")
        assert took > b.membership.dead_after  # the frame outlasted the fixed failure timeout ...
        assert b.membership.is_alive("a") and b.metrics.peer_failures == 0  # ... and a never died
        assert a.metrics.peer_failures == 0
    finally:
        await asyncio.gather(*(n.close() for n in (a, b)))
        await proxy.close()
