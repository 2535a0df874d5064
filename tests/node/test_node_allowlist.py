"""The node-side model allowlist: built-in models always; a user model
(`package.module:callable`) only when the node was started with --allow-model naming it.
Anyone who can send a request names the model, so nothing else may be imported."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from meshci.models.registry import ModelNotAllowedError, check_model_allowed, model_allowed
from meshci.node.client import RequestError, infer
from meshci.node.membership import Address
from meshci.node.runtime import Runtime
from meshci.node.server import Node, NodeConfig

pytestmark = pytest.mark.timeout(120)

SMALL = (32, 32)
SECRET = os.urandom(32)


async def _start_pair(allow: tuple[str, ...]) -> list[Node]:
    nodes: list[Node] = []
    for name in ("a1", "a2"):
        join = (nodes[0].address,) if nodes else ()
        node = Node(NodeConfig(name, Address("127.0.0.1", 0), join=join, secret=SECRET, allow_models=allow),
                    Runtime(1, isolate_builds=False))
        await node.start()
        nodes.append(node)
    async with asyncio.timeout(30):
        while not all(n.membership.alive() for n in nodes):
            await asyncio.sleep(0.05)
    return nodes


def test_allowlist_patterns() -> None:
    assert model_allowed("vgg16", ())
    assert not model_allowed("os:getcwd", ())
    assert model_allowed("mypkg.nets:small", ("mypkg.nets:small",))
    assert not model_allowed("mypkg.nets:big", ("mypkg.nets:small",))
    assert model_allowed("mypkg.nets:big", ("mypkg.*",))
    assert model_allowed("mypkg:net", ("mypkg.*",))
    assert not model_allowed("mypkgevil:net", ("mypkg.*",))
    with pytest.raises(ModelNotAllowedError, match="--allow-model"):
        check_model_allowed("os:getcwd", ("mypkg.*",))


async def test_a_node_imports_no_model_outside_its_allowlist() -> None:
    module = "tabnanny"  # an importable stdlib module nothing here imports
    assert module not in sys.modules
    nodes = await _start_pair(("torch.nn:Identity",))
    try:
        for via in nodes:
            with pytest.raises(RequestError, match="not allowed on this node"):
                await infer(via.address, model=f"{module}:check", size=SMALL, secret=SECRET)
        assert module not in sys.modules
        # an allowed user model is imported and built (Identity is not a CNN: a clear error)
        with pytest.raises(RequestError) as refused:
            await infer(nodes[0].address, model="torch.nn:Identity", size=SMALL, secret=SECRET)
        assert "not allowed" not in str(refused.value)
        meta, _ = await infer(nodes[1].address, model="resnet18", size=SMALL, secret=SECRET,
                              strategy="modnn", check=True)
        assert meta["check_ok"] and sorted(meta["devices"]) == ["a1", "a2"]
    finally:
        await asyncio.gather(*(n.close() for n in nodes))


def test_cli_refuses_a_malformed_allow_pattern() -> None:
    result = subprocess.run([sys.executable, "-m", "meshci", "node", "--insecure", "--allow-model", "os"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "bad --allow-model 'os'" in result.stderr
