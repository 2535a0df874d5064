"""End to end over real loopback sockets: node processes (`python -m meshci node`) forming a
mesh, serving requests with every strategy, surviving bad input."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshci.node.client import RequestError, infer, stats
from meshci.node.local import LocalMesh, wait_formed
from meshci.planning import STRATEGIES
from meshci.wire import client_tls_context
from logged import logged_mesh

pytestmark = pytest.mark.slow

MODELS = ("vgg16", "resnet34")
SMALL = (64, 64)


@contextlib.contextmanager
def _formed_mesh(specs: list[tuple[str, float]]):
    with logged_mesh() as mesh:
        mesh.add_many(specs)
        asyncio.run(wait_formed([n.address for n in mesh.nodes], mesh.secret()))
        yield mesh


@pytest.fixture(scope="module")
def mesh3():
    with _formed_mesh([("n1", 1.0), ("n2", 1.5), ("n3", 2.0)]) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def mesh2():
    with _formed_mesh([("n1", 1.0), ("n2", 1.0)]) as mesh:
        yield mesh


def _infer(mesh: LocalMesh, via: int, **kwargs):
    return asyncio.run(infer(mesh.nodes[via].address, secret=mesh.secret(), **kwargs))


def _stats(mesh: LocalMesh, via: int) -> dict:
    return asyncio.run(stats(mesh.nodes[via].address, secret=mesh.secret()))


@pytest.mark.parametrize("model", MODELS)
def test_every_strategy_via_every_node_is_exact(mesh3: LocalMesh, model: str) -> None:
    used: set[str] = set()
    cases = [(strategy, via) for strategy in STRATEGIES for via in range(len(mesh3.nodes))]
    for i, (strategy, via) in enumerate(cases):
        meta, logits = _infer(mesh3, via, model=model, strategy=strategy, size=SMALL, input_seed=i, check=True)
        assert meta["strategy"] == strategy and meta["requester"] == mesh3.nodes[via].name
        assert meta["check_ok"], (strategy, meta["max_abs_diff"])
        assert tuple(logits.shape) == (1, 1000)
        assert len(meta["top5"]) == 5 and meta["latency_s"] > 0
        assert set(meta["devices"]) <= {n.name for n in mesh3.nodes}
        used.update(meta["devices"])
        if strategy == "local":
            assert meta["devices"] == [mesh3.nodes[via].name]
        if strategy == "edgeci" and len(meta["devices"]) > 1:
            assert meta["auction_rounds"] >= 1  # (DPFL may keep a small input on one device: no auction)
    assert used == {n.name for n in mesh3.nodes}  # the mesh really shared the work


@pytest.mark.parametrize("model", MODELS)
def test_full_size_request_is_exact(mesh3: LocalMesh, model: str) -> None:
    meta, _ = _infer(mesh3, 1, model=model, strategy="edgeci", size=(224, 224), check=True)
    assert meta["check_ok"], meta["max_abs_diff"]
    assert len(meta["devices"]) >= 2


@pytest.mark.parametrize("model", ["squeezenet1_1", "googlenet", "densenet121", "convnext_tiny"])
def test_branchy_model_via_two_nodes_is_exact(mesh2: LocalMesh, model: str) -> None:
    """Fire modules, inception modules and dense layers distributed as branch segments, and
    ConvNeXt's channels-last blocks."""
    used: set[str] = set()
    for via, strategy in ((0, "edgeci"), (1, "deepthings")):
        meta, logits = _infer(mesh2, via, model=model, strategy=strategy, size=(96, 96), input_seed=via, check=True)
        assert meta["check_ok"], (model, strategy, meta["max_abs_diff"])
        assert tuple(logits.shape) == (1, 1000)
        used.update(meta["devices"])
    assert used == {n.name for n in mesh2.nodes}  # both nodes computed tiles


def test_boundary_rows_travel_peer_to_peer(mesh3: LocalMesh) -> None:
    before = [_stats(mesh3, i) for i in range(3)]
    meta, _ = _infer(mesh3, 0, model="resnet34", strategy="edgeci", size=SMALL, check=True)
    after = [_stats(mesh3, i) for i in range(3)]
    assert meta["check_ok"] and meta["blocks"] >= 2
    # the auctioneer forwarded no boundary rows it did not compute
    assert after[0]["relayed_boundary_bytes"] == before[0]["relayed_boundary_bytes"]
    # ... and the other devices did send tiles themselves
    worker_tiles = sum(a["sent_bytes"].get("TILE", 0) - b["sent_bytes"].get("TILE", 0)
                       for a, b in zip(after[1:], before[1:]))
    assert worker_tiles > 0
    # every device that computed tiles measured what a tile costs it beyond the compute,
    # and advertises it (the planner charges it per tile)
    for a, b in zip(after, before):
        if a["tiles_computed"] > b["tiles_computed"]:
            assert a["tile_handling_ms"] > 0
            assert a["advert"]["tile_ms"] == pytest.approx(a["tile_handling_ms"], rel=5e-3)
    for strategy in ("modnn", "aofl"):
        previous = _stats(mesh3, 0)["relayed_boundary_bytes"]
        meta, _ = _infer(mesh3, 0, model="resnet34", strategy=strategy, size=SMALL)
        assert meta["routing"] == "requester"
        assert _stats(mesh3, 0)["relayed_boundary_bytes"] > previous


