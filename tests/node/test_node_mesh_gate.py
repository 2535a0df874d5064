"""End to end over loopback sockets: squeeze-and-excitation and channel-shuffle models on a
two-node mesh, every tile's partial sums exchanged at each SE gate, exact."""

from __future__ import annotations

import asyncio

import pytest

from meshci.node.client import infer
from meshci.node.local import LocalMesh, wait_formed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh2():
    mesh = LocalMesh.create()
    try:
        mesh.add_many([("n1", 1.0), ("n2", 1.0)])
        asyncio.run(wait_formed([n.address for n in mesh.nodes], mesh.secret()))
        yield mesh
    finally:
        mesh.close()


def _infer(mesh: LocalMesh, via: int, **kwargs):
    return asyncio.run(infer(mesh.nodes[via].address, secret=mesh.secret(), **kwargs))


@pytest.mark.parametrize("model", ["mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0"])
def test_gated_and_shuffled_models_via_two_nodes_are_exact(mesh2: LocalMesh, model: str) -> None:
    # modnn splits every layer over both devices: every SE gate's sums cross the mesh
    meta, logits = _infer(mesh2, 0, model=model, strategy="modnn", size=(96, 96), input_seed=1, check=True)
    assert meta["check_ok"], (model, "modnn", meta["max_abs_diff"])
    assert set(meta["devices"]) == {n.name for n in mesh2.nodes}
    assert tuple(logits.shape) == (1, 1000)
    meta, logits = _infer(mesh2, 1, model=model, strategy="edgeci", size=(96, 96), input_seed=2, check=True)
    assert meta["check_ok"], (model, "edgeci", meta["max_abs_diff"])
