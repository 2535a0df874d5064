"""What a user sees when something goes wrong: one line saying what to do, exit status 2
for a request that cannot work as given, 1 for a runtime failure."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from meshci.node.client import RequestError, failure_hint, infer
from meshci.node.membership import Address
from meshci.node.runtime import Runtime
from meshci.node.server import Node, NodeConfig

pytestmark = pytest.mark.timeout(120)

SECRET = os.urandom(32)


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = Node(NodeConfig("solo", Address("127.0.0.1", 0), secret=SECRET, gflops=1.0),
             Runtime(1, isolate_builds=False))
    await n.start()
    yield n
    await n.close()


async def test_a_wrong_secret_says_which_secret_to_use(node: Node) -> None:
    with pytest.raises(RequestError) as caught:
        await infer(node.address, model="vgg11", size=(32, 32), secret=os.urandom(32))
    assert caught.value.exit_status == 1
    assert "did not accept our cluster secret" in str(caught.value)
    assert "use the --secret-file the mesh's nodes were started with" in str(caught.value)


async def test_unknown_model_and_strategy_are_usage_errors(node: Node) -> None:
    with pytest.raises(RequestError, match="unknown model 'alexnet9'; known models: vgg11") as caught:
        await infer(node.address, model="alexnet9", size=(32, 32), secret=SECRET)
    assert caught.value.exit_status == 2
    with pytest.raises(RequestError, match="unknown strategy 'fastest'") as caught:
        await infer(node.address, model="vgg11", strategy="fastest", size=(32, 32), secret=SECRET)
    assert caught.value.exit_status == 2
    # the node keeps serving
    meta, _ = await infer(node.address, model="vgg11", size=(32, 32), secret=SECRET, strategy="local")
    assert meta["devices"] == ["solo"]


async def test_nobody_listening_is_a_runtime_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again once closed: nobody listens there
    with pytest.raises(RequestError) as caught:
        await infer(Address("127.0.0.1", port), model="vgg11", secret=SECRET)
    assert caught.value.exit_status == 1
    assert "is a meshci node running there?" in str(caught.value)


def test_out_of_memory_says_what_to_do() -> None:
    hint = failure_hint("error on pi3-b: MemoryError: ")
    assert hint.startswith("error on pi3-b: MemoryError") and "smaller --size" in hint
    cpu = failure_hint("pi3-b failed a tile: DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")
    assert "a device ran out of memory" in cpu
    assert failure_hint("request timed out after 300 s") == "request timed out after 300 s"


def test_a_taken_port_is_one_line_exit_1(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "meshci", "node", "--insecure", "--gflops", "1",
                               "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], done.stderr
    assert "pick another --listen" in lines[0]
