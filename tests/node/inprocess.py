"""An in-process mesh over real loopback sockets, for tests of the user surface."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from meshci.node.membership import Address
from meshci.node.runtime import Runtime
from meshci.node.server import Node, NodeConfig


async def start_mesh(speeds: dict[str, float], secret: bytes, *, data_root: Path | None = None,
                     per_node: Mapping[str, Mapping[str, Any]] | None = None, **config: Any) -> list[Node]:
    """Nodes named and sped as `speeds` says, each joined through the first, once every node
    sees all the others alive. `data_root`: each node its own data dir below it (profiles,
    heads, shipped models); `per_node`: config fields of single nodes, beside `config`."""
    nodes: list[Node] = []
    try:
        for name, gflops in speeds.items():
            join = (nodes[0].address,) if nodes else ()
            data_dir = None if data_root is None else data_root / name
            fields = {**config, **(per_node or {}).get(name, {})}
            node = Node(NodeConfig(name, Address("127.0.0.1", 0), join=join, secret=secret, gflops=gflops,
                                   data_dir=data_dir, **fields),
                        Runtime(1, isolate_builds=False, data_dir=data_dir))
            await node.start()
            nodes.append(node)
        async with asyncio.timeout(30):
            while not all(len(n.membership.alive()) == len(nodes) - 1 for n in nodes):
                await asyncio.sleep(0.05)
    except BaseException:
        await asyncio.gather(*(n.close() for n in nodes))
        raise
    return nodes



async def crash(node: Node) -> None:
    """Stop `node` as a killed process would: no LEAVE, its sockets reset, its timers gone."""
    await node.halt()


async def until(predicate: Callable[[], bool], what: str, show: Callable[[], Any] | None = None,
                wait: float = 30.0) -> None:
    """Wait for `predicate` (a safety net, `wait` seconds: no assertion depends on it); on
    timeout fail saying what was awaited and what `show()` returns then."""
    try:
        async with asyncio.timeout(wait):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"{what}: not after {wait} s" + (f"; now {show()}" if show is not None else ""))