def test_bad_requests_get_reasons_and_the_node_keeps_serving(mesh3: LocalMesh) -> None:
    with pytest.raises(RequestError, match="unknown model"):
        _infer(mesh3, 2, model="no-such-net", size=SMALL)
    with pytest.raises(RequestError, match="unknown strategy"):
        _infer(mesh3, 2, model="resnet34", strategy="magic", size=SMALL)
    with pytest.raises(RequestError, match="input size"):
        _infer(mesh3, 2, model="resnet34", size=(0, 64))
    # garbage bytes, then a connection that says nothing and hangs up
    address = mesh3.nodes[2].address
    with socket.create_connection((address.host, address.port)) as sock:
        sock.sendall(b"\x00\xffGARBAGE" * 1000)
    with socket.create_connection((address.host, address.port)):
        pass
    meta, _ = _infer(mesh3, 2, model="resnet34", strategy="edgeci", size=SMALL, check=True)
    assert meta["check_ok"]
    assert _stats(mesh3, 2)["errors_replied"] >= 3


def test_wrong_secret_is_refused(mesh3: LocalMesh) -> None:
    with pytest.raises(RequestError, match="cannot connect"):
        asyncio.run(infer(mesh3.nodes[0].address, model="resnet34", size=SMALL, secret=b"x" * 32))


@pytest.fixture
def small_mesh():
    mesh = LocalMesh.create()
    try:
        yield mesh
    finally:
        mesh.close()


def test_membership_join_gossip_death_and_duplicates(small_mesh: LocalMesh) -> None:
    a = small_mesh.add("a")
    b = small_mesh.add("b")          # joins through a
    c = small_mesh.add("c")          # joins through b: a learns of c by gossip
    d = small_mesh.add("d")          # joins through c
    asyncio.run(wait_formed([n.address for n in small_mesh.nodes], small_mesh.secret(), timeout=20))
    view = asyncio.run(stats(a.address, secret=small_mesh.secret()))
    assert view["peers"] == {"b": "alive", "c": "alive", "d": "alive"}

    # a node with a name already in the mesh is refused, with the reason, exit status 2
    args = small_mesh.node_args("b", join=d.address)
    result = subprocess.run([sys.executable, "-m", "meshci", "node", *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "duplicate node name 'b'" in result.stderr

    # a killed node is declared dead within a few seconds (no clean LEAVE)
    d.process.kill()
    d.process.wait()

    async def until_dead() -> None:
        while True:
            views = [await stats(n.address, secret=small_mesh.secret()) for n in (a, b, c)]
            if all(v["peers"].get("d") == "dead" for v in views):
                return
            await asyncio.sleep(0.2)

    asyncio.run(asyncio.wait_for(until_dead(), timeout=10))
    # SIGTERM: a clean shutdown, announced to the peers (LEAVE)
    assert c.stop() == 0

    async def until_left() -> None:
        while (await stats(a.address, secret=small_mesh.secret()))["peers"].get("c") != "dead":
            await asyncio.sleep(0.1)

    asyncio.run(asyncio.wait_for(until_left(), timeout=10))


def test_nodes_find_each_other_by_discovery(small_mesh: LocalMesh) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    beacon = ["--discover", f"127.255.255.255:{port}"]
    first = small_mesh.add("x1", join=False, extra=beacon)
    second = small_mesh.add("x2", join=False, extra=beacon)
    asyncio.run(wait_formed([first.address, second.address], small_mesh.secret(), timeout=20))


OPENSSL = shutil.which("openssl")


def _make_pki(folder: Path, leaves: list[str]) -> None:
    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True, timeout=30)  # type: ignore[list-item]

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=ca")
    for leaf in leaves:
        run("req", *key, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", "-subj", f"/CN={leaf}")
        run("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{leaf}.pem", "-days", "1")


@pytest.mark.skipif(OPENSSL is None, reason="no openssl CLI to make a test CA")
def test_mesh_over_mutual_tls(small_mesh: LocalMesh, tmp_path: Path) -> None:
    _make_pki(tmp_path, ["t1", "t2", "client"])

    def tls(leaf: str) -> list[str]:
        return ["--tls-cert", str(tmp_path / f"{leaf}.pem"), "--tls-key", str(tmp_path / f"{leaf}.key"),
                "--tls-ca", str(tmp_path / "ca.pem")]

    t1 = small_mesh.add("t1", extra=tls("t1"))
    t2 = small_mesh.add("t2", extra=tls("t2"))
    context = client_tls_context(tmp_path / "client.pem", tmp_path / "client.key", tmp_path / "ca.pem")
    secret = small_mesh.secret()

    async def formed() -> None:
        while (await stats(t1.address, secret=secret, ssl_context=context))["peers"].get("t2") != "alive":
            await asyncio.sleep(0.2)

    asyncio.run(asyncio.wait_for(formed(), timeout=20))
    meta, _ = asyncio.run(infer(t2.address, model="resnet34", strategy="modnn", size=(32, 32),
                                secret=secret, ssl_context=context, check=True))
    assert meta["check_ok"] and sorted(meta["devices"]) == ["t1", "t2"]
    with pytest.raises(RequestError):  # a client without a certificate is refused
        asyncio.run(stats(t1.address, secret=secret))
